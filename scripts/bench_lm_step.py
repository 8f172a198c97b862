#!/usr/bin/env python3
"""Times LM steps (temporal transformer + text head + 8 depformer steps + sampling, one evaluation
barrier) of a full-size PersonaPlex model with random weights on this machine (issue 4).

    python scripts/bench_lm_step.py --path /tmp/x/model.safetensors --bits 4 --steps 5
    python scripts/bench_lm_step.py --tiny    # the tiny test model, for a quick smoke run

Without --path a random full-size checkpoint is written to a temporary folder (16.7 GB) and
deleted afterwards. Reports the per-step wall time (first step separately: it includes warm-up),
and with --breakdown the temporal part alone (an extra barrier after the hidden state).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="use tests/fixtures/personaplex-tiny")
    ap.add_argument("--bits", default="4", help="4, 8 or none (bf16)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=16, help="prompt frames before the timed steps")
    ap.add_argument("--depformer-steps", type=int, default=None)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from engine.config import load_model_config, parse_model_config
    from engine.lm import LMGen, LMModel
    from engine.lm.random_weights import write_random_lm_checkpoint

    tmpdir = None
    if args.tiny:
        mcfg = load_model_config(ROOT / "tests/fixtures/personaplex-tiny")
        path = ROOT / "tests/fixtures/personaplex-tiny/model.safetensors"
        dtype = "float32"
    else:
        mcfg = parse_model_config({})
        dtype = "bfloat16"
        path = args.path
        if path is None:
            tmpdir = Path(tempfile.mkdtemp(prefix="parley-7b-random-"))
            path = tmpdir / "model.safetensors"
        if not path.exists():
            t0 = time.perf_counter()
            write_random_lm_checkpoint(path, mcfg.lm, seed=0, dtype="bfloat16")
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        bits = None if args.bits == "none" else int(args.bits)
        t0 = time.perf_counter()
        model = LMModel.load(path, mcfg.lm, dtype=dtype, quantize=bits, group_size=args.group_size,
                             depformer_steps=args.depformer_steps, cache=False)
        print(f"loaded ({args.bits} bits, {model.nbytes() / 1e9:.2f} GB, depformer steps "
              f"{model.depformer_steps}) in {time.perf_counter() - t0:.1f} s", flush=True)
        gen = LMGen(model, mcfg.lmgen, greedy=args.greedy, seed=0)
        lg = mcfg.lmgen
        frame = [mcfg.lm.existing_text_padding_id] + list(lg.silence_tokens) + list(lg.sine_tokens)
        t0 = time.perf_counter()
        gen.prefill(None, np.array([frame] * args.prefill))
        print(f"prefill of {args.prefill} frames: {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
        rng = np.random.default_rng(0)
        times = []
        for i in range(args.steps):
            uc = rng.integers(0, mcfg.lm.card, mcfg.lm.n_q // 2)
            t0 = time.perf_counter()
            gen.step(user_codes=uc)
            times.append((time.perf_counter() - t0) * 1e3)
            print(f"step {i}: {times[-1]:.0f} ms", flush=True)
        rest = times[1:] or times
        print(f"first step {times[0]:.0f} ms; then median {statistics.median(rest):.0f} ms, "
              f"min {min(rest):.0f} ms over {len(rest)} steps")
        if args.breakdown:
            tt = []
            for _ in range(max(1, min(3, args.steps))):
                x = model.embed_row(np.array(frame))
                t0 = time.perf_counter()
                hn = model.hidden(x, gen.kv)
                mx.eval(hn, model.text_logits(hn))
                tt.append((time.perf_counter() - t0) * 1e3)
            print(f"temporal transformer + text head alone: median {statistics.median(tt):.0f} ms")
        print(f"MLX peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
    finally:
        if tmpdir and not args.keep:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
