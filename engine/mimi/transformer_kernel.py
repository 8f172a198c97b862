"""Mimi's streaming transformer step as five CUDA kernels a layer, on MLX's CUDA backend only.

Why: a live frame runs each of Mimi's two 8-layer transformers (encoder and decoder side) over
the frame's P = 2 positions. As MLX operations that is ~20 kernels a layer (layer norms, products,
RoPE, concatenations onto the KV ring, the masked softmax, slice updates), ~160 a transformer,
and on CUDA each costs MLX 5-10 µs of host time to issue however little it computes: with the
SEANet convolutions around them, Mimi's encode and decode took ~3.5-3.9 ms of host time each
(docs/benchmarks.md, session 6), on the critical path of every frame. Here a layer is five
launches:

1. `qkv`:  LayerNorm 1 + in_proj + interleaved RoPE on q and k -> qkv [P, 3D]
2. `attn`: each (head, query) a block: scores over the ring's C slots and the P new keys, the
           plan's additive mask, softmax, weighted values -> attn [P, D]
3. `out`:  out_proj, x + layer_scale_1 * that -> x1; and the P new keys and values written into
           the ring in place (their slots: (start + p) mod C), now that every query has read it
4. `ffn`:  LayerNorm 2 + linear1 + exact GELU -> h [P, F]
5. `down`: linear2, x1 + layer_scale_2 * that -> the layer's output

No grid-wide barriers: a persistent kernel could deadlock beside the LM's (the encoder side runs
on a worker thread's stream, concurrently with the temporal step kernel, and neither grid could
become resident). Weights are [out, in] rows, as the checkpoint stores them (the MLX path reads
the same arrays transposed), in float32 or, with the transformers' bfloat16 option, bf16 (the
template type W, widened exactly as it is loaded), a warp per row (or pair of rows, for RoPE's
pairs), each lane taking four weights at a time (16 bytes, or 8 in bf16); sums are float32 like
the MLX path's, in another order, so results agree within float32 rounding (not bit for bit).

The ring arrays must be materialised, contiguous and used by nothing else at the same time
(`MimiTransformer.reset` evaluates them when the kernels are on).
"""

from __future__ import annotations

import functools
import hashlib
import os

import mlx.core as mx

from engine.lm import fused

WARPS = 8  # warps a block
NT = WARPS * 32

_HELPERS = r"""
namespace parley_mimi {

using parley::warp_sum;

__device__ __forceinline__ float dot4(const float4 a, const float4 b) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, a.w * b.w)));
}

// LayerNorm (eps 1e-5, weight w, bias b) of P rows of x [P][K] into shared xs [P][K]: warp p
// takes row p (mean, then the variance about it), then the block synchronises.
template <int K, int P, int NW>
__device__ __forceinline__ void layer_norm_rows(const float* x, const float* w, const float* b,
                                                float* xs) {
  constexpr int KV = K / 4;
  constexpr int N = (KV + 31) / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int p = warp; p < P; p += NW) {
    const float4* xr = reinterpret_cast<const float4*>(x + p * K);
    float4 v[N];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int c = lane + 32 * i;
      v[i] = (KV % 32 == 0 || c < KV) ? xr[c] : make_float4(0.f, 0.f, 0.f, 0.f);
      s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
    }
    const float mean = warp_sum(s) / (float)K;
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int c = lane + 32 * i;
      if (KV % 32 == 0 || c < KV) {
        const float a = v[i].x - mean, bb = v[i].y - mean, cc = v[i].z - mean, d = v[i].w - mean;
        ss = fmaf(a, a, fmaf(bb, bb, fmaf(cc, cc, fmaf(d, d, ss))));
      }
    }
    const float r = rsqrtf(warp_sum(ss) / (float)K + 1e-5f);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    const float4* b4 = reinterpret_cast<const float4*>(b);
    float4* out = reinterpret_cast<float4*>(xs + p * K);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int c = lane + 32 * i;
      if (KV % 32 == 0 || c < KV) {
        const float4 wv = __ldg(w4 + c), bv = __ldg(b4 + c);
        out[c] = make_float4(fmaf((v[i].x - mean) * r, wv.x, bv.x), fmaf((v[i].y - mean) * r, wv.y, bv.y),
                             fmaf((v[i].z - mean) * r, wv.z, bv.z), fmaf((v[i].w - mean) * r, wv.w, bv.w));
      }
    }
  }
  __syncthreads();
}

// Weights 4i .. 4i+3 of w as floats: one 16-byte load of float32, or one 8-byte load of bf16
// (a bf16 is the top half of the float it widens to, so the widening is exact).
__device__ __forceinline__ float4 load4(const float* w, size_t i) {
  return __ldg(reinterpret_cast<const float4*>(w) + i);
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* w, size_t i) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(w) + i);
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                     __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}

// acc[r][p] = w[row0 + r] . x[p] for RW rows of w [*][K] (float32 or bf16 rows) and P rows of
// x [P][K] (shared or global memory), summed over the warp (every lane gets them).
template <int K, int RW, int P, typename W>
__device__ __forceinline__ void rows_dot(const float* x, const W* w, int row0,
                                         float (&acc)[RW][P], int lane) {
  constexpr int KV = K / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll
  for (int r = 0; r < RW; ++r) {
#pragma unroll
    for (int p = 0; p < P; ++p) acc[r][p] = 0.f;
  }
#pragma unroll 4
  for (int c = lane; c < KV; c += 32) {
    float4 wv[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) wv[r] = load4(w, (size_t)(row0 + r) * KV + c);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const float4 xv = x4[p * KV + c];
#pragma unroll
      for (int r = 0; r < RW; ++r) acc[r][p] += dot4(wv[r], xv);
    }
  }
#pragma unroll
  for (int r = 0; r < RW; ++r) {
#pragma unroll
    for (int p = 0; p < P; ++p) acc[r][p] = warp_sum(acc[r][p]);
  }
}

__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = parley::warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < (int)(blockDim.x >> 5) ? red[lane] : __int_as_float(0xff800000);
    t = parley::warp_max(t);
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  const float m = red[0];
  __syncthreads();
  return m;
}

}  // namespace parley_mimi
"""

# 1. LayerNorm 1 + in_proj + RoPE (rows in pairs: a pair (2i, 2i+1) is one rotation).
_QKV = r"""
  using namespace parley_mimi;
  __shared__ __align__(16) float xs[P * D];
  layer_norm_rows<D, P, WARPS>(x, nw, nb, xs);
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (t * 2 >= 3 * D) return;
  float acc[2][P];
  rows_dot<D, 2, P, W>(xs, w, t * 2, acc, lane);
  if (lane == 0) {
    const int row = t * 2;
    const int i = (row % HD) / 2;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      float a = acc[0][p], b = acc[1][p];
      if (row < 2 * D) {
        const float c = cosv[p * (HD / 2) + i], s = sinv[p * (HD / 2) + i];
        const float ra = a * c - b * s, rb = a * s + b * c;
        a = ra;
        b = rb;
      }
      qkv[p * 3 * D + row] = a;
      qkv[p * 3 * D + row + 1] = b;
    }
  }
"""

# 2. Attention of query t, head h (a block each) over the ring's C slots and the P new keys.
_ATTN = r"""
  using namespace parley_mimi;
  constexpr int NK = C + P;
  constexpr int DL = (HD + 31) / 32;
  __shared__ float sc[NK];
  __shared__ float red[32];
  __shared__ float part[WARPS * HD];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.x / P, t = blockIdx.x % P;
  float qv[DL];
#pragma unroll
  for (int i = 0; i < DL; ++i) {
    const int d = lane + 32 * i;
    qv[i] = (HD % 32 == 0 || d < HD) ? qkv[t * 3 * D + h * HD + d] : 0.f;
  }
  const float* mrow = mask + t * NK;
  for (int j = warp; j < NK; j += WARPS) {
    const float* kr = j < C ? kring + ((size_t)h * C + j) * HD : qkv + (j - C) * 3 * D + D + h * HD;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < DL; ++i) {
      const int d = lane + 32 * i;
      if (HD % 32 == 0 || d < HD) s = fmaf(qv[i], kr[d], s);
    }
    s = warp_sum(s);
    if (lane == 0) sc[j] = s * SCALE + mrow[j];
  }
  __syncthreads();
  float m = __int_as_float(0xff800000);
  for (int j = threadIdx.x; j < NK; j += WARPS * 32) m = fmaxf(m, sc[j]);
  m = block_max(m, red);
  float total = 0.f;
  for (int j = threadIdx.x; j < NK; j += WARPS * 32) {
    const float e = expf(sc[j] - m);
    sc[j] = e;
    total += e;
  }
  total = parley::block_sum(total, red);
  float o[DL];
#pragma unroll
  for (int i = 0; i < DL; ++i) o[i] = 0.f;
  for (int j = warp; j < NK; j += WARPS) {
    const float pj = sc[j];
    if (pj == 0.f) continue;  // a masked slot (an empty ring's): its value is never needed
    const float* vr = j < C ? vring + ((size_t)h * C + j) * HD : qkv + (j - C) * 3 * D + 2 * D + h * HD;
#pragma unroll
    for (int i = 0; i < DL; ++i) {
      const int d = lane + 32 * i;
      if (HD % 32 == 0 || d < HD) o[i] = fmaf(pj, vr[d], o[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < DL; ++i) {
    const int d = lane + 32 * i;
    if (HD % 32 == 0 || d < HD) part[warp * HD + d] = o[i];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < HD; d += WARPS * 32) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += part[w * HD + d];
    attn[t * D + h * HD + d] = s / total;
  }
"""

# 3. out_proj + layer scale + residual; the new keys and values into the ring (in place).
_OUT = r"""
  using namespace parley_mimi;
  const int lane = threadIdx.x & 31;
  {
    const int i = blockIdx.x * WARPS * 32 + threadIdx.x;
    if (i < P * 2 * D) {
      const int p = i / (2 * D), which = (i / D) % 2, c = i % D;
      const int slot = (start[0] + p) % C;
      float* ring = const_cast<float*>(which ? vring : kring);
      ring[((size_t)(c / HD) * C + slot) * HD + c % HD] = qkv[p * 3 * D + (1 + which) * D + c];
    }
  }
  const int t = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (t >= D) return;
  float acc[1][P];
  rows_dot<D, 1, P, W>(attn, w, t, acc, lane);
  if (lane == 0) {
#pragma unroll
    for (int p = 0; p < P; ++p) y[p * D + t] = x[p * D + t] + ls[t] * acc[0][p];
  }
"""

# 4. LayerNorm 2 + linear1 + exact GELU.
_FFN = r"""
  using namespace parley_mimi;
  __shared__ __align__(16) float xs[P * D];
  layer_norm_rows<D, P, WARPS>(x, nw, nb, xs);
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (t * 2 >= F) return;
  float acc[2][P];
  rows_dot<D, 2, P, W>(xs, w, t * 2, acc, lane);
  if (lane < 2) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const float v = acc[lane][p];
      hg[p * F + t * 2 + lane] = v * 0.5f * (1.f + erff(v * 0.7071067811865476f));
    }
  }
"""

# 5. linear2 + layer scale + residual.
_DOWN = r"""
  using namespace parley_mimi;
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (t >= D) return;
  float acc[1][P];
  rows_dot<F, 1, P, W>(hg, w, t, acc, lane);
  if (lane == 0) {
#pragma unroll
    for (int p = 0; p < P; ++p) y[p * D + t] = x[p * D + t] + ls[t] * acc[0][p];
  }
"""

_KINDS = {
    "qkv": (_QKV, ["x", "nw", "nb", "w", "cosv", "sinv"], ["qkv"]),
    "attn": (_ATTN, ["qkv", "kring", "vring", "mask"], ["attn"]),
    "out": (_OUT, ["x", "attn", "w", "ls", "qkv", "kring", "vring", "start"], ["y"]),
    "ffn": (_FFN, ["x", "nw", "nb", "w"], ["hg"]),
    "down": (_DOWN, ["x", "hg", "w", "ls"], ["y"]),
}


@functools.cache
def _kernel(kind: str, scale: float = 0.0):
    src, inputs, outputs = _KINDS[kind]
    src = src.replace("SCALE", repr(float(scale)) + "f")
    header = fused._HEADER + _HELPERS
    # MLX caches compiled kernels on disk by name: the name carries a digest of the source.
    digest = hashlib.sha1((header + src).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"parley_mimi_{kind}_{digest}", input_names=inputs,
                               output_names=outputs, source=src, header=header)


def enabled() -> bool:
    """Whether Mimi's transformers run through these kernels: MLX's CUDA backend is the default
    device and PARLEY_MIMI_KERNEL is not 0."""
    return os.environ.get("PARLEY_MIMI_KERNEL", "1") != "0" and fused.enabled()


def supports(d_model: int, num_heads: int, dim_feedforward: int) -> bool:
    """Whether a transformer of these widths fits the kernels' layout (16-byte rows, whole heads,
    rotation pairs)."""
    return (d_model % 4 == 0 and dim_feedforward % 4 == 0 and d_model % num_heads == 0
            and (d_model // num_heads) % 2 == 0)


def _blocks(warp_tasks: int) -> int:
    return -(-warp_tasks // WARPS)


def apply(tr, x: mx.array, plan) -> mx.array:
    """`MimiTransformer.apply` for one frame's P positions (x [P, D] float32), through the
    kernels: the same result within float32 rounding, the rings written in place. The weight
    kernels take the matrices' storage type as W (float32 or bfloat16)."""
    P, D = x.shape
    H, HD, C = tr.num_heads, tr.head_dim, tr.context
    F = int(tr.layers[0].linear1.shape[0])
    cos, sin = plan.cos.reshape(-1), plan.sin.reshape(-1)
    mask = plan.mask.reshape(-1)
    start = plan.starts[0]  # the first position's slot; the others follow it round the ring
    f32 = mx.float32
    base = [("P", P), ("D", D), ("WARPS", WARPS)]
    x = x.reshape(P * D)
    for i, L in enumerate(tr.layers):
        kr, vr = tr.ring_k[i], tr.ring_v[i]
        (qkv,) = _kernel("qkv")(
            inputs=[x, L.norm1_w, L.norm1_b, L.in_proj, cos, sin],
            template=base + [("HD", HD), ("W", L.in_proj.dtype)], output_shapes=[(P * 3 * D,)],
            output_dtypes=[f32],
            grid=(_blocks(3 * D // 2) * NT, 1, 1), threadgroup=(NT, 1, 1))
        (attn,) = _kernel("attn", tr.scale)(
            inputs=[qkv, kr, vr, mask], template=base + [("HD", HD), ("C", C)],
            output_shapes=[(P * D,)], output_dtypes=[f32],
            grid=(H * P * NT, 1, 1), threadgroup=(NT, 1, 1))
        (x1,) = _kernel("out")(
            inputs=[x, attn, L.out_proj, L.scale1, qkv, kr, vr, start],
            template=base + [("HD", HD), ("C", C), ("W", L.out_proj.dtype)],
            output_shapes=[(P * D,)], output_dtypes=[f32],
            grid=(max(_blocks(D), -(-P * 2 * D // NT)) * NT, 1, 1), threadgroup=(NT, 1, 1))
        (hg,) = _kernel("ffn")(
            inputs=[x1, L.norm2_w, L.norm2_b, L.linear1],
            template=base + [("F", F), ("W", L.linear1.dtype)],
            output_shapes=[(P * F,)], output_dtypes=[f32],
            grid=(_blocks(F // 2) * NT, 1, 1), threadgroup=(NT, 1, 1))
        (x,) = _kernel("down")(
            inputs=[x1, hg, L.linear2, L.scale2],
            template=base + [("F", F), ("W", L.linear2.dtype)],
            output_shapes=[(P * D,)], output_dtypes=[f32],
            grid=(_blocks(D) * NT, 1, 1), threadgroup=(NT, 1, 1))
    return x.reshape(P, D)
