"""What one MLX primitive costs on this device: chains of N dependent operations of one kind,
evaluated once, timed per operation (wall, after warm-up). Shows whether a stage is bound by
dispatch or by the work itself, and which kinds of operation are expensive to issue (kernels
MLX writes itself vs. library calls that MLX records by stream capture: cuBLAS, cuDNN).

    python3 scripts/bench_mlx_dispatch.py [--n 200] [--reps 5]

Run under different MLX environment settings (MLX_USE_CUDA_GRAPHS, MLX_MAX_OPS_PER_BUFFER,
MLX_CUDA_USE_CUDNN_SDPA) to compare them. Not a unit test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(build, n: int, reps: int) -> tuple[float, float]:
    """(µs per op wall, µs per op spent before async_eval returned) for a chain of n ops."""
    walls, hosts = [], []
    for r in range(reps + 2):
        out = build(n)
        t0 = time.perf_counter()
        mx.async_eval(out)
        t1 = time.perf_counter()
        mx.eval(out)
        t2 = time.perf_counter()
        if r >= 2:
            walls.append((t2 - t0) / n * 1e6)
            hosts.append((t1 - t0) / n * 1e6)
    return statistics.median(walls), statistics.median(hosts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    bf = mx.bfloat16
    d = 4096
    x0 = mx.random.normal((1, 1, d)).astype(bf)
    w = (mx.random.normal((d, d)) * 0.01).astype(bf)
    wq, sq, bq = mx.quantize(w, group_size=64, bits=4)
    alpha = mx.ones((d,), mx.float32)
    H, hd, C = 32, 128, 3000
    K = mx.random.normal((1, H, C, hd)).astype(bf)
    V = mx.random.normal((1, H, C, hd)).astype(bf)
    q0 = mx.random.normal((1, H, 1, hd)).astype(bf)
    mask = mx.arange(C) != 7
    emb = mx.random.normal((2049, d)).astype(bf)
    m512 = (mx.random.normal((512, 2048)) * 0.02)
    x512 = mx.random.normal((2, 512))
    conv_w = mx.random.normal((512, 3, 512)) * 0.02
    conv_x = mx.random.normal((1, 4, 512))
    mx.eval(x0, w, wq, sq, bq, alpha, K, V, q0, mask, emb, m512, x512, conv_w, conv_x)

    def chain(step, start):
        def build(n):
            y = start
            for _ in range(n):
                y = step(y)
            return y
        return build

    fused10 = mx.compile(lambda y: ((((y * 1.01 + 0.1) * 0.99 - 0.05) * 1.001 + 0.2) * 0.5
                                    + y * 0.5))
    cases = {
        "add (elementwise kernel)": chain(lambda y: y + 1, x0),
        "compiled 8-op elementwise (1 fused kernel)": chain(fused10, x0),
        "fast.rms_norm [1,1,4096] f32": chain(lambda y: mx.fast.rms_norm(y, alpha, 1e-8),
                                              x0.astype(mx.float32)),
        "fast.rope [1,32,1,128]": chain(lambda y: mx.fast.rope(y, hd, traditional=True, base=1e4,
                                                               scale=1.0, offset=5), q0),
        "quantized_matmul 4-bit 4096x4096 (GEMV)": chain(
            lambda y: mx.quantized_matmul(y, wq, sq, bq, transpose=True, group_size=64, bits=4),
            x0),
        "matmul bf16 4096x4096 (GEMV)": chain(lambda y: y @ w, x0),
        "matmul f32 [2,512]x[512,2048]->slice": chain(lambda y: (y @ m512)[:, :512], x512),
        "conv1d f32 k3 512->512 T=4": chain(
            lambda y: mx.pad(mx.conv1d(y, conv_w), [(0, 0), (0, 2), (0, 0)]), conv_x),
        "sdpa decode 32x3000 no mask": chain(
            lambda y: mx.fast.scaled_dot_product_attention(y, K, V, scale=0.088), q0),
        "sdpa decode 32x3000 bool mask": chain(
            lambda y: mx.fast.scaled_dot_product_attention(y, K, V, scale=0.088, mask=mask), q0),
        "sdpa decode 32x300 sliced view": chain(
            lambda y: mx.fast.scaled_dot_product_attention(y, K[:, :, :300], V[:, :, :300],
                                                           scale=0.088), q0),
        "gather rows emb[idx] (take)": chain(
            lambda y: emb[(y[0, 0, :1].astype(mx.int32) % 7)][None], x0),
        "argmax over 2048": chain(lambda y: mx.argmax(y[..., :2048], axis=-1).astype(bf)[..., None]
                                  + y, x0),
    }

    def slice_update_chain(n):
        Kc = K
        for i in range(n):
            Kc = mx.slice_update(Kc, q0, mx.array([i % C]), axes=(2,))
        return Kc

    def static_update_chain(n):
        Kc = K + 0  # a fresh array nothing else holds, so it may be updated in place
        for i in range(n):
            Kc[:, :, i % C: i % C + 1] = q0
        return Kc

    def dynamic_fresh_chain(n):
        Kc = K + 0
        for i in range(n):
            Kc = mx.slice_update(Kc, q0, mx.array([i % C]), axes=(2,))
        return Kc

    cases["slice_update one slot of [1,32,3000,128]"] = slice_update_chain
    cases["  same, dynamic index, fresh base"] = dynamic_fresh_chain
    cases["  same, static index (a[..] = u), fresh base"] = static_update_chain
    wt = (mx.random.normal((2048, 512)) * 0.02)
    wt4 = (mx.random.normal((4096, 4096)) * 0.01).astype(bf)
    mx.eval(wt, wt4)
    cases["matmul bf16 x @ W.T 4096 (gemv?)"] = chain(lambda y: y @ wt4.T, x0)
    cases["matmul f32 [1,512] @ W.T [2048,512]"] = chain(lambda y: (y @ wt.T)[:, :512], x512[:1])
    cases["matmul f32 [2,512] @ W.T [2048,512]"] = chain(lambda y: (y @ wt.T)[:, :512], x512)
    cases["matmul f32 [2,1,512] @ W.T [2048,512]"] = chain(lambda y: (y @ wt.T)[..., :512],
                                                          x512[:, None])
    # Quantized products over 8 distinct weights in turn (more than the 50 MB L2 cache holds),
    # so the weights stream from HBM as a 7B step's do: µs per product and effective GB/s.
    for bits, group, (n_out, n_in) in ((4, 64, (22528, 4096)), (8, 64, (22528, 4096)),
                                       (4, 128, (22528, 4096)), (4, 64, (4096, 11264))):
        ws = []
        for _ in range(8):
            dense = (mx.random.normal((n_out, n_in)) * 0.01).astype(bf)
            ws.append(mx.quantize(dense, group_size=group, bits=bits))
        mx.eval(ws)
        xin = mx.random.normal((1, 1, n_in)).astype(bf)
        nbytes = sum(a.nbytes for a in ws[0])

        def qmm_rotate(n, ws=ws, xin=xin, group=group, bits=bits):
            y = xin
            for i in range(n):
                wq_, s_, b_ = ws[i % 8]
                out = mx.quantized_matmul(y, wq_, s_, b_, transpose=True, group_size=group,
                                          bits=bits)
                y = (out[..., : y.shape[-1]] * 1e-3 + y) if out.shape[-1] >= y.shape[-1] else \
                    mx.pad(out, [(0, 0), (0, 0), (0, y.shape[-1] - out.shape[-1])]) * 1e-3 + y
            return y

        cases[f"qmm {bits}-bit g{group} {n_out}x{n_in} from HBM ({nbytes / 1e6:.0f} MB)"] = qmm_rotate
    logits = mx.random.normal((2048,))
    mx.eval(logits)
    cases["argpartition top-250 of 2048"] = chain(
        lambda y: y + mx.argpartition(-logits - y[0], kth=249)[:1].astype(mx.float32), logits)
    cases["argsort of 2048"] = chain(
        lambda y: y + mx.argsort(-logits - y[0])[:1].astype(mx.float32), logits)
    cases["topk 250 of 2048 (values)"] = chain(
        lambda y: y + mx.topk(logits + y[0], 250)[:1], logits)
    cases["max over 2048"] = chain(lambda y: y + mx.max(y), logits)
    cases["random.uniform 250"] = chain(lambda y: y + mx.random.uniform(shape=(2048,)), logits)
    cases["categorical over 250"] = chain(
        lambda y: y + mx.random.categorical(y[:250]).astype(mx.float32), logits)
    cases["take_along_axis 250 of 2048"] = chain(
        lambda y: y + mx.take_along_axis(y, mx.arange(250), axis=-1)[:1], logits)
    cases["concatenate [1,8,k,64] + [1,8,1,64]"] = chain(
        lambda y: mx.concatenate([y, y[:, :, :1]], axis=2)[:, :, 1:], mx.zeros((1, 8, 4, 64), bf))
    # The KV ring's pattern: one slot written per evaluation, the previous ring dropped.
    ring = {"K": K + 0}
    mx.eval(ring["K"])

    def per_eval(update):
        def build(n):
            t0 = time.perf_counter()
            for i in range(n):
                ring["K"] = update(ring["K"], i % C)
                mx.eval(ring["K"])
            return (time.perf_counter() - t0) / n * 1e6
        return build

    def static_update(a, i):
        a[:, :, i: i + 1] = q0
        return a

    per_eval_cases = {
        "ring write per eval, dynamic slice_update": per_eval(
            lambda a, i: mx.slice_update(a, q0, mx.array([i]), axes=(2,))),
        "ring write per eval, static a[..] = u": per_eval(static_update),
        "eval with nothing new (round trip)": per_eval(lambda a, i: a),
    }
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    print(f"mlx {mx.__version__} {mx.default_device()} env {env}  n={args.n}")
    for name, build in cases.items():
        try:
            wall, host = timed(build, args.n, args.reps)
            print(f"  {name:45s} {wall:8.2f} us/op wall  {host:8.2f} us/op host-encode")
        except Exception as e:  # keep going: one unsupported case should not hide the rest
            print(f"  {name:45s} failed: {type(e).__name__}: {e}")
    for name, build in per_eval_cases.items():
        build(5)
        print(f"  {name:45s} {statistics.median(build(20) for _ in range(3)):8.2f} us per eval")


if __name__ == "__main__":
    main()
