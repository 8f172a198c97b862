"""Checks engine/lm/fused.py's CUDA kernels against the unfused MLX operations they replace, and
times both (not a unit test: it needs MLX's CUDA backend; run on the lent H100 through
`bash scripts/bench_gpu.sh fused`).

    python3 scripts/check_fused_kernels.py            # on a CUDA machine: numerics + timings
    python3 scripts/check_fused_kernels.py --nvrtc /path/to/libnvrtc.so.12 --include DIR ...
                                                      # anywhere: compile every kernel variant
                                                      # with NVRTC (no GPU) to catch errors early

Numerics: for each kernel and layer shape of the 7B (and the tiny model's), at 4 and 8 bits and
unquantized (bf16 and float32), the largest difference from the unfused path relative to the
largest output magnitude. Timings: chains of dependent calls evaluated once, host time (building
the graph until `mx.async_eval` returns) and wall time per call.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from engine.lm import depth_kernel, fused  # noqa: E402
from engine.lm.layers import Linear, gated_ffn, merge_heads, rms_norm_f32, split_heads  # noqa: E402

CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.uint32: "uint32_t",
              mx.int32: "int32_t", mx.uint64: "uint64_t", mx.uint8: "uint8_t"}


def make_linear(n: int, k: int, bits: int, dtype, key: int, group: int = 64) -> Linear:
    w = (mx.random.normal((n, k), key=mx.random.key(key)) / math.sqrt(k)).astype(dtype)
    if not bits:
        return Linear(w)
    q, s, b = mx.quantize(w, group_size=group, bits=bits)
    return Linear(q, s, b, bits, group)


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.abs(a - b).max()) / max(float(mx.abs(b).max()), 1e-30)


def rope_ref(x: mx.array, pos: int, base: float) -> mx.array:
    hd = x.shape[-1]
    return mx.fast.rope(x.astype(mx.float32), hd, traditional=True, base=base, scale=1.0,
                        offset=pos).astype(x.dtype)


def check_numerics(dtype, bits: int, dims: dict) -> list[str]:
    d, h, heads = dims["d"], dims["hidden"], dims["heads"]
    key = iter(range(1000))
    x = mx.random.normal((1, 1, d), key=mx.random.key(next(key))).astype(dtype)
    alpha = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(next(key)))).astype(mx.float32)
    res = mx.random.normal((1, 1, d), key=mx.random.key(next(key))).astype(dtype)
    lines = []

    def report(name, got, want):
        e = rel_err(got, want)
        tol = 2e-2 if dtype == mx.bfloat16 else 1e-4
        if "rope" in name and dtype == mx.float32:
            # At position 2345 an angle is ~2e3 rad: one float32 ulp of the frequency (the
            # kernel computes it as the PyTorch reference does, MLX's fast.rope its own way)
            # moves it by ~1e-4 rad, so the two differ by that much in float32.
            tol = 5e-4
        lines.append(f"{'ok  ' if e <= tol else 'FAIL'} {name:28s} rel err {e:.2e}")

    lin = make_linear(d, d, bits, dtype, next(key))
    report(f"gemv {d}x{d}", fused.gemv(x, lin), lin(x))
    report(f"gemv+norm+res {d}x{d}", fused.gemv(x, lin, alpha=alpha, res=res),
           res + lin(rms_norm_f32(x, alpha)))
    lin_in = make_linear(2 * h, d, bits, dtype, next(key))
    lin_out = make_linear(d, h, bits, dtype, next(key))
    hmid = fused.gemv_gated(x, alpha, lin_in)
    y = lin_in(rms_norm_f32(x, alpha))
    want_mid = (lambda g, u: g * mx.sigmoid(g) * u)(y[..., :h], y[..., h:])
    report(f"gated {2 * h}x{d}", hmid, want_mid)
    report("ffn (gated + down+res)", fused.gemv(hmid, lin_out, res=res),
           res + gated_ffn(rms_norm_f32(x, alpha), lin_in, lin_out))
    inp = make_linear(3 * d, d, bits, dtype, next(key))
    pos = 2345
    q, k, v = fused.qkv(x, alpha, inp, heads, mx.array([pos], dtype=mx.int32), 10000.0)
    q0, k0, v0 = split_heads(inp(rms_norm_f32(x, alpha)), heads)
    report(f"qkv+rope q {3 * d}x{d}", q, rope_ref(q0, pos, 10000.0))
    report("qkv+rope k", k, rope_ref(k0, pos, 10000.0))
    report("qkv v", v, v0)
    q1, k1, v1 = fused.qkv(x, alpha, inp, heads)
    report("qkv (no rope) q", q1, q0)
    # Depth attention: one query over n earlier keys/values, then out_proj + residual.
    hd = d // heads
    for n in (1, 3, 8):
        ks = [mx.random.normal((1, heads, 1, hd), key=mx.random.key(next(key))).astype(dtype)
              for _ in range(n)]
        vs = [mx.random.normal((1, heads, 1, hd), key=mx.random.key(next(key))).astype(dtype)
              for _ in range(n)]
        K, V = mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)
        qq = q0
        a = mx.fast.scaled_dot_product_attention(qq, K, V, scale=1 / math.sqrt(hd))
        want = res + lin(merge_heads(a))
        got = fused.attn_gemv(qq, ks, vs, lin, res, heads, 1 / math.sqrt(hd))
        report(f"attn+out+res n={n}", got, want)
    # An input at an address that is not 16-byte aligned (a view into a larger buffer) takes
    # the kernels' one-value-at-a-time path: same results.
    shifted = mx.concatenate([mx.zeros((1,), dtype=dtype), x.reshape(d)])[1:]
    report("gemv+norm+res, unaligned x", fused.gemv(shifted, lin, alpha=alpha, res=res),
           res + lin(rms_norm_f32(x, alpha)))
    mx.eval(x)
    return lines


def make_depformer(dims: dict, bits: int, dtype, steps: int = 8, seed: int = 0,
                   table_bits: int = 0, head_bits: int = 0, table_group: int = 64):
    """A random depth transformer of the given widths (StackedLinear weights as the loader makes
    them; embedding tables and heads plain, or quantized with `table_bits` / `head_bits` as the
    loader's quantize_embeddings / quantize_heads make them), for the step kernel's checks."""
    from engine.lm.depformer import Depformer, DepformerLayer
    from engine.lm.layers import Embedding, StackedLinear
    d, h, heads, hin, card = dims["d"], dims["hidden"], dims["heads"], dims["hin"], dims["card"]
    key = iter(range(seed * 1000, seed * 1000 + 1000))

    def stacked(n, k, b=bits, gain=1.0, group=64):
        w = (gain * mx.random.normal((steps, n, k), key=mx.random.key(next(key))) / math.sqrt(k))
        w = w.astype(dtype)
        if not b:
            return StackedLinear(w)
        q, s_, b_ = mx.quantize(w, group_size=group, bits=b)
        return StackedLinear(q, s_, b_, b, group)

    def norm():
        return mx.random.uniform(0.5, 1.5, (d,), key=mx.random.key(next(key))).astype(mx.float32)

    def table(rows):
        w = mx.random.normal((rows, d), key=mx.random.key(next(key))).astype(dtype)
        if not table_bits:
            return Embedding(w)
        q, s_, b_ = mx.quantize(w, group_size=table_group, bits=table_bits)
        return Embedding(q, s_, b_, table_bits, table_group)

    layers = [DepformerLayer(norm(), stacked(3 * d, d), stacked(d, d), norm(), stacked(2 * h, d),
                             stacked(d, h)) for _ in range(dims.get("layers", 6))]
    return Depformer(layers, stacked(d, hin), table(dims.get("text_card", 4000)),
                     [table(card + 1) for _ in range(steps - 1)],
                     stacked(card, d, b=head_bits, gain=5.0, group=table_group), heads,
                     capacity=steps)


def check_depth_step_kernel(dtype, bits: int, dims: dict, steps: int = 8,
                            tables: int = 0) -> list[str]:
    """engine/lm/depth_kernel.py's whole step against the unfused depth step, step by step:
    logits and each layer's key and value. `tables` = b quantizes the embedding tables and the
    heads to b bits, as the loader does by default."""
    from engine.lm import depth_kernel
    dep = make_depformer(dims, bits, dtype, steps, table_bits=tables, head_bits=tables,
                         table_group=32 if dims["d"] % 64 else 64)
    hn = mx.random.normal((1, 1, dims["hin"]), key=mx.random.key(99)).astype(dtype)
    cache, kvs, lines = dep.new_cache(), [], []
    tol = 2e-2 if dtype == mx.bfloat16 else 1e-4
    L, D = len(dep.layers), dims["d"]
    worst_logits = worst_kv = 0.0
    for k in range(steps):
        tok = mx.array([(37 * k + 5) % dims["card"] if k else 11], dtype=mx.int32)
        want = dep.step(k, hn, tok.reshape(1, 1), cache, "kyutai", False)[0, 0]
        got, kv = dep.step_kernel(k, hn, tok, kvs)
        kvs.append(kv)
        kv3 = kv.reshape(L, 2, D)
        worst_logits = max(worst_logits, rel_err(got, want))
        for i in range(L):
            worst_kv = max(worst_kv, rel_err(kv3[i, 0], cache[i][0][0, :, k].reshape(D)),
                           rel_err(kv3[i, 1], cache[i][1][0, :, k].reshape(D)))
    failed = depth_kernel.barrier_failed(dep._barrier)
    for name, e in (("step kernel logits", worst_logits), ("step kernel keys/values", worst_kv)):
        lines.append(f"{'ok  ' if e <= tol else 'FAIL'} {name:28s} rel err {e:.2e} ({steps} steps)")
    lines.append(f"{'FAIL' if failed else 'ok  '} step kernel grid barriers "
                 f"({depth_kernel.grid_blocks()} blocks){' gave up' if failed else ''}")
    return lines


def time_depth_steps(bits: int, steps: int = 8) -> list[str]:
    """A frame's depth chain (8 steps, greedy argmax between) through MLX ops, the per-layer fused
    kernels and the step kernel, compiled; ms per frame."""
    dims = {"d": 1024, "hidden": 2816, "heads": 16, "hin": 4096, "card": 2048}
    # Tables and heads quantized with the linears, as the loader makes them by default.
    dep = make_depformer(dims, bits, mx.bfloat16, steps, table_bits=bits, head_bits=bits)
    hn = mx.random.normal((1, 1, 4096)).astype(mx.bfloat16)

    def chain(path):
        def frame(hn):
            tok, cache, kvs, out = mx.array([3], dtype=mx.int32), dep.new_cache(), [], []
            for k in range(steps):
                if path == "kernel":
                    logits, kv = dep.step_kernel(k, hn, tok, kvs)
                    kvs.append(kv)
                else:
                    logits = dep.step(k, hn, tok.reshape(1, 1), cache, "kyutai",
                                      path == "fused")[0, 0]
                tok = mx.argmax(logits).astype(mx.int32).reshape(1)
                out.append(tok)
            return mx.concatenate(out)
        return mx.compile(frame)

    lines = []
    for path in ("mlx", "fused", "kernel", "kernel acqrel"):
        # "kernel acqrel": the step kernel with acquire/release barriers (PARLEY_DEPTH_BARRIER),
        # read when the kernel is traced.
        os.environ["PARLEY_DEPTH_BARRIER"] = "acqrel" if path.endswith("acqrel") else "fences"
        f = chain(path.split()[0])
        mx.eval(f(hn))
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            mx.eval(f(hn))
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        os.environ.pop("PARLEY_DEPTH_BARRIER")
        lines.append(f"{bits}-bit depth frame ({steps} steps, greedy) {path:13s}: p50 "
                     f"{times[len(times) // 2]:6.2f} ms, min {times[0]:6.2f} ms")
    return lines


def barrier_cost(nbar: int = 200) -> list[str]:
    """What one of the step kernel's grid barriers costs on the device: a kernel of the step
    kernel's grid doing `nbar` barriers and nothing else, against one doing none."""
    from engine.lm import depth_kernel
    header = fused._HEADER + depth_kernel._HELPERS
    src = ("unsigned int* bar = const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync));\n"
           "  for (int i = 0; i < NBAR; ++i) parley::grid_sync<AR>(bar, NB);\n"
           "  if (blockIdx.x == 0 && threadIdx.x == 0) y[0] = x[0] + 1.f;")
    kern = mx.fast.cuda_kernel(name="parley_barrier_probe", input_names=["x", "sync"],
                               output_names=["y"], source=src, header=header)
    nb = depth_kernel.sm_count()
    barrier = depth_kernel.new_barrier()

    def us_per_kernel(n: int, ar: bool) -> float:
        def chain(y):
            for _ in range(20):
                (y,) = kern(inputs=[y, barrier], template=[("NBAR", n), ("NB", nb), ("AR", ar)],
                            grid=(nb * depth_kernel.WARPS * 32, 1, 1),
                            threadgroup=(depth_kernel.WARPS * 32, 1, 1),
                            output_shapes=[(1,)], output_dtypes=[mx.float32])
            return y
        f = mx.compile(chain)
        x = mx.zeros((1,))
        mx.eval(f(x))
        t0 = time.perf_counter()
        for _ in range(5):
            mx.eval(f(x))
        return (time.perf_counter() - t0) / 100 * 1e6

    lines = []
    for ar in (False, True):
        empty, full = us_per_kernel(0, ar), us_per_kernel(nbar, ar)
        lines.append(f"grid barrier, {'acquire/release' if ar else 'fences'} ({nb} blocks): "
                     f"{(full - empty) / nbar:.2f} us each (kernel with none: {empty:.1f} us)"
                     + (" FAILED" if depth_kernel.barrier_failed(barrier) else ""))
    return lines


def time_chain(fn, x, n: int = 100, reps: int = 3) -> tuple[float, float]:
    best = (1e9, 1e9)
    for _ in range(reps):
        y = x
        t0 = time.perf_counter()
        for _ in range(n):
            y = fn(y)
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        best = min(best, ((t2 - t0) / n * 1e6, (t3 - t0) / n * 1e6))
    return best


def timings(bits: int) -> list[str]:
    dtype = mx.bfloat16
    out = []
    x = mx.random.normal((1, 1, 4096)).astype(dtype)
    alpha = mx.ones((4096,), dtype=mx.float32)
    # Each temporal product alone: 40 in a chain, each product's input made from the last one's
    # output (y_i = W_i adapt(y_{i-1}) + y_{i-1}; `adapt` slices or repeats it to K values, the
    # same operations for MLX and for ours), so each waits for the last — with a constant input
    # MLX's CUDA graph ran the products concurrently and looked 2-3x faster than it is. W_i
    # cycles through 8 copies (more than L2 holds); compiled; wall time per product.
    for n, k in ((4096, 4096), (22528, 4096), (4096, 11264), (12288, 4096)):
        lins = [make_linear(n, k, bits, dtype, 7 + i) for i in range(8)]
        mx.eval([lin.arrays() for lin in lins])
        mb = sum(a.nbytes for a in lins[0].arrays()) / 1e6

        def adapt(y):
            return y[..., :k] if n >= k else mx.concatenate([y] * -(-k // n), axis=-1)[..., :k]

        def chain(kind):
            def f(y):
                for i in range(40):
                    lin = lins[i % 8]
                    y = lin(adapt(y)) + y if kind == "mlx" else fused.gemv(adapt(y), lin, res=y)
                return y
            return mx.compile(f)

        for kind in ("mlx", "fused", "fused16", "fused512"):
            # fused16: 16 weight loads a lane in flight instead of fused.WEIGHT_LOADS; fused512:
            # fewer rows a warp, for at least 512 blocks (both read when the products are traced)
            saved = fused.WEIGHT_LOADS, fused.MIN_BLOCKS
            fused.WEIGHT_LOADS = 16 if kind == "fused16" else saved[0]
            fused.MIN_BLOCKS = 512 if kind == "fused512" else saved[1]
            f = chain(kind)
            y0 = mx.zeros((1, 1, n), dtype=dtype)
            mx.eval(f(y0))
            fused.WEIGHT_LOADS, fused.MIN_BLOCKS = saved
            t0 = time.perf_counter()
            for _ in range(5):
                mx.eval(f(y0))
            w = (time.perf_counter() - t0) / 200 * 1e6
            out.append(f"{bits}-bit {n}x{k} {kind:5s}: {w:6.1f} us/product, {mb / w:5.2f} TB/s"
                       + (" (+ an add kernel)" if kind == "mlx" else "")
                       + ("" if n >= k else " (+ a concatenation)"))
    # A whole unfused vs fused temporal-layer shape (norm, qkv, ffn), chained on x.
    lin_qkv = make_linear(12288, 4096, bits, dtype, 1)
    lin_o = make_linear(4096, 4096, bits, dtype, 2)
    lin_in = make_linear(22528, 4096, bits, dtype, 3)
    lin_out = make_linear(4096, 11264, bits, dtype, 4)
    pos = mx.array([100], dtype=mx.int32)

    def unfused(y):
        qkv = lin_qkv(rms_norm_f32(y, alpha))
        q, k, v = split_heads(qkv, 32)
        q = rope_ref(q, 100, 10000.0)
        y = y + lin_o(merge_heads(q + v))
        return y + gated_ffn(rms_norm_f32(y, alpha), lin_in, lin_out)

    def fused_layer(y):
        q, k, v = fused.qkv(y, alpha, lin_qkv, 32, pos)
        y = fused.gemv((q + v).reshape(1, 1, 4096), lin_o, res=y)
        return fused.gemv(fused.gemv_gated(y, alpha, lin_in), lin_out, res=y)

    for name, f in (("unfused layer", unfused), ("fused layer", fused_layer),
                    ("unfused compiled", mx.compile(unfused)), ("fused compiled", mx.compile(fused_layer))):
        f(x)
        h, w = time_chain(f, x, 32)
        out.append(f"{bits}-bit {name:18s}: host {h:7.1f} us/layer, wall {w:7.1f} us/layer")
    return out


def dispatch_costs(n: int = 200) -> list[str]:
    """What issuing one kernel costs, compiled (one mx.compile'd chain of n dependent calls):
    a trivial custom kernel against MLX's own RMSNorm on the same [1024] float32 vector."""
    src = "const int i = threadIdx.x + blockIdx.x * blockDim.x; if (i < 1024) y[i] = x[i] * 0.5f;"
    kern = mx.fast.cuda_kernel(name="parley_dispatch_probe", input_names=["x"],
                               output_names=["y"], source=src)
    w = mx.ones((1024,), dtype=mx.float32)

    def custom(y):
        for _ in range(n):
            (y,) = kern(inputs=[y], grid=(1024, 1, 1), threadgroup=(256, 1, 1),
                        output_shapes=[(1024,)], output_dtypes=[mx.float32])
        return y

    def builtin(y):
        for _ in range(n):
            y = mx.fast.rms_norm(y, w, 1e-6)
        return y

    out = []
    x = mx.random.normal((1024,))
    for name, fn in (("custom kernel", mx.compile(custom)), ("mx.fast.rms_norm", mx.compile(builtin))):
        mx.eval(fn(x))
        h, wall = time_chain(fn, x, 1, 5)
        out.append(f"dispatch, compiled chain of {n}: {name:16s} host {h / n:5.2f} us/kernel, "
                   f"wall {wall / n:5.2f} us/kernel")
    return out


def _random_q8_ring(shape, key) -> tuple[mx.array, mx.array]:
    """An 8-bit ring (kv_ring.py's layout) of random rows: bytes and (scale, low) pairs."""
    from engine.lm.kv_ring import quantize_rows
    return quantize_rows(mx.random.normal(shape, key=key))


def check_ring_attention_q8(dtype, heads: int, hd: int, slots: int) -> list[str]:
    """fused.ring_attention over an 8-bit ring against engine/lm/kv_ring.py's MLX operations
    (the new key and value quantized into the ring, scaled_dot_product_attention over the
    dequantized slots): output, the new slot (bytes within one step, scales and lows within
    float rounding), and nothing else written."""
    from engine.lm.kv_ring import dequantize_rows, quantize_rows
    lines = []
    scale = 1 / math.sqrt(hd)
    counters = mx.zeros((heads,), dtype=mx.uint32)
    for pos in (0, 5, slots - 1, slots + 7, 3 * slots + 1):
        k1, k2, k3, k4, k5 = mx.random.split(mx.random.key(pos + 29), 5)
        keys, kp = _random_q8_ring((1, heads, slots, hd), k1)
        values, vp = _random_q8_ring((1, heads, slots, hd), k2)
        q, k, v = (mx.random.normal((1, heads, 1, hd), key=kk).astype(dtype) for kk in (k3, k4, k5))
        slot, n = pos % slots, (pos + 1 if pos + 1 < slots else slots)
        (kq, kqp), (vq, vqp) = quantize_rows(k), quantize_rows(v)

        def put(ring, row):
            return mx.concatenate([ring[:, :, :slot], row, ring[:, :, slot + 1:]], axis=2)

        want_k, want_kp, want_v, want_vp = put(keys, kq), put(kp, kqp), put(values, vq), put(vp, vqp)
        K = dequantize_rows(want_k, want_kp, dtype)[:, :, :n]
        V = dequantize_rows(want_v, want_vp, dtype)[:, :, :n]
        want = mx.fast.scaled_dot_product_attention(q, K, V, scale=scale)
        mx.eval(keys, values, kp, vp, want, want_k, want_v, want_kp, want_vp, counters)
        got = fused.ring_attention(q, k, v, keys, values, mx.array([slot, n], dtype=mx.int32),
                                   counters, scale, kp, vp)
        mx.eval(got)
        e = rel_err(got, want)
        tol = 2e-2 if dtype == mx.bfloat16 else 1e-4
        step = int(mx.max(mx.abs(keys.astype(mx.int32) - want_k.astype(mx.int32))).item())
        step = max(step, int(mx.max(mx.abs(values.astype(mx.int32) - want_v.astype(mx.int32))).item()))
        par_e = max(rel_err(kp, want_kp), rel_err(vp, want_vp))
        others = (bool(mx.array_equal(put(keys, want_k[:, :, slot:slot + 1]), want_k).item())
                  and bool(mx.array_equal(put(vp, want_vp[:, :, slot:slot + 1]), want_vp).item()))
        left = int(mx.max(counters).item())
        ok = e <= tol and step <= 1 and par_e <= 1e-5 and others and left == 0
        lines.append(f"{'ok  ' if ok else 'FAIL'} 8-bit ring attention pos={pos:5d} (slot {slot}, "
                     f"n {n}): rel err {e:.2e}, new slot bytes within {step}, params rel err "
                     f"{par_e:.1e}, other slots {'unchanged' if others else 'CHANGED'}, "
                     f"counters {left}")
    return lines


def check_ring_attention(dtype, heads: int, hd: int, slots: int) -> list[str]:
    """fused.ring_attention against the ring written with MLX and scaled_dot_product_attention
    over its filled slots: for a ring still filling, one just full and one wrapped around; the
    ring must hold the new key and value at its slot afterwards and nothing else changed."""
    lines = []
    scale = 1 / math.sqrt(hd)
    counters = mx.zeros((heads,), dtype=mx.uint32)
    for pos in (0, 5, slots - 2, slots - 1, slots + 7, 3 * slots + 1):
        key = mx.random.key(pos + 17)
        k1, k2, k3, k4, k5 = mx.random.split(key, 5)
        keys = mx.random.normal((1, heads, slots, hd), key=k1).astype(dtype)
        values = mx.random.normal((1, heads, slots, hd), key=k2).astype(dtype)
        q, k, v = (mx.random.normal((1, heads, 1, hd), key=kk).astype(dtype) for kk in (k3, k4, k5))
        slot, n = pos % slots, (pos + 1 if pos + 1 < slots else slots)
        want_k = mx.concatenate([keys[:, :, :slot], k, keys[:, :, slot + 1:]], axis=2)
        want_v = mx.concatenate([values[:, :, :slot], v, values[:, :, slot + 1:]], axis=2)
        want = mx.fast.scaled_dot_product_attention(q, want_k[:, :, :n], want_v[:, :, :n], scale=scale)
        mx.eval(keys, values, want, want_k, want_v, counters)
        got = fused.ring_attention(q, k, v, keys, values, mx.array([slot, n], dtype=mx.int32),
                                   counters, scale)
        mx.eval(got)
        e = rel_err(got, want)
        tol = 2e-2 if dtype == mx.bfloat16 else 1e-5
        ring_ok = bool(mx.array_equal(keys, want_k).item() and mx.array_equal(values, want_v).item())
        left = int(mx.max(counters).item())
        ok = e <= tol and ring_ok and left == 0
        lines.append(f"{'ok  ' if ok else 'FAIL'} ring attention pos={pos:5d} (slot {slot}, n {n}): "
                     f"rel err {e:.2e}, ring {'written' if ring_ok else 'WRONG'}, counters {left}")
    return lines


def check_split_identity() -> list[str]:
    """PARLEY_GEMV_SPLIT's products (x taken 16 bytes at a time) against the plain ones: the same
    sums in the same order, so equal bit for bit, at 4 and 8 bits, with and without the norm."""
    lines = []
    for bits in (4, 8):
        d, h, key = 4096, 11264, iter(range(100, 200))
        x = mx.random.normal((1, 1, d), key=mx.random.key(next(key))).astype(mx.bfloat16)
        alpha = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(next(key)))).astype(mx.float32)
        sq, big = make_linear(d, d, bits, mx.bfloat16, next(key)), make_linear(2 * h, d, bits, mx.bfloat16, next(key))
        down, qkvl = make_linear(d, h, bits, mx.bfloat16, next(key)), make_linear(3 * d, d, bits, mx.bfloat16, next(key))
        mid = mx.random.normal((1, 1, h), key=mx.random.key(next(key))).astype(mx.bfloat16)
        pos = mx.array([77], dtype=mx.int32)

        def products():
            return [fused.gemv(x, sq), fused.gemv(x, sq, alpha=alpha, res=x),
                    fused.gemv_gated(x, alpha, big), fused.gemv(mid, down, res=x),
                    *fused.qkv(x, alpha, qkvl, 32, pos)]

        saved = fused.SPLIT_X
        try:
            fused.SPLIT_X = False
            plain = products()
            fused.SPLIT_X = True
            split = products()
            mx.eval(plain, split)
        finally:
            fused.SPLIT_X = saved
        diff = max(float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())
                   for a, b in zip(plain, split))
        lines.append(f"{'ok  ' if diff == 0 else 'FAIL'} split x == plain, {bits}-bit: max diff {diff:.2e}")
    return lines


def sample_oracle(x: np.ndarray, noise: np.ndarray, k: int) -> int:
    """What engine/lm/sample_kernel.py must return (module docstring): the exactly-k candidates
    (every x above the k-th largest, then the lowest-index ones equal to it), argmax of x + noise
    over them, lowest index on ties."""
    V = x.shape[0]
    cand = np.ones(V, dtype=bool)
    if 0 < k < V:
        thr = np.sort(x)[::-1][k - 1]
        above = x > thr
        equal = np.flatnonzero(x == thr)[: k - int(above.sum())]
        cand = above.copy()
        cand[equal] = True
    s = np.where(cand, x + noise, -np.inf)
    return int(np.flatnonzero(s == s.max())[0])


def check_sampler() -> list[str]:
    """sample_kernel.sample_topk against sample_oracle, exactly, on random logits (some with many
    ties at the threshold, as bf16 logits have), for the text and audio vocabularies, plus the
    forced-token output; then its distribution against softmax over the top-k (one logits
    vector, 4000 draws, total variation distance)."""
    from engine.lm import sample_kernel
    lines = []
    rng = np.random.default_rng(0)
    for dtype, V, k, temp in ((mx.bfloat16, 2048, 250, 0.8), (mx.bfloat16, 32000, 25, 0.7),
                              (mx.float32, 64, 0, 1.0), (mx.bfloat16, 2048, 2048, 0.8)):
        bad = 0
        for trial in range(20):
            scale = 0.05 if trial % 2 else 3.0  # small: coarse bf16 values, many ties
            logits = mx.array(rng.standard_normal(V) * scale).astype(dtype)
            noise = mx.random.gumbel((V,), key=mx.random.key(trial))
            forced = mx.array([[trial % 3 == 0, 7]] * 4, dtype=mx.int32)
            tok, cond = sample_kernel.sample_topk(logits, noise, temp, k, forced, 2)
            mx.eval(tok, cond)
            x = np.array(logits.astype(mx.float32)) / np.float32(temp)
            want = sample_oracle(x.astype(np.float32), np.array(noise), k)
            want_cond = 7 if trial % 3 == 0 else want
            bad += int(tok.item() != want or cond.item() != want_cond)
        lines.append(f"{'ok  ' if bad == 0 else 'FAIL'} sampler {str(dtype):14s} V={V:5d} k={k:4d}: "
                     f"{20 - bad}/20 draws equal the oracle")
    V, k, temp, n = 2048, 250, 0.8, 4000
    logits = mx.array(rng.standard_normal(V) * 2.0).astype(mx.bfloat16)
    forced = mx.zeros((1, 2), dtype=mx.int32)
    noise = mx.random.gumbel((n, V), key=mx.random.key(123))
    toks = [sample_kernel.sample_topk(logits, noise[i], temp, k, forced, 0)[0] for i in range(n)]
    counts = np.bincount(np.array(mx.stack(toks)), minlength=V) / n
    x = np.array(logits.astype(mx.float32)) / temp
    top = np.argsort(-x)[:k]
    p = np.zeros(V)
    p[top] = np.exp(x[top] - x[top].max())
    p /= p.sum()
    tv = 0.5 * np.abs(counts - p).sum()
    # The same number of exact draws from p lands ~0.08 away by chance alone (numpy, 3 seeds:
    # 0.076-0.084); a wrong temperature or top-k lands far beyond 0.12.
    ref = np.bincount(rng.choice(V, size=n, p=p), minlength=V) / n
    tv_ref = 0.5 * np.abs(ref - p).sum()
    lines.append(f"{'ok  ' if tv < 0.12 else 'FAIL'} sampler distribution: total variation "
                 f"{tv:.3f} from softmax over the top {k} ({n} draws; exact draws: {tv_ref:.3f})")
    return lines


def wall_per_call(fn, x, n: int = 40, reps: int = 5) -> float:
    """Wall µs per call of a compiled chain of n dependent calls of fn (y = fn(y)), so each waits
    for the last: what a call costs inside a frame, launch gaps included."""
    def chain(y):
        for _ in range(n):
            y = fn(y)
        return y
    f = mx.compile(chain)
    mx.eval(f(x))
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(f(x))
    return (time.perf_counter() - t0) / (reps * n) * 1e6


def ceilings_and_attention(layers: int = 32, ctx: int = 2999) -> list[str]:
    """The device's copy bandwidth (the floor for streaming weights), and what MLX's attention of
    one query over a full KV ring costs per temporal layer: `layers` rings of [32, ctx, 128] bf16
    (1.5 GB together, far more than L2), chained through the query so each waits for the last."""
    out = []
    big = mx.random.normal((256 * 1024 * 1024,)).astype(mx.bfloat16)  # 512 MB
    mx.eval(big)
    for _ in range(2):
        mx.eval(big * 1)
    t0 = time.perf_counter()
    for _ in range(5):
        mx.eval(big * 1)
    s = (time.perf_counter() - t0) / 5
    out.append(f"copy 512 MB -> 512 MB: {s * 1e3:.2f} ms, {2 * big.nbytes / s / 1e12:.2f} TB/s")
    del big
    keys = [mx.random.normal((1, 32, ctx, 128)).astype(mx.bfloat16) for _ in range(layers)]
    vals = [mx.random.normal((1, 32, ctx, 128)).astype(mx.bfloat16) for _ in range(layers)]
    mx.eval(keys, vals)
    q0 = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
    attend = iter(range(10 ** 9))  # each call in the chain attends over the next layer's ring

    def one(q):
        i = next(attend) % layers
        return mx.fast.scaled_dot_product_attention(q, keys[i], vals[i], scale=128 ** -0.5)

    meta = mx.array([ctx // 2, ctx], dtype=mx.int32)  # a full ring
    counters = mx.zeros((32,), dtype=mx.uint32)

    def fused_one(q):  # the same through fused.ring_attention (its write included)
        i = next(attend) % layers
        return fused.ring_attention(q, q, q, keys[i], vals[i], meta, counters, 128 ** -0.5)

    q8 = [_random_q8_ring((1, 32, ctx, 128), mx.random.key(900 + i)) for i in range(layers)]
    mx.eval(q8)

    def q8_one(q):  # the same over an 8-bit ring (kv_ring.py's layout)
        i = next(attend) % layers
        return fused.ring_attention(q, q, q, q8[i][0], q8[i][0], meta, counters, 128 ** -0.5,
                                    q8[i][1], q8[i][1])

    gb = 2 * layers * keys[0].nbytes / 1e9
    gb8 = 2 * layers * (q8[0][0].nbytes + q8[0][1].nbytes) / 1e9
    for name, fn, g in (("MLX sdpa", one, gb), ("ring_attention", fused_one, gb),
                        ("ring_attention, 8-bit ring", q8_one, gb8)):
        s = wall_per_call(fn, q0, layers) * layers / 1e6
        out.append(f"attention ({name}), 1 query over {ctx} positions x 32 heads, {layers} layers "
                   f"chained: {s / layers * 1e6:.1f} us/layer ({g:.2f} GB in {s * 1e3:.2f} ms, "
                   f"{g / s / 1e3:.2f} TB/s)")
    return out


def nvrtc_compile_all(lib_path: str, includes: list[str], ptxas_info: bool = False) -> int:
    """Compiles every kernel variant the engine uses with NVRTC, as MLX's `cuda_kernel` would
    wrap it (signature, template constants), with the CUDA toolkit headers instead of MLX's.
    With `ptxas_info`, down to sm_90 machine code (ptxas runs, so inline PTX is checked too),
    printing each kernel's registers and spills (session 12: the temporal step kernel at 3
    blocks an SM uses its 80 registers and spills ~560 bytes, mostly around staging inputs)."""
    lib = ctypes.CDLL(lib_path)
    failures = 0
    sources = (_product_sources() + _depth_kernel_sources() + _temporal_kernel_sources()
               + [_barrier_probe_source()] + _mimi_kernel_sources())
    for label, src in sources:
        prog = ctypes.c_void_p()
        lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None)
        arch = b"--gpu-architecture=sm_90" if ptxas_info else b"--gpu-architecture=compute_90"
        opts = [arch, b"-std=c++17"] + [f"-I{d}".encode() for d in includes]
        if ptxas_info:
            opts.append(b"--ptxas-options=-v")
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        status = "ok" if rc == 0 else "FAIL"
        failures += rc != 0
        text = log.value.decode()
        if ptxas_info and rc == 0:  # the kernel's own lines: registers, then its spills
            info = [ln.split(":", 1)[-1].strip() for ln in text.splitlines()
                    if "Used" in ln and "registers" in ln]
            spills = [ln.split(".", 1)[-1].strip() for ln in text.splitlines() if "spill" in ln]
            print(f"{status} {label}: {info[0] if info else '?'}; {spills[0] if spills else ''}")
            continue
        print(f"{status} {label}")
        if rc != 0 or text.strip():
            print(text[:4000])
    return failures


def _depth_kernel_sources() -> list[tuple[str, str]]:
    """The step kernel's translation units as MLX would build them (from the real wrapper's
    call, captured), for the 7B's depth shapes at 4/8 bits and bf16, and the tiny float32 one."""
    out = []
    seven_b = {"d": 1024, "hidden": 2816, "heads": 16, "hin": 4096, "card": 2048}
    tiny = {"d": 32, "hidden": 88, "heads": 2, "hin": 64, "card": 64, "layers": 1, "text_card": 70}
    # (dims, bits, dtype, table bits, table group): the 4- and 8-bit loads quantize the tables
    # and heads too (the loader's default), and a 3-bit table reads values straddling two words.
    for dims, bits, dtype, tb, tg in ((seven_b, 4, mx.bfloat16, 0, 64),
                                      (seven_b, 4, mx.bfloat16, 4, 64),
                                      (seven_b, 8, mx.bfloat16, 8, 64),
                                      (seven_b, 0, mx.bfloat16, 0, 64),
                                      (tiny, 0, mx.float32, 0, 64), (tiny, 0, mx.float32, 3, 32)):
        dep = make_depformer(dims, bits, dtype, steps=3, table_bits=tb, head_bits=tb if bits else 0,
                             table_group=tg)
        hn = mx.zeros((1, 1, dims["hin"]), dtype=dtype)
        kv_size = len(dep.layers) * 2 * dims["d"]
        # (steps before, barrier kind, L2 prefetch: PARLEY_DEPTH_PREFETCH, warps a block)
        variants = ([(0, "fences", 0, 8), (2, "fences", 0, 8), (2, "fences", 1, 8),
                     (2, "fences", 0, 16), (2, "fences", 0, 12)]
                    + ([(2, "acqrel", 0, 8)] if bits == 4 and not tb else []))
        for nkv, barrier, pf, warps in variants:
            os.environ["PARLEY_DEPTH_BARRIER"] = barrier
            saved = depth_kernel.PREFETCH, depth_kernel.WARPS
            depth_kernel.PREFETCH, depth_kernel.WARPS = pf, warps
            try:
                kw, ckw = _captured(lambda: dep.step_kernel(
                    nkv, hn, mx.array([1], dtype=mx.int32), [mx.zeros((kv_size,), dtype=dtype)] * nkv))
            finally:
                os.environ.pop("PARLEY_DEPTH_BARRIER")
                depth_kernel.PREFETCH, depth_kernel.WARPS = saved
            out.append((f"depth step kernel d={dims['d']} {dtype} BITS={bits} EBITS={tb} "
                        f"NKV={nkv} barrier={barrier}{' L2 prefetch' if pf else ''}"
                        f"{f' {warps} warps a block' if warps != 8 else ''}",
                        _mlx_like_source(kw, ckw)))
    return out


def shaped_temporal(dims: dict, bits: int, dtype, layers: int, weights=None):
    """A Temporal of the given widths, its weights zeros (never evaluated: for capturing the
    step kernel's source) unless `weights(n, k)` makes each Linear."""
    from engine.lm.temporal import Temporal, TemporalLayer
    d, h = dims["d"], dims["hidden"]

    def lin(n, k):
        if weights is not None:
            return weights(n, k)
        if not bits:
            return Linear(mx.zeros((n, k), dtype=dtype))
        return Linear(mx.zeros((n, k * bits // 32), dtype=mx.uint32), mx.zeros((n, k // 64), dtype),
                      mx.zeros((n, k // 64), dtype), bits, 64)

    def norm():
        return mx.ones((d,), dtype=mx.float32)

    return Temporal([TemporalLayer(norm(), lin(3 * d, d), lin(d, d), norm(), lin(2 * h, d),
                                   lin(d, h)) for _ in range(layers)],
                    norm(), dims["heads"], dims.get("context", 3000), 10000.0)


def _split_rings(rings: list[mx.array]) -> list[list[mx.array]]:
    """KVRing.kernel_inputs()-ordered rings -> [keys, values, key params, value params]."""
    n = len(rings) // 4
    return [list(rings[i * n:(i + 1) * n]) for i in range(4)]


def _slot_rows(rings: list[mx.array], slot: int, dtype) -> list[mx.array]:
    """Every layer's key and value at `slot` as `dtype` (dequantized from an 8-bit ring)."""
    from engine.lm.kv_ring import dequantize_rows
    keys, values, kp, vp = _split_rings(rings)
    if keys[0].dtype != mx.uint8:
        return [r[:, :, slot] for r in keys + values]
    return [dequantize_rows(r[:, :, slot], p[:, :, slot], dtype)
            for r, p in zip(keys + values, kp + vp)]


def _temporal_setup(dtype, bits: int, dims: dict, layers: int, q8: bool = False):
    """A Temporal of random weights of the given widths (fused, ring attention), random rings
    (KVRing.kernel_inputs order; 8-bit with q8), zero counters, a barrier, and its fused whole
    step (the engine's default)."""
    keys_ = iter(range(5000, 9000))

    def weights(n, k):
        w = (mx.random.normal((n, k), key=mx.random.key(next(keys_))) / math.sqrt(k)).astype(dtype)
        return make_linear_from(w, bits)

    t = shaped_temporal(dims, bits, dtype, layers, weights)
    t.use_fused = t.ring_attention = True
    H, hd, S = dims["heads"], dims["d"] // dims["heads"], dims["slots"]
    norms = [mx.random.uniform(0.5, 1.5, (dims["d"],), key=mx.random.key(next(keys_)))
             for _ in range(2 * layers + 1)]
    for i, layer in enumerate(t.layers):
        layer.norm1, layer.norm2 = norms[2 * i], norms[2 * i + 1]
    t.out_norm = norms[-1]
    if q8:
        pairs = [_random_q8_ring((1, H, S, hd), mx.random.key(next(keys_))) for _ in range(2 * layers)]
        rings = [b for b, _ in pairs] + [p for _, p in pairs]
    else:
        rings = [mx.random.normal((1, H, S, hd), key=mx.random.key(next(keys_))).astype(dtype)
                 for _ in range(2 * layers)]
        rings += [mx.zeros((1,), dtype=mx.float32)] * (2 * layers)
    counters = mx.zeros((H,), dtype=mx.uint32)
    barrier = depth_kernel.new_barrier()
    mx.eval(t.arrays(), rings, counters)
    return t, rings, counters, barrier, t._whole_step()


def check_temporal_kernel(dtype, bits: int, dims: dict, layers: int = 9,
                          reps: int = 20, q8: bool = False) -> list[str]:
    """engine/lm/temporal_kernel.py's step against the fused step with ring attention (the
    engine's default), on random weights of the given widths and random rings: the output and
    every ring (the new slot written, nothing else) for a filling ring, a full one and a wrapped
    one; then each step's wall time (build + issue + wait), same process."""
    from engine.lm import temporal_kernel
    t, rings, counters, barrier, whole = _temporal_setup(dtype, bits, dims, layers, q8)
    S = dims["slots"]
    lines, tol = [], (2e-2 if dtype == mx.bfloat16 else 1e-4)
    ring_tol = max(tol, 1e-2) if q8 else tol  # one byte step apart where k or v round apart
    for pos in (5, S - 1, S + 7):
        x = mx.random.normal((1, 1, dims["d"]), key=mx.random.key(pos)).astype(dtype)
        offset = mx.array(pos, dtype=mx.int32)
        meta = mx.array([pos % S, pos + 1 if pos + 1 < S else S], dtype=mx.int32)
        ra = [r + 0 for r in rings]
        rb = [r + 0 for r in rings]
        mx.eval(ra, rb)
        want = whole(x, offset, meta, counters, *ra)
        mx.eval(want)
        got = temporal_kernel.step(t, x, offset, meta, counters, barrier, *_split_rings(rb))
        mx.eval(got)
        e = rel_err(got, want)
        slot = pos % S
        ring_e = max(rel_err(a, b) for a, b in zip(_slot_rows(ra, slot, dtype),
                                                   _slot_rows(rb, slot, dtype)))
        rest_ok = all(a.size == 1 or bool(mx.array_equal(
            mx.concatenate([a[:, :, :slot], a[:, :, slot + 1:]], 2),
            mx.concatenate([b[:, :, :slot], b[:, :, slot + 1:]], 2)).item()) for a, b in zip(ra, rb))
        ok = e <= tol and ring_e <= ring_tol and rest_ok and int(mx.max(counters).item()) == 0
        lines.append(f"{'ok  ' if ok else 'FAIL'} temporal step kernel pos={pos:5d}: out rel err "
                     f"{e:.2e}, new slot rel err {ring_e:.2e}, rest of the rings "
                     f"{'unchanged' if rest_ok else 'CHANGED'}")
    failed = depth_kernel.barrier_failed(barrier)
    lines.append(f"{'FAIL' if failed else 'ok  '} temporal step kernel grid barriers "
                 f"({depth_kernel.sm_count() * temporal_kernel.launch_settings(t, dtype, S)['blocks_per_sm']}"
                 " blocks)"
                 f"{' gave up' if failed else ''}")
    x = mx.zeros((1, 1, dims["d"]), dtype=dtype)
    offset, meta = mx.array(S + 7, dtype=mx.int32), mx.array([7, S], dtype=mx.int32)
    kern = mx.compile(lambda x, *r: temporal_kernel.step(t, x, offset, meta, counters, barrier,
                                                         *_split_rings(r)))
    for name, fn in (("fused step, ring attention", lambda: whole(x, offset, meta, counters, *rings)),
                     ("temporal step kernel", lambda: kern(x, *rings))):
        mx.eval(fn())
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            mx.eval(fn())
            times.append((time.perf_counter() - t0) * 1e3)
        lines.append(f"     {name:28s} {layers} layers: p50 {float(np.median(times)):.3f} ms a step "
                     f"({float(np.median(times)) / layers * 1e3:.1f} us a layer)")
    return lines


PHASES = ("norm+QKV+RoPE", "attention", "out proj", "norm+gated", "down proj")


def temporal_kernel_configs(dtype, bits: int, dims: dict, configs: list[tuple[int, ...]],
                            layers: int = 8, reps: int = 20, q8: bool = False) -> list[str]:
    """The step kernel's launch configurations against each other, each (blocks an SM, loads in
    flight a lane[, attention values a lane, attention chunk[, L2 prefetch mask[, tensor-core
    products: steps loaded ahead, 0 off]]]]), over bf16 rings or (q8) 8-bit ones as the engine's default: a configuration
    with the first's attention layout and products must equal the first bit for bit (the same
    sums in the same order), one with others come within bf16 rounding of it; then its step time (one launch of
    `layers` layers, wall time) and, from the kernel's own clock (block 0, PROBE), the time each
    phase of a layer takes, p50 over layers and steps."""
    from engine.lm import temporal_kernel as tk
    t, rings, counters, barrier, _ = _temporal_setup(dtype, bits, dims, layers, q8=q8)
    S = dims["slots"]
    x = mx.random.normal((1, 1, dims["d"]), key=mx.random.key(3)).astype(dtype)
    slot = 7 % S
    offset, meta = mx.array(S + 7, dtype=mx.int32), mx.array([slot, S], dtype=mx.int32)
    saved = (tk.BLOCKS_PER_SM, tk.LOADS, tk.RING_DPL, tk.RING_CHUNK, tk.LAYERS_PER_LAUNCH,
             tk.PREFETCH, tk.MMA, tk.MMA_STEPS)
    lines, first = [], None
    tol = 2e-2 if dtype == mx.bfloat16 else 1e-4
    try:
        tk.LAYERS_PER_LAUNCH = layers
        for config in configs:
            bps, loads, dpl, chunk, pf, mma = (tuple(config) + (0, 0, 0, 0))[:6]
            tk.BLOCKS_PER_SM, tk.LOADS, tk.RING_DPL, tk.RING_CHUNK = bps, loads, dpl, chunk
            tk.PREFETCH, tk.MMA = pf, bool(mma)
            tk.MMA_STEPS = mma or saved[7]
            name = (f"{bps} block(s) an SM, loads {loads or 'compiler'}"
                    + (f", attention {dpl or 'default'} values a lane, chunks of {chunk or 'default'}"
                       if dpl or chunk else "") + (f", L2 prefetch {pf}" if pf else "")
                    + (f", tensor-core products ({tk.MMA_STEPS} steps ahead)" if mma else ""))
            rb = [r + 0 for r in rings]
            mx.eval(rb)
            try:
                out = tk.step(t, x, offset, meta, counters, barrier, *_split_rings(rb))
                mx.eval(out)
            except Exception as e:  # a launch that does not compile or fit: say so, go on
                lines.append(f"FAIL {name}: {str(e).splitlines()[0][:200]}")
                continue
            if depth_kernel.barrier_failed(barrier):
                lines.append(f"FAIL {name}: the grid barrier gave up (the grid does not fit)")
                barrier = depth_kernel.new_barrier()
                continue
            if first is None:
                first = (out, rb, (dpl, chunk, bool(mma)))
                same, ok = "reference for the others", True
            elif first[2] == (dpl, chunk, bool(mma)):
                ok = bool(mx.array_equal(out, first[0]).item()) and all(
                    bool(mx.array_equal(a, b).item()) for a, b in zip(rb, first[1]))
                same = "equal to the first bit for bit" if ok else "DIFFERS from the first"
            else:
                e = rel_err(out, first[0])
                ring_e = max(rel_err(a, b) for a, b in zip(_slot_rows(rb, slot, dtype),
                                                           _slot_rows(first[1], slot, dtype)))
                ok = e <= tol and ring_e <= tol
                same = f"rel err {e:.2e} from the first (new slot {ring_e:.2e})"
            kern = mx.compile(lambda x, *r: tk.step(
                t, x, offset, meta, counters, barrier, *_split_rings(r)))
            mx.eval(kern(x, *rings))
            times, phases = [], [[] for _ in PHASES]
            for _ in range(reps):
                t0 = time.perf_counter()
                mx.eval(kern(x, *rings))
                times.append((time.perf_counter() - t0) * 1e3)
            for _ in range(reps):
                _, ticks = tk.step(t, x, offset, meta, counters, barrier, *_split_rings(rings),
                                   probe=True)
                d = np.diff(np.array(ticks[0].tolist(), dtype=np.float64)) / 1e3  # us
                for i in range(len(d)):
                    phases[i % 5].append(d[i])
            per_layer = sum(float(np.median(v)) for v in phases)
            lines.append(f"{'ok  ' if ok else 'FAIL'} {name}: {same}; step p50 "
                         f"{float(np.median(times)):.3f} ms; phases p50 us: " + ", ".join(
                             f"{ph} {float(np.median(v)):.1f}" for ph, v in zip(PHASES, phases))
                         + f" (a layer {per_layer:.1f})")
    finally:
        (tk.BLOCKS_PER_SM, tk.LOADS, tk.RING_DPL, tk.RING_CHUNK, tk.LAYERS_PER_LAUNCH,
         tk.PREFETCH, tk.MMA, tk.MMA_STEPS) = saved
        tk._kernel.cache_clear()
    return lines


def make_linear_from(w: mx.array, bits: int) -> Linear:
    if not bits:
        return Linear(w)
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    return Linear(q, s, b, bits, 64)


def _temporal_kernel_sources() -> list[tuple[str, str]]:
    """engine/lm/temporal_kernel.py's launches as MLX would build them: the 7B's temporal shapes
    at 4/8 bits and bf16 (a launch of 8 layers ending in the out_norm, and one not), and a tiny
    float32 one."""
    from engine.lm import temporal_kernel
    out = []
    seven_b = {"d": 4096, "hidden": 11264, "heads": 32, "slots": 2999}
    tiny = {"d": 64, "hidden": 176, "heads": 4, "slots": 7}
    saved = temporal_kernel.BLOCKS_PER_SM, temporal_kernel.LOADS
    smem = depth_kernel.shared_memory_per_sm
    depth_kernel.shared_memory_per_sm = lambda: 228 * 1024  # an H100/H200 SM's, wherever this runs
    for dims, bits, dtype, configs, q8 in ((seven_b, 4, mx.bfloat16, ((3, 4), (1, 0), (2, 4)), False),
                                           (seven_b, 4, mx.bfloat16, ((3, 4),), True),
                                           (seven_b, 8, mx.bfloat16, ((3, 4), (1, 0)), False),
                                           (seven_b, 8, mx.bfloat16, ((3, 4),), True),
                                           (seven_b, 0, mx.bfloat16, ((3, 4), (1, 0)), False),
                                           (tiny, 0, mx.float32, ((3, 4), (1, 0)), False),
                                           (tiny, 0, mx.float32, ((3, 4),), True)):
        for (bps, loads), layers, probe in [(c, n, False) for c in configs for n in (8, 9)] + \
                [(configs[0], 8, True)]:
            temporal_kernel.BLOCKS_PER_SM, temporal_kernel.LOADS = bps, loads
            t = shaped_temporal(dims, bits, dtype, layers)
            H, hd = dims["heads"], dims["d"] // dims["heads"]
            shape = (1, H, dims["slots"], hd)
            ring = mx.zeros(shape, dtype=mx.uint8 if q8 else dtype)
            params = mx.zeros(shape[:-1] + (2,) if q8 else (1,), dtype=mx.float32)
            kw, ckw = _captured(lambda: temporal_kernel.step(
                t, mx.zeros((1, 1, dims["d"]), dtype=dtype), mx.array(5, dtype=mx.int32),
                mx.array([5, 6], dtype=mx.int32), mx.zeros((H,), dtype=mx.uint32),
                mx.zeros((4,), dtype=mx.uint32), [ring] * layers, [ring] * layers,
                [params] * layers, [params] * layers, probe=probe))
            tpl = dict(ckw["template"])
            out.append((f"temporal step kernel d={dims['d']} {dtype} BITS={bits} L={tpl['L']} "
                        f"LAST={tpl['LAST']} blocks/SM={bps} LOADS={loads} PROBE={probe}"
                        f"{' 8-bit ring' if q8 else ''}", _mlx_like_source(kw, ckw)))
    # Weight tables (PARLEY_WEIGHT_TABLE): the launch taking its weights through one table, and
    # the kernel writing a table.
    from types import SimpleNamespace
    # Each with every L2 prefetch on too (PARLEY_TEMPORAL_PREFETCH).
    # And the tensor-core products (PARLEY_TEMPORAL_MMA), where they apply (4- and 8-bit bf16).
    saved_pf, saved_mma = temporal_kernel.PREFETCH, temporal_kernel.MMA
    for dims, bits, dtype, q8, pf, mma in (
            (seven_b, 4, mx.bfloat16, True, 0, False), (tiny, 0, mx.float32, False, 0, False),
            (seven_b, 4, mx.bfloat16, True, 31, False), (seven_b, 8, mx.bfloat16, False, 31, False),
            (tiny, 0, mx.float32, True, 31, False), (tiny, 0, mx.float32, False, 31, False),
            (seven_b, 4, mx.bfloat16, True, 0, True), (seven_b, 4, mx.bfloat16, False, 0, True),
            (seven_b, 8, mx.bfloat16, True, 0, True)):
        temporal_kernel.BLOCKS_PER_SM, temporal_kernel.LOADS, temporal_kernel.PREFETCH = 3, 4, pf
        temporal_kernel.MMA = mma
        layers = 8
        t = shaped_temporal(dims, bits, dtype, layers)
        H, hd = dims["heads"], dims["d"] // dims["heads"]
        shape = (1, H, dims["slots"], hd)
        ring = mx.zeros(shape, dtype=mx.uint8 if q8 else dtype)
        params = mx.zeros(shape[:-1] + (2,) if q8 else (1,), dtype=mx.float32)
        tables = SimpleNamespace(tables=[mx.zeros((temporal_kernel._WEIGHTS * layers,), mx.uint64)])
        kw, ckw = _captured(lambda: temporal_kernel.step(
            t, mx.zeros((1, 1, dims["d"]), dtype=dtype), mx.array(5, dtype=mx.int32),
            mx.array([5, 6], dtype=mx.int32), mx.zeros((H,), dtype=mx.uint32),
            mx.zeros((4,), dtype=mx.uint32), [ring] * layers, [ring] * layers,
            [params] * layers, [params] * layers, tables=tables))
        assert dict(ckw["template"])["MMA"] == mma
        out.append((f"temporal step kernel d={dims['d']} {dtype} BITS={bits} weight table"
                    f"{' 8-bit ring' if q8 else ''}{f' L2 prefetch {pf}' if pf else ''}"
                    f"{' tensor-core products' if mma else ''}",
                    _mlx_like_source(kw, ckw)))
        if pf or mma:
            continue
        ws = [a for layer in t.layers for a in temporal_kernel._layer_weights(layer, dtype)]
        kw, ckw = _captured(lambda: temporal_kernel._capture_kernel(len(ws))(
            inputs=ws, grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(len(ws),)],
            output_dtypes=[mx.uint64]))
        out.append((f"weight table capture d={dims['d']} {dtype} BITS={bits}",
                    _mlx_like_source(kw, ckw)))
    temporal_kernel.BLOCKS_PER_SM, temporal_kernel.LOADS = saved
    temporal_kernel.PREFETCH, temporal_kernel.MMA = saved_pf, saved_mma
    depth_kernel.shared_memory_per_sm = smem
    return out


def _captured_all(fn) -> list[tuple[dict, dict]]:
    """(declaration, call) of every kernel `fn` builds, captured instead of run."""
    calls = []
    orig = mx.fast.cuda_kernel

    def capture(**kw):
        def call(**ckw):
            calls.append((kw, ckw))
            return [mx.zeros(sh, dtype=dt) for sh, dt in zip(ckw["output_shapes"], ckw["output_dtypes"])]
        return call

    from engine.lm import sample_kernel, temporal_kernel
    from engine.mimi import transformer_kernel
    caches = (fused._kernel, depth_kernel._kernel, sample_kernel._kernel, temporal_kernel._kernel,
              temporal_kernel._capture_kernel, transformer_kernel._kernel)
    mx.fast.cuda_kernel = capture
    for cache in caches:
        cache.cache_clear()
    try:
        fn()
    finally:
        mx.fast.cuda_kernel = orig
        for cache in caches:
            cache.cache_clear()
    return calls


def _captured(fn) -> tuple[dict, dict]:
    """(declaration, call) of the one fused kernel `fn` builds, captured instead of run."""
    return _captured_all(fn)[0]


def _mimi_transformer(d: int, heads: int, ffn: int, context: int, kernel: bool, seed: int = 0,
                      layers: int = 8, weights: str = "float32"):
    """A Mimi transformer of random weights of the given widths (kernels on or off), its matrices
    stored as `weights` ("float32" or "bfloat16")."""
    from engine.mimi.transformer import MimiTransformer
    rng = np.random.default_rng(seed)

    def m(n, k):
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    def v(n, lo, hi):
        return rng.uniform(lo, hi, n).astype(np.float32)

    params = [{"norm1.weight": v(d, 0.5, 1.5), "norm1.bias": v(d, -0.1, 0.1),
               "norm2.weight": v(d, 0.5, 1.5), "norm2.bias": v(d, -0.1, 0.1),
               "self_attn.in_proj_weight": m(3 * d, d), "self_attn.out_proj.weight": m(d, d),
               "linear1.weight": m(ffn, d), "linear2.weight": m(d, ffn),
               "layer_scale_1.scale": v(d, 0.05, 0.3), "layer_scale_2.scale": v(d, 0.05, 0.3)}
              for _ in range(layers)]
    return MimiTransformer(params, d_model=d, num_heads=heads, context=context,
                           max_period=10000.0, positions_per_frame=2, kernel=kernel,
                           weights=weights)


def _mimi_kernel_sources() -> list[tuple[str, str]]:
    """Mimi's five transformer kernels as MLX would build them, at Mimi's widths and the tiny's,
    with float32 and bf16 weights."""
    out = []
    for weights in ("float32", "bfloat16"):
        for d, heads, ffn in ((512, 8, 2048), (32, 2, 64)):
            tr = _mimi_transformer(d, heads, ffn, 250, kernel=True, layers=1, weights=weights)
            for kw, ckw in _captured_all(lambda: tr.apply(mx.zeros((2, d)), tr.plan(2))):
                out.append((f"{kw['name'].split('_')[2]} (Mimi transformer d={d}, {weights} "
                            f"weights)", _mlx_like_source(kw, ckw)))
    return out


def _mimi_kernel_numerics(weights: str, frames: int) -> tuple[str, object, object]:
    """Frames through the kernels against the MLX operations (both with `weights` matrices) at
    Mimi's widths across a ring wrap: the report line, and the two transformers (MLX, kernels)."""
    ref = _mimi_transformer(512, 8, 2048, 250, kernel=False, weights=weights)
    kern = _mimi_transformer(512, 8, 2048, 250, kernel=True, weights=weights)
    worst = worst_ring = 0.0
    rng = np.random.default_rng(1)
    for i in range(frames):
        x = mx.array(rng.standard_normal((2, 512)).astype(np.float32))
        got, want = kern(x), ref(x)
        mx.eval(got, want, kern.state_arrays(), ref.state_arrays())
        worst = max(worst, rel_err(got, want))
        if i in (0, 124, 125, frames - 1):
            worst_ring = max(worst_ring, max(rel_err(a, b) for a, b in zip(kern.state_arrays(),
                                                                          ref.state_arrays())))
    ok = worst <= 1e-3 and worst_ring <= 1e-3
    line = (f"{'ok  ' if ok else 'FAIL'} Mimi transformer kernels, {weights} weights, {frames} "
            f"frames (ring wraps at 125): worst out rel err {worst:.2e}, rings {worst_ring:.2e}")
    return line, ref, kern


def _mimi_frame_timings(transformers: dict, reps: int) -> list[str]:
    """A compiled transformer frame's time (Python build / MLX encode / device wait), each way."""
    def compiled(tr):
        def f(x, plan_arrays, states):
            tr.set_state_arrays(states)
            out = tr.apply(x, plan.with_arrays(plan_arrays))
            return out, tr.state_arrays()
        return mx.compile(f)

    lines = []
    for name, tr in transformers.items():
        tr.reset()
        for _ in range(3):
            tr(mx.zeros((2, 512)))
        plan = tr.plan(2)
        fn = compiled(tr)
        b, h, w = [], [], []
        for _ in range(reps):
            plan = tr.plan(2)
            t0 = time.perf_counter()
            out, states = fn(mx.zeros((2, 512)), plan.arrays(), tr.state_arrays())
            t1 = time.perf_counter()
            mx.async_eval(out, states)
            t2 = time.perf_counter()
            mx.eval(out, states)
            t3 = time.perf_counter()
            tr.set_state_arrays(states)
            b.append((t1 - t0) * 1e3), h.append((t2 - t1) * 1e3), w.append((t3 - t2) * 1e3)
        lines.append(f"     transformer frame, {name:24s}: build {np.median(b):.3f} / MLX encode "
                     f"{np.median(h):.3f} / wait {np.median(w):.3f} ms (p50)")
    return lines


def check_mimi_kernel(frames: int = 140, reps: int = 30) -> list[str]:
    """engine/mimi/transformer_kernel.py at Mimi's widths (8 layers, d 512, 8 heads, 2048, a ring
    of 250), with float32 and with bf16 weights: frames through the kernels against the MLX
    operations across a ring wrap; then a compiled frame's time each way (Python build / MLX
    encode / device wait), and whole codec frames (full-size Mimi, random weights) with the
    kernels on and off."""
    from engine.config import default_mimi_config
    from engine.mimi import Mimi
    from engine.mimi.weights import random_mimi_weights
    lines, transformers = [], {}
    for kind in ("float32", "bfloat16"):
        line, ref, kern = _mimi_kernel_numerics(kind, frames)
        lines.append(line)
        transformers[f"MLX operations, {kind}"] = ref
        transformers[f"kernels, {kind}"] = kern
    lines += _mimi_frame_timings(transformers, reps)
    cfg = default_mimi_config()
    weights = random_mimi_weights(cfg, 0)
    codecs = {}
    for kind in ("float32", "bfloat16"):
        for name, env in (("kernels off", "0"), ("kernels on", "1")):
            os.environ["PARLEY_MIMI_KERNEL"] = env
            codecs[f"{name}, {kind} weights"] = Mimi.from_weights(weights, cfg,
                                                                  transformer_weights=kind)
    os.environ.pop("PARLEY_MIMI_KERNEL")
    for m in codecs.values():
        m.reset()
    rng = np.random.default_rng(1)
    pcm = (0.1 * rng.standard_normal(cfg.frame_size)).astype(np.float32)
    codes = rng.integers(0, cfg.quantizer.bins, 8)
    times = {(n, k): [] for n in codecs for k in ("encode", "decode")}
    for i in range(reps + 5):
        for name, m in codecs.items():
            for kind, fn in (("encode", lambda: m.encode_step(pcm)), ("decode", lambda: m.decode_step(codes))):
                t0 = time.perf_counter()
                mx.eval(fn())
                if i >= 5:
                    times[(name, kind)].append((time.perf_counter() - t0) * 1e3)
    for (name, kind), t in times.items():
        lines.append(f"     full-size Mimi {kind} frame, {name}: p50 {np.median(t):.3f} ms")
    return lines


def _barrier_probe_source() -> tuple[str, str]:
    kw, ckw = _captured(lambda: barrier_cost(1))  # only the captured source matters here
    return "grid barrier probe", _mlx_like_source(kw, ckw)


def _product_sources() -> list[tuple[str, str]]:
    """Every fused.py kernel as MLX would build it for the engine's calls (captured from the real
    wrappers): the 7B temporal and depth shapes at 4 and 8 bits and bf16, and a tiny float32."""
    out = []
    saved = fused.SPLIT_X
    for bits, dtype, shapes, split in ((4, mx.bfloat16, ((4096, 11264, 32), (1024, 2816, 16)), False),
                                       (8, mx.bfloat16, ((4096, 11264, 32), (1024, 2816, 16)), False),
                                       (0, mx.bfloat16, ((4096, 11264, 32), (1024, 2816, 16)), False),
                                       (0, mx.float32, ((64, 176, 4),), False),
                                       (4, mx.bfloat16, ((4096, 11264, 32),), True),
                                       (8, mx.bfloat16, ((4096, 11264, 32),), True)):
        fused.SPLIT_X = split
        for d, h, heads in shapes:
            x = mx.zeros((1, 1, d), dtype=dtype)
            alpha = mx.ones((d,), dtype=mx.float32)
            sq, big = make_linear(d, d, bits, dtype, 1), make_linear(2 * h, d, bits, dtype, 2)
            down, qkvl = make_linear(d, h, bits, dtype, 3), make_linear(3 * d, d, bits, dtype, 4)
            pos = mx.array([5], dtype=mx.int32)
            q = mx.zeros((1, heads, 1, d // heads), dtype=dtype)
            for label, fn in (("gemv", lambda: fused.gemv(x, sq)),
                              ("gemv+norm+res", lambda: fused.gemv(x, sq, alpha=alpha, res=x)),
                              ("gated", lambda: fused.gemv_gated(x, alpha, big)),
                              ("down+res", lambda: fused.gemv(mx.zeros((1, 1, h), dtype), down, res=x)),
                              ("qkv+rope", lambda: fused.qkv(x, alpha, qkvl, heads, pos)),
                              ("qkv", lambda: fused.qkv(x, alpha, qkvl, heads)),
                              ("attn nkv=3", lambda: fused.attn_gemv(q, [q] * 3, [q] * 3, sq, x, heads, 0.125))):
                kw, ckw = _captured(fn)
                rw = dict(ckw["template"])["RW"]
                out.append((f"{label} d={d} {dtype} BITS={bits} RW={rw}{' split' if split else ''}",
                            _mlx_like_source(kw, ckw)))
    fused.SPLIT_X = saved
    for dtype, heads, hd, slots in ((mx.bfloat16, 32, 128, 2999), (mx.float32, 4, 16, 7)):
        def ring():
            q = mx.zeros((1, heads, 1, hd), dtype=dtype)
            keys = mx.zeros((1, heads, slots, hd), dtype=dtype)
            return fused.ring_attention(q, q, q, keys, keys, mx.array([3, 4], dtype=mx.int32),
                                        mx.zeros((heads,), dtype=mx.uint32), 0.125)
        kw, ckw = _captured(ring)
        out.append((f"ring attention {dtype} hd={hd} S={slots}", _mlx_like_source(kw, ckw)))

        def ring_q8():
            q = mx.zeros((1, heads, 1, hd), dtype=dtype)
            keys = mx.zeros((1, heads, slots, hd), dtype=mx.uint8)
            params = mx.zeros((1, heads, slots, 2), dtype=mx.float32)
            return fused.ring_attention(q, q, q, keys, keys, mx.array([3, 4], dtype=mx.int32),
                                        mx.zeros((heads,), dtype=mx.uint32), 0.125, params, params)
        kw, ckw = _captured(ring_q8)
        out.append((f"ring attention {dtype} hd={hd} S={slots} 8-bit ring",
                    _mlx_like_source(kw, ckw)))
    from engine.lm import sample_kernel
    for dtype, V, k in ((mx.bfloat16, 2048, 250), (mx.bfloat16, 32000, 25), (mx.float32, 64, 0)):
        forced = mx.zeros((9, 2), dtype=mx.int32)
        kw, ckw = _captured(lambda: sample_kernel.sample_topk(
            mx.zeros((V,), dtype=dtype), mx.zeros((V,)), 0.8, k, forced, 3))
        out.append((f"top-k sampler {dtype} V={V} k={k}", _mlx_like_source(kw, ckw)))
    return out


def _mlx_like_source(kw: dict, ckw: dict) -> str:
    """The translation unit MLX's `cuda_kernel` builds from a kernel's declaration and one call:
    a `const` pointer per input (typed by its dtype), a pointer per output, then the template
    constants, then the body."""
    params = [f"const {CUDA_TYPES[a.dtype]}* {n}" for n, a in zip(kw["input_names"], ckw["inputs"])]
    params += [f"{CUDA_TYPES[d]}* {n}" for n, d in zip(kw["output_names"], ckw["output_dtypes"])]
    lines = []
    for name, v in ckw.get("template") or []:
        if isinstance(v, mx.Dtype):
            lines.append(f"  using {name} = {CUDA_TYPES[v]};")
        elif isinstance(v, bool):
            lines.append(f"  constexpr bool {name} = {'true' if v else 'false'};")
        else:
            lines.append(f"  constexpr int {name} = {int(v)};")
    return ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n"
            + kw.get("header", "") + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            + "__global__ void kern(" + ", ".join(params) + ") {\n" + "\n".join(lines) + "\n"
            + kw["source"] + "\n}\n}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", help="compile-only check with this libnvrtc")
    ap.add_argument("--include", action="append", default=[])
    ap.add_argument("--ptxas-info", action="store_true",
                    help="with --nvrtc: compile to sm_90 code and print registers and spills")
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="4-bit and the tiny float32 model only (numerics and timings)")
    ap.add_argument("--products", action="store_true",
                    help="the products only: 4-bit and tiny float32 numerics, attention and "
                         "product timings (no step kernel)")
    ap.add_argument("--sampler", action="store_true",
                    help="only the opt-in kernels' checks: the top-k sampler (exact draws against "
                         "an oracle, and its distribution) and PARLEY_GEMV_SPLIT == plain")
    ap.add_argument("--ring", action="store_true",
                    help="only the ring attention kernel: numerics, then its timing beside MLX's")
    ap.add_argument("--temporal-kernel", action="store_true",
                    help="only the temporal step kernel: numerics against the fused step with "
                         "ring attention (7B widths, 9 layers, 4 and 8 bits; tiny float32), "
                         "then step timings")
    ap.add_argument("--configs", nargs="*", default=["1,0", "1,8", "2,0", "2,8", "2,4", "3,4"],
                    help="with --temporal-kernel: launch configurations to compare, each "
                         "BLOCKS_PER_SM,LOADS[,RING_DPL,RING_CHUNK[,PREFETCH[,MMA]]] (0: the default; "
                         "MMA n: tensor-core products where they fit, n steps of 128 values loaded "
                         "ahead)")
    ap.add_argument("--q8-configs", action="store_true",
                    help="with --temporal-kernel: compare the configurations over an 8-bit ring "
                         "too (4-bit weights)")
    ap.add_argument("--configs-only", action="store_true",
                    help="with --temporal-kernel: only the configurations' comparison")
    ap.add_argument("--q8-only", action="store_true",
                    help="with --temporal-kernel: only the step over an 8-bit KV ring")
    ap.add_argument("--mimi", action="store_true",
                    help="only Mimi's transformer kernels: numerics against the MLX operations "
                         "across a ring wrap, then frame timings")
    ap.add_argument("--depth-only", action="store_true",
                    help="with --quick: only the depth step kernel (numerics, frame timings)")
    args = ap.parse_args()
    if args.nvrtc:
        sys.exit(1 if nvrtc_compile_all(args.nvrtc, args.include, args.ptxas_info) else 0)
    if not fused.enabled():
        sys.exit("The fused kernels need MLX's CUDA backend (run this on the GPU machine).")
    seven_b = {"d": 4096, "hidden": 11264, "heads": 32}
    depth = {"d": 1024, "hidden": 2816, "heads": 16}
    tiny = {"d": 64, "hidden": 176, "heads": 4}
    fails = 0

    def report(title: str, lines: list[str]) -> int:
        print("== " + title)
        for line in lines:
            print("  " + line)
        return sum(line.startswith("FAIL") for line in lines)

    if args.mimi:
        fails += report("Mimi transformer kernels (engine/mimi/transformer_kernel.py)",
                        check_mimi_kernel())
        print("numerics:", "all ok" if not fails else f"{fails} FAILED")
        return
    if args.sampler:
        fails += report("top-k sampler (engine/lm/sample_kernel.py)", check_sampler())
        fails += report("products taking x 16 bytes at a time (PARLEY_GEMV_SPLIT)",
                        check_split_identity())
        print("numerics:", "all ok" if not fails else f"{fails} FAILED")
        return
    if args.temporal_kernel:
        seven_b_ring = {**seven_b, "slots": 2999}
        if not args.configs_only:
            for bits, dtype, dims, q8 in ((4, mx.bfloat16, seven_b_ring, False),
                                          (4, mx.bfloat16, seven_b_ring, True),
                                          (8, mx.bfloat16, seven_b_ring, False),
                                          (0, mx.float32, {**tiny, "slots": 7}, False),
                                          (0, mx.float32, {**tiny, "slots": 7}, True)):
                if args.q8_only and not q8:
                    continue
                fails += report(f"temporal step kernel {dtype} bits={bits} d={dims['d']}"
                                f"{', 8-bit ring' if q8 else ''}",
                                check_temporal_kernel(dtype, bits, dims, reps=20 if bits else 3,
                                                      q8=q8))
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs]
        for bits in () if args.q8_only else (4, 8):
            fails += report(f"temporal step kernel configurations, bf16 bits={bits}, 7B widths, "
                            f"one launch of 8 layers",
                            temporal_kernel_configs(mx.bfloat16, bits, seven_b_ring, configs))
        if args.q8_configs:  # the engine's default ring with quantized weights
            fails += report("temporal step kernel configurations, bf16 bits=4, 7B widths, "
                            "8-bit ring, one launch of 8 layers",
                            temporal_kernel_configs(mx.bfloat16, 4, seven_b_ring, configs, q8=True))
        print("numerics:", "all ok" if not fails else f"{fails} FAILED")
        return
    if args.ring:
        fails += report("ring attention bf16, 7B shape", check_ring_attention(mx.bfloat16, 32, 128, 2999))
        fails += report("ring attention float32, tiny shape", check_ring_attention(mx.float32, 4, 16, 7))
        fails += report("8-bit ring attention bf16, 7B shape",
                        check_ring_attention_q8(mx.bfloat16, 32, 128, 2999))
        fails += report("8-bit ring attention float32, tiny shape",
                        check_ring_attention_q8(mx.float32, 4, 16, 7))
        for line in ceilings_and_attention()[1:]:
            print(line, flush=True)
        print("numerics:", "all ok" if not fails else f"{fails} FAILED")
        return
    if args.products:
        for bits, dtype, dims, name in ((4, mx.bfloat16, seven_b, "7B temporal"),
                                        (8, mx.bfloat16, seven_b, "7B temporal"),
                                        (0, mx.bfloat16, seven_b, "7B temporal"),
                                        (4, mx.bfloat16, depth, "7B depth"),
                                        (0, mx.float32, tiny, "tiny")):
            fails += report(f"{name} {dtype} bits={bits}", check_numerics(dtype, bits, dims))
        fails += report("ring attention bf16, 7B shape", check_ring_attention(mx.bfloat16, 32, 128, 2999))
        fails += report("ring attention float32, tiny shape", check_ring_attention(mx.float32, 4, 16, 7))
        for line in ceilings_and_attention() + timings(4):
            print(line, flush=True)
        print("numerics:", "all ok" if not fails else f"{fails} FAILED")
        return
    for dtype, bits_list in ((mx.bfloat16, (4, 8, 0)), (mx.float32, (0,))):
        for bits in () if args.depth_only else bits_list:
            for name, dims in (("7B temporal", seven_b), ("7B depth", depth), ("tiny", tiny)):
                if bits and dims is tiny:
                    continue
                if args.quick and (bits != 4 and dims is not tiny or dtype == mx.bfloat16 and dims is tiny):
                    continue
                fails += report(f"{name} {dtype} bits={bits}", check_numerics(dtype, bits, dims))
    seven_b_depth = {"d": 1024, "hidden": 2816, "heads": 16, "hin": 4096, "card": 2048}
    tiny_depth = {"d": 16, "hidden": 44, "heads": 2, "hin": 32, "card": 64, "layers": 2,
                  "text_card": 70}
    tiny_depth_q = {**tiny_depth, "d": 32}  # tables and heads quantizable in groups of 32
    for dtype, bits, dims, name, tables in ((mx.bfloat16, 4, seven_b_depth, "7B depth", 4),
                                            (mx.bfloat16, 4, seven_b_depth, "7B depth", 0),
                                            (mx.bfloat16, 8, seven_b_depth, "7B depth", 8),
                                            (mx.bfloat16, 0, seven_b_depth, "7B depth", 0),
                                            (mx.float32, 0, tiny_depth, "tiny depth", 0),
                                            (mx.float32, 0, tiny_depth_q, "tiny depth", 4)):
        if args.quick and (bits in (8, 0) and dtype == mx.bfloat16 or bits == 4 and not tables):
            continue
        fails += report(f"step kernel, {name} {dtype} bits={bits} tables/heads bits={tables}",
                        check_depth_step_kernel(dtype, bits, dims, tables=tables))
    os.environ["PARLEY_DEPTH_BARRIER"] = "acqrel"  # the experimental barrier, same checks
    lines = check_depth_step_kernel(mx.bfloat16, 4, seven_b_depth)
    os.environ.pop("PARLEY_DEPTH_BARRIER")
    fails += report("step kernel, 7B depth bfloat16 bits=4, acquire/release barriers", lines)
    if not args.no_timings:
        for line in ceilings_and_attention() + barrier_cost():
            print(line, flush=True)
        for bits in (4,) if args.quick else (4, 8):
            for line in time_depth_steps(bits):
                print(line, flush=True)
        if not args.quick:
            for line in dispatch_costs():
                print(line)
        for bits in () if args.depth_only else (4,) if args.quick else (4, 8):
            for line in timings(bits):
                print(line, flush=True)
    print("numerics:", "all ok" if not fails else f"{fails} FAILED")


if __name__ == "__main__":
    main()
