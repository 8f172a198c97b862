#!/usr/bin/env python3
"""Full-size Mimi speed on this machine: our MLX Mimi beside rustymimi 0.4.1, in the same run.

Writes random full-size weights (real key naming, ~385 MB) to a temporary directory, or uses
--weights FILE (for example the real tokenizer-e351c8d8-checkpoint125.safetensors). Streams a
speech-like clip frame by frame through both codecs: warm-up frames first, then N timed frames.
Prints p50 (and p90) milliseconds per frame for encode, decode and encode + decode. Our encode and
decode are each evaluated with one mx.eval per frame.

    python scripts/bench_mimi.py [--frames 20] [--warmup 3] [--weights FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from engine.config import default_mimi_config  # noqa: E402
from engine.mimi import Mimi, random_mimi_weights  # noqa: E402
from engine.mimi.weights import speech_like  # noqa: E402

FRAME = 1920


def _pct(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def run(encode, decode, pcm, warmup, frames):
    enc, dec = [], []
    codes_seen = []
    for j in range(warmup + frames):
        frame = pcm[j * FRAME:(j + 1) * FRAME]
        t0 = time.perf_counter()
        codes = encode(frame)
        t1 = time.perf_counter()
        decode(codes)
        t2 = time.perf_counter()
        if j >= warmup:
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        codes_seen.append(codes)
    return enc, dec, codes_seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20, help="timed frames (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up frames (default 3)")
    ap.add_argument("--weights", type=Path, help="a full-size Mimi safetensors file")
    ap.add_argument("--eager", action="store_true",
                    help="run frames eagerly instead of as compiled functions")
    args = ap.parse_args(argv)

    cfg = default_mimi_config()
    total = args.warmup + args.frames
    pcm = speech_like(total * FRAME, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.weights
        if path is None:
            t = time.perf_counter()
            path = Path(tmp) / "mimi.safetensors"
            save_file(random_mimi_weights(cfg, seed=1), str(path))
            print(f"random full-size weights written in {time.perf_counter() - t:.1f} s")

        mimi = Mimi.load(path, cfg, num_codebooks=8)
        mimi.compile = not args.eager

        def our_encode(frame):
            codes = mimi.encode_step(frame)
            mx.eval(codes)
            return np.array(codes)

        def our_decode(codes):
            out = mimi.decode_step(codes)
            mx.eval(out)
            return out

        rows = [("parley MLX", *run(our_encode, our_decode, pcm, args.warmup, args.frames))]
        try:
            import rustymimi
        except ImportError:
            rustymimi = None
            print("rustymimi is not installed (pip install rustymimi==0.4.1): skipping it")
        if rustymimi is not None:
            tok = rustymimi.Tokenizer(str(path), num_codebooks=8)
            rows.append(("rustymimi 0.4.1", *run(
                lambda f: np.asarray(tok.encode_step(f.reshape(1, 1, FRAME))),
                lambda c: tok.decode_step(np.asarray(c, np.uint32).reshape(1, -1, 1)),
                pcm, args.warmup, args.frames)))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, mlx {mx.__version__} "
          f"({mx.default_device()}); {args.frames} frames after {args.warmup} warm-up")
    print(f"{'':18s}{'encode p50':>12s}{'decode p50':>12s}{'enc+dec p50':>13s}"
          f"{'enc+dec p90':>13s}   (ms per 80 ms frame)")
    for name, enc, dec, _ in rows:
        both = [a + b for a, b in zip(enc, dec)]
        print(f"{name:18s}{_pct(enc, 50):12.1f}{_pct(dec, 50):12.1f}{_pct(both, 50):13.1f}"
              f"{_pct(both, 90):13.1f}")
    if len(rows) == 2:
        same = all(np.array_equal(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1))
                   for a, b in zip(rows[0][3], rows[1][3]))
        print(f"codes identical between the two: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
