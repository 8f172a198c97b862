"""Kernel by kernel, what our CUDA kernels and MLX's own cost on the device (not a unit test).

Runs a few of each — MLX's 4-bit product, our fused products (engine/lm/fused.py), a trivial
custom kernel and the depth step kernel (engine/lm/depth_kernel.py, steps 0 and 7 of the 7B's
depth transformer at 4 bits) — each evaluated on its own,
so a profiler sees them one by one. Under Nsight Compute (`bash scripts/bench_gpu.sh ncu`) the
durations it reports are the kernels' own, without launch gaps; without a profiler this script
prints each one's wall time per call in a chain, so the difference is what launching costs.

    python3 scripts/profile_kernels.py            # wall times
    ncu --clock-control none --metrics gpu__time_duration.sum ... python3 scripts/profile_kernels.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402

from check_fused_kernels import make_depformer, wall_per_call  # noqa: E402
from engine.lm import fused  # noqa: E402
from engine.lm.layers import Linear  # noqa: E402


def make_linear(n: int, k: int, seed: int) -> Linear:
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.02).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    return Linear(q, s, b, 4, 64)


def main() -> None:
    profiled = bool(os.environ.get("NV_COMPUTE_PROFILER_PERFWORKS_DIR") or
                    os.environ.get("PARLEY_UNDER_PROFILER"))
    x = mx.random.normal((1, 1, 4096)).astype(mx.bfloat16)
    alpha = mx.ones((4096,), dtype=mx.float32)
    big, sq = make_linear(22528, 4096, 1), make_linear(4096, 4096, 2)
    mx.eval(x, alpha, big.arrays(), sq.arrays())
    probe = mx.fast.cuda_kernel(
        name="parley_probe_trivial", input_names=["x"], output_names=["y"],
        source="if (blockIdx.x == 0 && threadIdx.x == 0) y[0] = x[0] + 1.f;")

    def trivial(y):
        return probe(inputs=[y], grid=(132 * 256, 1, 1), threadgroup=(256, 1, 1),
                     output_shapes=[(1,)], output_dtypes=[mx.float32])[0]

    cases = {
        "mlx qmv 22528x4096": lambda y: big(y)[..., :4096] + y,
        "fused gemv 22528x4096": lambda y: fused.gemv(y, big)[..., :4096] + y,
        "mlx qmv 4096x4096 (+ add)": lambda y: sq(y) + y,
        "fused gemv+res 4096x4096": lambda y: fused.gemv(y, sq, res=y),
        "fused gated 22528x4096": lambda y: fused.gemv_gated(y, alpha, big)[..., :4096] + y,
    }
    # The depth step kernel (the 7B's depth shapes, 4-bit): steps 0 and 7 of a frame.
    dep = make_depformer({"d": 1024, "hidden": 2816, "heads": 16, "hin": 4096, "card": 2048},
                         4, mx.bfloat16, 8)
    tok = mx.array([3], dtype=mx.int32)
    kvs = []
    for k in range(8):
        logits, kv = dep.step_kernel(k, x, tok, kvs)
        kvs.append(kv)
    mx.eval(logits, kvs)

    def depth_step(k):
        return dep.step_kernel(k, x, tok, kvs[:k])[0]

    if profiled:  # a few of each, evaluated one by one, for the profiler's table
        if os.environ.get("PARLEY_PROFILE_ONLY") == "depth":
            cases = {}
        for name, fn in cases.items():
            for _ in range(3):
                mx.eval(fn(x))
        for _ in range(3):
            mx.eval(trivial(mx.zeros((1,))))
        for k in (0, 7, 0, 7):
            mx.eval(depth_step(k))
        return
    for name, fn in cases.items():
        print(f"{name:28s} wall {wall_per_call(fn, x):7.1f} us/call (chain of 40, compiled)")
    print(f"{'trivial custom kernel':28s} wall {wall_per_call(trivial, mx.zeros((1,))):7.1f} us/call")
    for k in (0, 7):
        mx.eval(depth_step(k))
        t0 = time.perf_counter()
        for _ in range(50):
            mx.eval(depth_step(k))
        print(f"{f'depth step kernel, step {k}':28s} wall {(time.perf_counter() - t0) / 50 * 1e6:7.1f} "
              f"us/call (evaluated one at a time)")


if __name__ == "__main__":
    main()
