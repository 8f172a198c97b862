#!/usr/bin/env python3
"""Peak memory of loading the full-size PersonaPlex LM with quantization (issue 4).

Writes a full-size random PersonaPlex-7B `model.safetensors` (bf16, 475 tensors, 16.7 GB, streamed
one tensor at a time) unless --path already exists, then loads it at each requested bit width in a
fresh process and reports that process's peak RSS, MLX's peak memory and the model's own size.
With --cache it also measures the first load that writes the converted-weights cache and the
second start that reads it. The random file is deleted at the end unless --keep.

    python scripts/measure_lm_memory.py --bits 4 8 [--path /tmp/x/model.safetensors] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
import mlx.core as mx
from engine.config import parse_model_config
from engine.lm import LMModel
path, bits, group, cache_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
cfg = parse_model_config({}).lm
t0 = time.perf_counter()
m = LMModel.load(path, cfg, dtype="bfloat16", quantize=None if bits == "none" else int(bits),
                 group_size=group, depformer_steps=None if steps == "default" else int(steps),
                 cache=cache_dir != "-", cache_dir=None if cache_dir == "-" else cache_dir)
dt = time.perf_counter() - t0
print(json.dumps({
    "bits": bits, "load_s": round(dt, 1), "from_cache": m.loaded_from_cache,
    "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
    "mlx_peak_gb": round(mx.get_peak_memory() / 1e9, 3),
    "mlx_active_gb": round(mx.get_active_memory() / 1e9, 3),
    "model_gb": round(m.nbytes() / 1e9, 3),
    "depformer_steps": m.depformer_steps,
}))
"""


def measure(path: Path, bits: str, group: int, cache_dir: str, steps: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), bits, str(group), cache_dir, steps],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"loading at {bits} bits failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=None, help="full-size model.safetensors (written if missing)")
    ap.add_argument("--bits", nargs="+", default=["4", "8"], help="bit widths to load (4, 8, none)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--depformer-steps", default="default", help="'default' (8) or a number")
    ap.add_argument("--cache", action="store_true", help="also measure writing and reading the converted-weights cache")
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from engine.config import parse_model_config
    from engine.lm.random_weights import write_random_lm_checkpoint

    tmpdir = None
    path = args.path
    if path is None:
        tmpdir = Path(tempfile.mkdtemp(prefix="parley-7b-random-", dir=os.environ.get("TMPDIR", "/tmp")))
        path = tmpdir / "model.safetensors"
    created = False
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            cfg = parse_model_config({}).lm
            t0 = time.perf_counter()
            size = write_random_lm_checkpoint(path, cfg, seed=args.seed, dtype="bfloat16")
            created = True
            print(f"wrote random full-size PersonaPlex checkpoint: {size / 1e9:.2f} GB in "
                  f"{time.perf_counter() - t0:.0f} s ({path})", flush=True)
        results = []
        for bits in args.bits:
            r = measure(path, bits, args.group_size, "-", args.depformer_steps)
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.cache and bits != "none":
                cache_dir = tempfile.mkdtemp(prefix="parley-lm-cache-")
                try:
                    first = measure(path, bits, args.group_size, cache_dir, args.depformer_steps)
                    second = measure(path, bits, args.group_size, cache_dir, args.depformer_steps)
                    cache_gb = sum(f.stat().st_size for f in Path(cache_dir).iterdir()) / 1e9
                    print(json.dumps({"cache_first": first, "cache_second": second,
                                      "cache_file_gb": round(cache_gb, 2)}), flush=True)
                finally:
                    shutil.rmtree(cache_dir, ignore_errors=True)
        print("\n| bits | load s | peak RSS GB | MLX peak GB | model GB |")
        print("|---|---|---|---|---|")
        for r in results:
            print(f"| {r['bits']} | {r['load_s']} | {r['peak_rss_gb']} | {r['mlx_peak_gb']} | {r['model_gb']} |")
    finally:
        if (created or tmpdir) and not args.keep:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
