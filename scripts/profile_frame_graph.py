"""Counts the MLX operations one live frame builds, per stage, for the real PersonaPlex-7B layer
structure (32 temporal layers, 6 depth layers x 8 steps, the full Mimi layout) at small widths.

Widths do not change the number of operations, only their size, so this runs on any CPU in
seconds. Divided into the per-stage GPU times of docs/benchmarks.md it gives the cost per
operation, which shows whether a stage is bound by bandwidth or by launches. Not a unit test.

    python3 scripts/profile_frame_graph.py [--by-kind]
"""

from __future__ import annotations

import sys
from collections import Counter

import mlx.core as mx
import numpy as np

from engine.mxops import primitive_counts


# Primitives that only change an array's view (no kernel on most backends).
VIEWS = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Slice", "Transpose", "AsStrided",
         "Full", "Copy", "Split", "Flatten", "Unflatten", "StopGradient"}


KINDS: dict[str, Counter] = {}


def count_ops(*outputs, stage: str = "") -> tuple[int, int]:
    """(all primitives, primitives that are not mere views) in the graph of `outputs`; the
    compute primitives by kind are kept in KINDS[stage]."""
    counts = primitive_counts(*outputs)
    KINDS[stage] = Counter({k: n for k, n in counts.items() if k not in VIEWS})
    return sum(counts.values()), sum(KINDS[stage].values())


def main() -> None:
    from engine.config import parse_model_config
    from engine.lm import LMGen, LMModel
    from engine.lm.random_weights import random_lm_weights
    from engine.mimi import Mimi
    from engine.mimi.weights import random_mimi_weights

    lm = {"dim": 64, "num_heads": 4, "num_layers": 32, "text_card": 256, "card": 64,
          "depformer_dim": 32, "depformer_num_heads": 2, "depformer_num_layers": 6,
          "depformer_dim_feedforward": 132}
    mimi = {"seanet": {"dimension": 32, "n_filters": 4},
            "quantizer": {"dimension": 16, "n_q": 32, "bins": 64, "input_dimension": 32,
                          "output_dimension": 32},
            "transformer": {"d_model": 32, "num_heads": 2, "dim_feedforward": 64,
                            "input_dimension": 32, "output_dimensions": [32]}}
    lmgen = {"silence_tokens": [0] * 8, "sine_tokens": [1] * 8}
    cfg = parse_model_config({"lm": lm, "mimi": mimi, "lmgen": lmgen})
    model = LMModel.from_weights(random_lm_weights(cfg.lm, 0), cfg.lm, dtype="float32")
    codec = Mimi.from_weights(random_mimi_weights(cfg.mimi, 0), cfg.mimi)
    gen = LMGen(model, cfg.lmgen, greedy=True, compile=False)
    frame = np.zeros(cfg.mimi.frame_size, np.float32)
    # A short prompt so the live path is in its steady state.
    rows = np.tile(np.array([3] + [0] * 8 + [1] * 8), (8, 1))
    gen.prefill(None, rows)
    for _ in range(3):
        codes = codec.encode_step(frame)
        mx.eval(codes)
        gen.step(user_codes=np.array(codes))
        mx.eval(codec.decode_step(mx.zeros((8,), mx.int32)))

    codes = codec.encode_step(frame)
    n_encode = count_ops(codes, stage="encode")
    mx.eval(codes)
    x = model.embed_step(gen.tokens_at(gen.position - 1), compiled=False)
    hn = model.hidden(x, gen.kv)
    n_temporal = count_ops(hn, stage="temporal")
    mx.eval(hn)
    frame_fn = gen._make_frame()
    K = model.depformer_steps
    outs = frame_fn(hn, mx.zeros((K + 1,), mx.bool_), mx.zeros((K + 1,), mx.int32), None)
    n_depth = count_ops(outs[0], stage="depth")
    mx.eval(outs)
    pcm = codec.decode_step(mx.zeros((8,), mx.int32))
    n_decode = count_ops(pcm, stage="decode")
    print("MLX primitives per live frame (before mx.compile fusion), real layer counts:")
    print(f"  {'stage':9s} {'all':>6s} {'compute':>8s}")
    rows = (("encode", n_encode), ("temporal", n_temporal), ("depth", n_depth),
            ("decode", n_decode))
    for name, (n_all, n_compute) in rows:
        print(f"  {name:9s} {n_all:6d} {n_compute:8d}")
    print(f"  {'total':9s} {sum(r[1][0] for r in rows):6d} {sum(r[1][1] for r in rows):8d}")
    if "--by-kind" in sys.argv:
        for name, kinds in KINDS.items():
            print(f"{name}: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))


if __name__ == "__main__":
    main()
