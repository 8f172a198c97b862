"""What MLX's CUDA build costs the host to issue one custom kernel, by its number of inputs,
their size and template arguments: chains of dependent launches of a trivial kernel taking N
distinct arrays, µs of host time per launch before `async_eval` returns, and per launch on the
wall.

Also checks the pointer-table trick that would let the temporal step kernel take its weights as
one input: a kernel that writes its inputs' device addresses into a uint64 table, and a kernel
that reads the arrays through that table (the sum must match).

    python3 scripts/bench_kernel_inputs.py [--chain 100] [--reps 5]

Not a unit test; needs MLX's CUDA build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx


def _inputs_kernel(n: int, templated: bool):
    names = ["x"] + [f"a{i}" for i in range(n)]
    reads = " ".join(f"s += a{i}[0];" for i in range(n))
    src = ("if (threadIdx.x == 0 && blockIdx.x == 0) { float s = 0.f; " + reads
           + " y[0] = x[0] + s * 0.f + 1.f; }")
    if templated:
        src = src.replace("+ 1.f", "+ (float)(P0 + P1 + 1)")
    return mx.fast.cuda_kernel(name=f"bench_inputs_{n}_{int(templated)}", input_names=names,
                               output_names=["y"], source=src)


def _template(templated: bool) -> list:
    if not templated:
        return []
    return [("T", mx.float32)] + [(f"P{i}", 0) for i in range(24)]


def time_chain(n: int, arrays: list[mx.array], chain: int, reps: int, templated: bool) -> dict:
    kern = _inputs_kernel(n, templated)
    template = _template(templated)
    hosts, walls = [], []
    for r in range(reps + 2):
        y = mx.zeros((1,), mx.float32)
        mx.eval(y)
        t0 = time.perf_counter()
        for _ in range(chain):
            y = kern(inputs=[y] + arrays[:n], template=template or None, grid=(32, 1, 1),
                     threadgroup=(32, 1, 1), output_shapes=[(1,)],
                     output_dtypes=[mx.float32])[0]
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        assert float(y[0]) == chain, float(y[0])
        if r >= 2:
            hosts.append((t2 - t1) / chain * 1e6)
            walls.append((t3 - t0) / chain * 1e6)
            build = (t1 - t0) / chain * 1e6
    return {"inputs": n, "template_args": len(template), "build_us": round(build, 2),
            "encode_us": round(statistics.median(hosts), 2),
            "wall_us": round(statistics.median(walls), 2)}


def check_pointer_table(arrays: list[mx.array]) -> dict:
    """Addresses captured by one kernel, read back through them by another."""
    n = len(arrays)
    names = [f"a{i}" for i in range(n)]
    capture = mx.fast.cuda_kernel(
        name=f"bench_capture_{n}", input_names=names, output_names=["table"],
        source="if (threadIdx.x == 0 && blockIdx.x == 0) { "
               + " ".join(f"table[{i}] = (unsigned long long)a{i};" for i in range(n)) + " }")
    table = capture(inputs=arrays, grid=(32, 1, 1), threadgroup=(32, 1, 1),
                    output_shapes=[(n,)], output_dtypes=[mx.uint64])[0]
    mx.eval(table)
    read = mx.fast.cuda_kernel(
        name=f"bench_read_{n}", input_names=["table"], output_names=["y"],
        source="if (threadIdx.x == 0 && blockIdx.x == 0) { float s = 0.f; "
               f"for (int i = 0; i < {n}; ++i) s += ((const float*)table[i])[0]; y[0] = s; }}")
    y = read(inputs=[table], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
             output_dtypes=[mx.float32])[0]
    want = float(sum(a[0] for a in arrays))
    got = float(y[0])
    return {"arrays": n, "sum_through_table": got, "sum_direct": want, "ok": abs(got - want) < 1e-3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    arrays = [mx.full((256,), float(i % 7), mx.float32) for i in range(600)]
    mx.eval(arrays)
    rows = []
    for n in (0, 8, 40, 150, 600):
        for templated in (False, True):
            rows.append(time_chain(n, arrays, args.chain, args.reps, templated))
            print(json.dumps(rows[-1]), flush=True)
    # MLX's CUDA encoder commits its graph once the inputs it has seen pass MLX_MAX_MB_PER_BUFFER
    # (400 MB on an H100/H200) or MLX_MAX_OPS_PER_BUFFER ops: a launch whose inputs are a few
    # layers' weights commits a graph of its own. The same chain with one small and one large
    # input shows what such a commit costs.
    for mb in (1, 500):
        big = mx.zeros((mb * 1024 * 1024 // 4,), mx.float32)
        mx.eval(big)
        row = time_chain(1, [big], args.chain, args.reps, False)
        row["input_mb"] = mb
        print(json.dumps(row), flush=True)
        del big
    print(json.dumps({"pointer_table": check_pointer_table(arrays[:150])}), flush=True)


if __name__ == "__main__":
    main()
