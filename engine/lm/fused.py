"""Fused CUDA kernels for the LM's one-position step, on MLX's CUDA backend only.

Why: on CUDA a live frame is bound by the host issuing kernels (docs/benchmarks.md, "What bounds
it now"): every MLX primitive costs 2-15 µs of CPU time to encode however little work it does,
and a transformer layer at one position is ~18 small kernels (casts, RMSNorm, a quantized
product, RoPE, casts, residual adds, the gated SiLU). These kernels do one layer in four to six:

* `gemv`        — y = W·x for one position, W affine-quantized the MLX way (4 or 8 bits, groups
                  of 32-128 along the input) or plain (bf16 / float32); optionally with the RMSNorm
                  of x in front (`alpha`) and a residual added behind (`res`).
* `gemv_gated`  — RMSNorm, then the gate and linear halves of `linear_in` together, then
                  silu(gate) · up: the whole first half of the feed-forward.
* `qkv`         — RMSNorm, the fused QKV projection and, for the temporal transformer, RoPE on
                  queries and keys; returns q, k and v separately.
* `attn_gemv`   — the depth transformer's attention (one query over the frame's few keys, which
                  come as separate arrays, so nothing is concatenated) followed by the output
                  projection and the residual.
* `ring_attention` — the temporal transformer's attention of one new position over its KV ring,
                  writing the ring slot in place (default; PARLEY_RING_ATTENTION=0 off).

Numerics follow the unfused MLX code step for step: sums and products in float32, and a rounding
to the activation dtype wherever the unfused code stores an intermediate (the normalised input,
the projection, the attention output, the gate), so the fused step reproduces the unfused one to
within float32 summation order. On the CPU or Metal nothing here runs; `enabled()` says whether it
can, and PARLEY_FUSED=0 turns them off. `scripts/check_fused_kernels.py` checks every kernel
against the unfused MLX operations on the device (and compiles every variant with NVRTC
anywhere); on a CUDA machine the engine's reference-parity tests run through them.

The products (`gemv`, `gemv_gated`, `qkv`) read x straight from memory in every warp
(`gemv_direct`), each warp normalising it itself where an RMSNorm comes first, so a product is
many small blocks with no block-wide barrier, like MLX's own quantized product; measured on an
H200 (docs/benchmarks.md, session 5) a 22528x4096 4-bit product streams at 1.7 TB/s, and a
temporal layer through these kernels beats MLX's operations. The attention kernel, and the depth
step kernel (engine/lm/depth_kernel.py), stage their input per block instead. There, the
layout of x in shared memory is transposed (value k of a 16-byte weight load at
`(k % VPL) * (KV + 1) + k / VPL`) so that the 32 lanes of a warp, which read consecutive weight
loads, read consecutive floats instead of hitting one bank 32 times.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os

import mlx.core as mx

from .layers import RMS_EPS, Linear

WARPS = 8  # warps per block; each warp computes RW output rows at a time
# 16-byte weight loads a lane of the direct-read products issues before using any (registers:
# 4 each, plus a scale and a bias each when quantized). PARLEY_GEMV_LOADS overrides it, to measure.
WEIGHT_LOADS = int(os.environ.get("PARLEY_GEMV_LOADS", "8"))
# Experimental (PARLEY_GEMV_SPLIT=1, unmeasured): quantized products take x 16 bytes at a time,
# the same sums in the same order with fewer registers (gemv_direct's SPLIT).
SPLIT_X = os.environ.get("PARLEY_GEMV_SPLIT") == "1"
# The fewest blocks a direct-read product is split into (rows per warp shrink until it is met).
MIN_BLOCKS = int(os.environ.get("PARLEY_GEMV_BLOCKS", "256"))

_HEADER = r"""
namespace parley {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
// The value a float takes once stored in T (where the unfused code keeps an intermediate).
template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f(from_f<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Values per 16-byte weight load.
template <typename T, int BITS> struct Pack {
  static constexpr int VPL = BITS ? 128 / BITS : 16 / (int)sizeof(T);
};

// Index of input value k in the transposed shared-memory copy of x.
template <int VPL, int KV> __device__ __forceinline__ int xs_at(int k) {
  return (k % VPL) * (KV + 1) + k / VPL;
}

// sum_j q_j * xv[j] for the packed unsigned integers of one 16-byte load. An integer below 2^23
// ORed into the mantissa of 2^23 and minus 2^23 is its exact float (cheaper than a conversion).
template <int BITS> __device__ __forceinline__ float dot_q(const uint4 w, const float* xv) {
  constexpr int PER = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const float q = __uint_as_float(0x4B000000u | ((words[i] >> (BITS * j)) & MASK)) - 8388608.0f;
      s = fmaf(q, xv[i * PER + j], s);
    }
  }
  return s;
}

// The same for unquantized weights (bf16 pairs, or float32).
template <typename T> __device__ __forceinline__ float dot_plain(const uint4 w, const float* xv);
template <> __device__ __forceinline__ float dot_plain<float>(const uint4 w, const float* xv) {
  return fmaf(__uint_as_float(w.x), xv[0], fmaf(__uint_as_float(w.y), xv[1],
         fmaf(__uint_as_float(w.z), xv[2], __uint_as_float(w.w) * xv[3])));
}
template <> __device__ __forceinline__ float dot_plain<__nv_bfloat16>(const uint4 w, const float* xv) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = fmaf(__uint_as_float(words[i] << 16), xv[2 * i], s);
    s = fmaf(__uint_as_float(words[i] & 0xffff0000u), xv[2 * i + 1], s);
  }
  return s;
}

// The input values weight chunk v multiplies (from the transposed staged copy xs), and with
// BITS their sum (for the groups' biases).
template <int BITS, int VPL, int KV>
__device__ __forceinline__ float chunk_x(const float* xs, int v, float* xv) {
#pragma unroll
  for (int j = 0; j < VPL; ++j) xv[j] = xs[j * (KV + 1) + v];
  float xsum = 0.f;
  if constexpr (BITS != 0) {
#pragma unroll
    for (int j = 0; j < VPL; ++j) xsum += xv[j];
  }
  return xsum;
}

// One 16-byte weight chunk times its input values: with BITS, scaled and biased by its group's
// scale s and bias b.
template <typename T, int BITS>
__device__ __forceinline__ float chunk_dot(const uint4 wq, float s, float b, const float* xv,
                                           float xsum) {
  if constexpr (BITS != 0) {
    return fmaf(s, dot_q<BITS>(wq, xv), b * xsum);  // as nvcc contracts s * dot + b * xsum
  } else {
    return dot_plain<T>(wq, xv);
  }
}

// acc[r] = row rows[r] of W times x (staged in xs), summed over the warp (every lane gets it).
template <typename T, int BITS, int K, int GROUP, int RW>
__device__ __forceinline__ void gemv_rows(const float* xs, const void* wp, const T* scales,
                                          const T* biases, const int* rows, float* acc, int lane) {
  constexpr int VPL = Pack<T, BITS>::VPL;
  constexpr int KV = K / VPL;
  constexpr int ITERS = (KV + 31) / 32;
  constexpr int G = BITS ? K / GROUP : 1;
  const uint4* w = reinterpret_cast<const uint4*>(wp);
#pragma unroll
  for (int r = 0; r < RW; ++r) acc[r] = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int v = lane + 32 * it;
    if (KV % 32 == 0 || v < KV) {
      float xv[VPL];
      const float xsum = chunk_x<BITS, VPL, KV>(xs, v, xv);
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        const uint4 wq = __ldg(w + (size_t)rows[r] * KV + v);
        const size_t g = BITS ? (size_t)rows[r] * G + (v * VPL) / GROUP : 0;
        acc[r] += chunk_dot<T, BITS>(wq, BITS ? to_f(scales[g]) : 0.f,
                                     BITS ? to_f(biases[g]) : 0.f, xv, xsum);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RW; ++r) acc[r] = warp_sum(acc[r]);
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  const float total = red[0];
  __syncthreads();
  return total;
}

// A load through L2 only: for values other blocks wrote earlier in the same kernel (L1 is not
// coherent across blocks).
__device__ __forceinline__ float ld_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float ld_cg(const __nv_bfloat16* p) {
  const unsigned short u = __ldcg(reinterpret_cast<const unsigned short*>(p));
  return __uint_as_float(((unsigned int)u) << 16);
}
template <bool CG, typename T> __device__ __forceinline__ float ld_x(const T* p) {
  if constexpr (CG) return ld_cg(p); else return to_f(*p);
}

// Value j of a 16-byte chunk of T (bf16 pairs or floats), as float.
template <typename T> __device__ __forceinline__ float chunk_at(const uint4& c, int j);
template <> __device__ __forceinline__ float chunk_at<float>(const uint4& c, int j) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
  return __uint_as_float(w[j]);
}
template <> __device__ __forceinline__ float chunk_at<__nv_bfloat16>(const uint4& c, int j) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
  const uint32_t v = w[j >> 1];
  return __uint_as_float((j & 1) ? (v & 0xffff0000u) : (v << 16));
}

// Stages the block's input x [K] in shared memory as float, transposed (xs_at): with NORM as
// T(rms_norm(x) * alpha) computed in float32 (as `rms_norm_f32` does), else x itself. Every
// thread (NT a block) loads its 16-byte chunks of x, and of alpha, at once and keeps them in
// registers, so staging costs one memory round trip rather than one per K / NT values. CG reads
// x through L2 only (for values other blocks of the same kernel wrote). x must be 16-byte aligned
// (MLX's buffers are; a misaligned view takes the plain element loop).
template <typename T, int VPL, int K, int NT, bool CG, bool NORM>
__device__ __forceinline__ void stage_x(const T* x, const float* alpha, float eps, float* xs,
                                        float* red) {
  constexpr int KV = K / VPL;
  constexpr int CH = 16 / (int)sizeof(T);
  constexpr int NCH = K / CH;
  constexpr int PER = (NCH + NT - 1) / NT;
  if (K % CH != 0 || (reinterpret_cast<uintptr_t>(x) & 15u) != 0) {
    float ss = 0.f;
    for (int k = threadIdx.x; k < K; k += NT) {
      const float v = ld_x<CG>(x + k);
      ss = fmaf(v, v, ss);
    }
    const float r = NORM ? rsqrtf(block_sum(ss, red) / (float)K + eps) : 1.f;
    for (int k = threadIdx.x; k < K; k += NT)
      xs[xs_at<VPL, KV>(k)] = NORM ? round_t<T>(ld_x<CG>(x + k) * r * alpha[k]) : ld_x<CG>(x + k);
    __syncthreads();
    return;
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  uint4 buf[PER];
  float av[NORM ? PER * CH : 1];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * NT;
    if (NCH % NT == 0 || c < NCH) {
      if constexpr (CG) buf[i] = __ldcg(xv + c); else buf[i] = xv[c];
      if constexpr (NORM) {
#pragma unroll
        for (int j = 0; j < CH; ++j) av[i * CH + j] = alpha[c * CH + j];
      }
    }
  }
  float r = 1.f;
  if constexpr (NORM) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = threadIdx.x + i * NT;
      if (NCH % NT == 0 || c < NCH) {
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          const float v = chunk_at<T>(buf[i], j);
          ss = fmaf(v, v, ss);
        }
      }
    }
    r = rsqrtf(block_sum(ss, red) / (float)K + eps);
  }
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * NT;
    if (NCH % NT == 0 || c < NCH) {
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const float v = chunk_at<T>(buf[i], j);
        xs[xs_at<VPL, KV>(c * CH + j)] = NORM ? round_t<T>(v * r * av[i * CH + j]) : v;
      }
    }
  }
  __syncthreads();
}

// N consecutive values of T at p as float (one 16-, 8- or 4-byte load where they fill one, and p
// is aligned to it, as rows of MLX buffers at multiples of N are).
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, float* out) {
  constexpr int BYTES = N * (int)sizeof(T);
  if constexpr (BYTES == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = chunk_at<T>(u, j);
  } else if constexpr (BYTES == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const uint4 w = make_uint4(u.x, u.y, 0u, 0u);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = chunk_at<T>(w, j);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f(p[j]);
  }
}

// Values v*VPL .. v*VPL + VPL - 1 of x as float: 16-byte loads through the read-only path where
// x is 16-byte aligned (MLX's buffers are; a view may not be), else one value at a time.
template <typename T, int VPL>
__device__ __forceinline__ void load_chunk(const T* x, int v, bool aligned, float* xv) {
  constexpr int CHV = 16 / (int)sizeof(T);
  if (aligned) {
    const uint4* p = reinterpret_cast<const uint4*>(x) + v * (VPL / CHV);
#pragma unroll
    for (int c = 0; c < VPL / CHV; ++c) {
      const uint4 u = __ldg(p + c);
#pragma unroll
      for (int j = 0; j < CHV; ++j) xv[c * CHV + j] = chunk_at<T>(u, j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VPL; ++j) xv[j] = to_f(x[v * VPL + j]);
  }
}

// xv[j] = T(xv[j] * r * alpha[j]) for N values (N a multiple of 4, alpha 16-byte aligned): the
// RMSNorm as rms_norm_f32 stores it.
template <typename T, int N>
__device__ __forceinline__ void normalise(float* xv, const float* alpha, float r) {
  const float4* a4 = reinterpret_cast<const float4*>(alpha);
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    const float4 a = __ldg(a4 + j);
    xv[4 * j] = round_t<T>(xv[4 * j] * r * a.x);
    xv[4 * j + 1] = round_t<T>(xv[4 * j + 1] * r * a.y);
    xv[4 * j + 2] = round_t<T>(xv[4 * j + 2] * r * a.z);
    xv[4 * j + 3] = round_t<T>(xv[4 * j + 3] * r * a.w);
  }
}

// acc[r] = row rows[r] of W times x — with NORM, times T(rms_norm(x) * alpha), as stage_x makes
// it — summed over the warp (every lane gets it). Unlike gemv_rows, x is read straight from
// memory (L1 serves the block's other warps) instead of being staged by the whole block, so a
// block has no barrier and a grid can be many small blocks, as MLX's own quantized product is;
// each lane takes the same 16-byte weight loads as gemv_rows (chunk v = lane + 32 * it) and sums
// them in the same order. The weights are loaded WL 16-byte loads a lane at a time, the first
// batch before the norm's pass over x so that the two overlap.
template <typename T, int BITS, int K, int GROUP, int RW, bool NORM, int WL, bool SPLIT = false>
__device__ __forceinline__ void gemv_direct(const T* x, const float* alpha, float eps,
                                            const void* wp, const T* scales, const T* biases,
                                            const int* rows, float* acc, int lane) {
  constexpr int VPL = Pack<T, BITS>::VPL;
  constexpr int KV = K / VPL;
  constexpr int ITERS = (KV + 31) / 32;
  constexpr int CH = RW * ITERS <= WL ? ITERS : (WL / RW > 0 ? WL / RW : 1);
  constexpr int G = BITS ? K / GROUP : 1;
  const uint4* w = reinterpret_cast<const uint4*>(wp);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
#pragma unroll
  for (int r = 0; r < RW; ++r) acc[r] = 0.f;
  float rn = 1.f;
#pragma unroll
  for (int c0 = 0; c0 < ITERS; c0 += CH) {
    uint4 wq[RW][CH];
    float sc[RW][CH], bs[RW][CH];
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int v = lane + 32 * (c0 + i);
      if (c0 + i < ITERS && (KV % 32 == 0 || v < KV)) {
#pragma unroll
        for (int r = 0; r < RW; ++r) {
          wq[r][i] = __ldg(w + (size_t)rows[r] * KV + v);
          if constexpr (BITS != 0) {
            const size_t g = (size_t)rows[r] * G + (v * VPL) / GROUP;
            sc[r][i] = to_f(scales[g]);
            bs[r][i] = to_f(biases[g]);
          }
        }
      }
    }
    if constexpr (NORM) {
      if (c0 == 0) {
        float ss = 0.f;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
          const int v = lane + 32 * it;
          if (KV % 32 == 0 || v < KV) {
            float xv[VPL];
            load_chunk<T, VPL>(x, v, aligned, xv);
#pragma unroll
            for (int j = 0; j < VPL; ++j) ss = fmaf(xv[j], xv[j], ss);
          }
        }
        rn = rsqrtf(warp_sum(ss) / (float)K + eps);
      }
    }
    if constexpr (SPLIT && BITS != 0) {
      // The same sums in the same order, but x taken 16 bytes at a time (CHV values), so a lane
      // keeps CHV values of x live instead of VPL (fewer registers: more warps an SM).
      constexpr int CHV = 16 / (int)sizeof(T);
      constexpr int PER = 32 / BITS;
      constexpr uint32_t MASK = (1u << BITS) - 1u;
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const int v = lane + 32 * (c0 + i);
        if (c0 + i < ITERS && (KV % 32 == 0 || v < KV)) {
          float s[RW], xsum = 0.f;
#pragma unroll
          for (int r = 0; r < RW; ++r) s[r] = 0.f;
#pragma unroll
          for (int pc = 0; pc < VPL / CHV; ++pc) {
            float xv[CHV];
            if (aligned) {
              const uint4 u = __ldg(reinterpret_cast<const uint4*>(x) + v * (VPL / CHV) + pc);
#pragma unroll
              for (int j = 0; j < CHV; ++j) xv[j] = chunk_at<T>(u, j);
            } else {
#pragma unroll
              for (int j = 0; j < CHV; ++j) xv[j] = to_f(x[v * VPL + pc * CHV + j]);
            }
            if constexpr (NORM) normalise<T, CHV>(xv, alpha + v * VPL + pc * CHV, rn);
#pragma unroll
            for (int j = 0; j < CHV; ++j) xsum += xv[j];
#pragma unroll
            for (int r = 0; r < RW; ++r) {
              const uint32_t words[4] = {wq[r][i].x, wq[r][i].y, wq[r][i].z, wq[r][i].w};
#pragma unroll
              for (int j = 0; j < CHV; ++j) {
                const int vi = pc * CHV + j;  // value index within the 16-byte weight load
                const uint32_t qb = (words[vi / PER] >> (BITS * (vi % PER))) & MASK;
                s[r] = fmaf(__uint_as_float(0x4B000000u | qb) - 8388608.0f, xv[j], s[r]);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < RW; ++r) acc[r] += sc[r][i] * s[r] + bs[r][i] * xsum;
        }
      }
      continue;
    }
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int v = lane + 32 * (c0 + i);
      if (c0 + i < ITERS && (KV % 32 == 0 || v < KV)) {
        float xv[VPL];
        load_chunk<T, VPL>(x, v, aligned, xv);
        if constexpr (NORM) normalise<T, VPL>(xv, alpha + v * VPL, rn);
        if constexpr (BITS != 0) {
          float xsum = 0.f;
#pragma unroll
          for (int j = 0; j < VPL; ++j) xsum += xv[j];
#pragma unroll
          for (int r = 0; r < RW; ++r)
            acc[r] += sc[r][i] * dot_q<BITS>(wq[r][i], xv) + bs[r][i] * xsum;
        } else {
#pragma unroll
          for (int r = 0; r < RW; ++r) acc[r] += dot_plain<T>(wq[r][i], xv);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RW; ++r) acc[r] = warp_sum(acc[r]);
}

}  // namespace parley
"""

# Kernel bodies. Template constants (from MLX's `template=`): T (activation dtype), BITS (0 for
# unquantized weights), K (input size), N (rows of W), GROUP, RW (rows per warp), NORM (RMSNorm of
# x in front), WL (16-byte weight loads a lane keeps in flight), and per kernel the ones named
# below. Python fills {eps} and the like. The products read x directly (gemv_direct): a warp
# computes RW rows (the gated kernel: RW gate rows and their RW up rows) and no block stages x.
_ROWS = r"""
  using namespace parley;
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * RW;
  if (row0 >= N) return;
  int rows[RW];
#pragma unroll
  for (int r = 0; r < RW; ++r) rows[r] = row0 + r;
  float acc[RW];
  gemv_direct<T, BITS, K, GROUP, RW, NORM, WL, SPLIT>(x, {alpha}, {eps}f, w, scales, biases, rows,
                                                      acc, lane);
"""

_GEMV_EPI = r"""
#pragma unroll
  for (int r = 0; r < RW; ++r) {
    if (lane == r) {
      {epilogue}
    }
  }
"""
_GEMV = _ROWS + _GEMV_EPI

_GATED = r"""
  using namespace parley;
  constexpr int HALF = N / 2;
  const int lane = threadIdx.x & 31;
  const int j0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * RW;
  if (j0 >= HALF) return;
  int rows[2 * RW];
#pragma unroll
  for (int r = 0; r < RW; ++r) { rows[r] = j0 + r; rows[RW + r] = HALF + j0 + r; }
  float acc[2 * RW];
  gemv_direct<T, BITS, K, GROUP, 2 * RW, true, WL, SPLIT>(x, alpha, {eps}f, w, scales, biases,
                                                          rows, acc, lane);
#pragma unroll
  for (int r = 0; r < RW; ++r) {
    if (lane == r) {
      // Unfused: y = linear_in(h) stored as T; silu(g) = g * sigmoid(g) and the product each in T.
      const float g = round_t<T>(acc[r]);
      const float u = round_t<T>(acc[RW + r]);
      const float sig = round_t<T>(1.f / (1.f + expf(-g)));
      out[j0 + r] = from_f<T>(round_t<T>(g * sig) * u);
    }
  }
"""

_QKV_EPI = r"""
  constexpr int D = N / 3;
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < RW; r += 2) {
    const int row = row0 + r;
    // The projection is stored as T; RoPE then runs in float32 and is stored as T again.
    float a0 = round_t<T>(acc[r]), a1 = round_t<T>(acc[r + 1]);
    if (ROPE && row < 2 * D) {
      const int i = (row % HD) / 2;
      const float freq = expf((float)i * {neg_log_base_2_over_hd}f);
      const float theta = freq * (float)pos[0];
      double s, c;
      sincos((double)theta, &s, &c);
      const float cf = (float)c, sf = (float)s;
      const float r0 = a0 * cf - a1 * sf, r1 = a0 * sf + a1 * cf;
      a0 = r0;
      a1 = r1;
    }
    T* dst = row < D ? q + row : row < 2 * D ? k + (row - D) : v + (row - 2 * D);
    dst[0] = from_f<T>(a0);
    dst[1] = from_f<T>(a1);
  }
"""
_QKV = _ROWS + _QKV_EPI

_ATTN = r"""
  using namespace parley;
  constexpr int VPL = Pack<T, BITS>::VPL;
  constexpr int KVV = K / VPL;
  constexpr int HD = K / H;
  __shared__ float xs[VPL * (K / VPL + 1)];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const T* ks[NKV] = {{{k_list}}};
  const T* vs[NKV] = {{{v_list}}};
  // Attention of one query over the NKV keys so far, head by head (a warp per head); the output
  // is stored as T (as the unfused attention's is) straight into the staged input of W.
  for (int h = warp; h < H; h += nwarps) {
    float s[NKV];
    float m = -3.0e38f;
#pragma unroll
    for (int j = 0; j < NKV; ++j) {
      float part = 0.f;
      for (int d = lane; d < HD; d += 32) part = fmaf(to_f(q[h * HD + d]), to_f(ks[j][h * HD + d]), part);
      s[j] = warp_sum(part) * {scale}f;
      m = fmaxf(m, s[j]);
    }
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < NKV; ++j) { s[j] = expf(s[j] - m); total += s[j]; }
    const float inv = 1.f / total;
    for (int d = lane; d < HD; d += 32) {
      float o = 0.f;
#pragma unroll
      for (int j = 0; j < NKV; ++j) o = fmaf(s[j], to_f(vs[j][h * HD + d]), o);
      xs[xs_at<VPL, KVV>(h * HD + d)] = round_t<T>(o * inv);
    }
  }
  __syncthreads();
  const int row0 = (blockIdx.x * nwarps + warp) * RW;
  if (row0 >= N) return;
  int rows[RW];
#pragma unroll
  for (int r = 0; r < RW; ++r) rows[r] = row0 + r;
  float acc[RW];
  gemv_rows<T, BITS, K, GROUP, RW>(xs, w, scales, biases, rows, acc, lane);
#pragma unroll
  for (int r = 0; r < RW; ++r) {
    if (lane == r) out[row0 + r] = from_f<T>(to_f(res[row0 + r]) + round_t<T>(acc[r]));
  }
"""


# The temporal transformer's attention for one new position over its KV ring, with the ring write
# folded in, as one device function for one (head h, chunk c) item, used by the ring_attn kernel
# (a block per item) and by the temporal step kernel (engine/lm/temporal_kernel.py: each block
# takes items in turn). Template constants: T, HD (head size), S (ring slots), C (chunks of CL
# slots a head), CL, LPR (lanes a key row), NT (threads a block), CG (q, k and v were written by
# other blocks of the same kernel: read them through L2), Q8 (the ring holds bytes with a float
# (scale, low) pair a row in kpar / vpar, engine/lm/kv_ring.py; the new position is quantized
# when written and then read back like any other slot, so every path attends the same values). The block scores the query of head h
# against the slots of chunk c that hold keys (slot, n: the new position's slot and the number of
# slots to attend, the new one included; the new key and value come from k and v, not the ring,
# whose slot still holds an old one), keeps its softmax partials (max, sum, weighted values) in
# `part`, and the last block of head h to finish (a counter in `cnt`, zeroed again by that block)
# combines them into head h's output. The block holding the new slot writes k and v into the ring
# in place: no kernel reads the ring at the same time (the next reader is the next frame's).
# Shared scratch: sc [CL], red [32], acc_s [NT / 32 * HD], last_s.
_RING_HELPERS = r"""
namespace parley {

template <bool CG, typename T, int N>
__device__ __forceinline__ void load_row_x(const T* p, float* out) {
  if constexpr (!CG) {
    load_row<T, N>(p, out);
  } else if constexpr (N * sizeof(T) == 16) {
    const uint4 u = __ldcg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = chunk_at<T>(u, j);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = ld_cg(p + j);
  }
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// N bytes of a quantized ring row at p (4-byte aligned), dequantized with the row's (scale,
// low) at par; FRESH: the row was written earlier in this kernel (read through L2).
template <int N, bool FRESH>
__device__ __forceinline__ void load_row_q8(const unsigned char* p, const float* par, float* out) {
  static_assert(N % 4 == 0, "a lane's share of a quantized row must be whole 4-byte words");
  const float s = FRESH ? __ldcg(par) : par[0];
  const float lo = FRESH ? __ldcg(par + 1) : par[1];
#pragma unroll
  for (int w = 0; w < N / 4; ++w) {
    const unsigned int u = FRESH ? __ldcg(reinterpret_cast<const unsigned int*>(p) + w)
                                 : reinterpret_cast<const unsigned int*>(p)[w];
#pragma unroll
    for (int b = 0; b < 4; ++b) out[4 * w + b] = fmaf((float)((u >> (8 * b)) & 0xffu), s, lo);
  }
}

// Row `src` (HD values of T) quantized by one warp into dst (bytes) and par (scale, low), as
// kv_ring.quantize_rows does.
template <typename T, int HD, bool CG>
__device__ __forceinline__ void quantize_row_warp(const T* src, unsigned char* dst, float* par,
                                                  int lane) {
  constexpr int PER = (HD + 31) / 32;
  float x[PER];
  float lo = 3.0e38f, hi = -3.0e38f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < HD ? ld_x<CG>(src + d) : 0.f;
    if (d < HD) { lo = fminf(lo, x[i]); hi = fmaxf(hi, x[i]); }
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const float s = fmaxf((hi - lo) / 255.f, 1e-30f);
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < HD) dst[d] = (unsigned char)fminf(fmaxf(rintf((x[i] - lo) / s), 0.f), 255.f);
  }
  if (lane == 0) { par[0] = s; par[1] = lo; }
}

// Lane li's DPL values of ring row j as float: from the ring in T or in bytes (Q8: the new slot
// too, written earlier in this kernel, so read through L2), or, for the new slot of a ring in T,
// from the new key or value itself (`fresh`).
template <typename T, int HD, int DPL, bool CG, bool Q8>
__device__ __forceinline__ void ring_row(int j, int slot, const T* ring, const unsigned char* ring8,
                                         const float* par, const T* fresh, int li, float* out) {
  if constexpr (Q8) {
    if (j == slot) load_row_q8<DPL, true>(ring8 + (size_t)j * HD + li * DPL, par + 2 * j, out);
    else load_row_q8<DPL, false>(ring8 + (size_t)j * HD + li * DPL, par + 2 * j, out);
  } else if (j == slot) {
    load_row_x<CG, T, DPL>(fresh + li * DPL, out);
  } else {
    load_row<T, DPL>(ring + (size_t)j * HD + li * DPL, out);
  }
}

template <typename T, int HD, int S, int C, int CL, int LPR, int NT, bool CG, bool Q8>
__device__ void ring_item(int h, int c, const T* q, const T* k, const T* v, void* kring_,
                          void* vring_, float* kpar, float* vpar, int slot, int n, float scale,
                          float* part, unsigned int* cnt, T* out, float* sc, float* red,
                          float* acc_s, int* last_s) {
  constexpr int DPL = HD / LPR;        // values of a row a lane holds
  constexpr int SPW = 32 / LPR;        // rows a warp takes at a time
  constexpr int NW = NT / 32;
  constexpr int U = 8;                 // rows a lane loads before using any
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane / LPR, li = lane % LPR;
  const int j0 = c * CL;
  const int j1 = min(j0 + CL, n);
  T* kr = reinterpret_cast<T*>(kring_) + (size_t)h * S * HD;
  T* vr = reinterpret_cast<T*>(vring_) + (size_t)h * S * HD;
  unsigned char* kr8 = reinterpret_cast<unsigned char*>(kring_) + (size_t)h * S * HD;
  unsigned char* vr8 = reinterpret_cast<unsigned char*>(vring_) + (size_t)h * S * HD;
  float* kp = kpar + (size_t)h * S * 2;
  float* vp = vpar + (size_t)h * S * 2;
  const T* kn = k + h * HD;
  const T* vn = v + h * HD;
  if constexpr (Q8) {
    // Warp 0 quantizes the new key into its slot, warp 1 the value; the block then reads them
    // back like the other slots (the barrier makes the writes visible to its other warps).
    if (slot >= j0 && slot < j0 + CL && warp < 2) {
      quantize_row_warp<T, HD, CG>(warp == 0 ? kn : vn, (warp == 0 ? kr8 : vr8) + (size_t)slot * HD,
                                   (warp == 0 ? kp : vp) + (size_t)slot * 2, lane);
      __threadfence_block();
    }
    __syncthreads();
  } else if (slot >= j0 && slot < j0 + CL) {  // this chunk's block writes the new slot
    for (int d = tid; d < HD; d += NT) {
      if constexpr (CG) {
        kr[(size_t)slot * HD + d] = from_f<T>(ld_cg(kn + d));
        vr[(size_t)slot * HD + d] = from_f<T>(ld_cg(vn + d));
      } else {
        kr[(size_t)slot * HD + d] = kn[d];
        vr[(size_t)slot * HD + d] = vn[d];
      }
    }
  }
  float qv[DPL];
  load_row_x<CG, T, DPL>(q + h * HD + li * DPL, qv);
  // Scores of this chunk's rows (U rows a lane in flight; the new slot from k).
  for (int base = j0 + warp * SPW; base < j1; base += NW * SPW * U) {
    float kv[U][DPL];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * NW * SPW + sub;
      if (j < j1) {
        ring_row<T, HD, DPL, CG, Q8>(j, slot, kr, kr8, kp, kn, li, kv[u]);
      } else {
#pragma unroll
        for (int i = 0; i < DPL; ++i) kv[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * NW * SPW + sub;
      float part_ = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) part_ = fmaf(qv[i], kv[u][i], part_);
#pragma unroll
      for (int o = LPR / 2; o > 0; o >>= 1) part_ += __shfl_xor_sync(0xffffffffu, part_, o);
      if (li == 0 && j < j1) sc[j - j0] = part_ * scale;
    }
  }
  __syncthreads();
  // Softmax partials of the chunk: m = max score, l = sum of exp(score - m).
  float m = -3.0e38f;
  for (int i = tid; i < j1 - j0; i += NT) m = fmaxf(m, sc[i]);
  m = warp_max(m);
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = -3.0e38f;
  for (int i = 0; i < NW; ++i) m = fmaxf(m, red[i]);
  __syncthreads();
  float l = 0.f;
  for (int i = tid; i < j1 - j0; i += NT) {
    const float p = expf(sc[i] - m);
    sc[i] = p;
    l += p;
  }
  l = block_sum(l, red);
  // Weighted values: lane li of row sub holds values li*DPL .. of the rows it takes.
  float o[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) o[i] = 0.f;
  for (int base = j0 + warp * SPW; base < j1; base += NW * SPW * U) {
    float vv[U][DPL];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * NW * SPW + sub;
      if (j < j1) {
        ring_row<T, HD, DPL, CG, Q8>(j, slot, vr, vr8, vp, vn, li, vv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * NW * SPW + sub;
      if (j < j1) {
        const float p = sc[j - j0];
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] = fmaf(p, vv[u][i], o[i]);
      }
    }
  }
  // Sum over the rows a warp holds at once, then over the warps.
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
#pragma unroll
    for (int off = 16; off >= LPR; off >>= 1) o[i] += __shfl_xor_sync(0xffffffffu, o[i], off);
  }
  if (sub == 0) {
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc_s[warp * HD + li * DPL + i] = o[i];
  }
  __syncthreads();
  const int item = h * C + c;
  float* pp = part + (size_t)item * (HD + 2);
  for (int d = tid; d < HD; d += NT) {
    float t = 0.f;
    for (int w = 0; w < NW; ++w) t += acc_s[w * HD + d];
    pp[2 + d] = t;
  }
  if (tid == 0) { pp[0] = m; pp[1] = l; }
  __threadfence();
  __syncthreads();
  unsigned int* count = cnt + h;
  if (tid == 0) *last_s = atomicAdd(count, 1u) == (unsigned int)(C - 1);
  __syncthreads();
  if (*last_s) {
    // The last block of head h: combine the C chunks' partials.
    __threadfence();
    const float* ph = part + (size_t)h * C * (HD + 2);
    float mm = -3.0e38f;
    for (int cc = 0; cc < C; ++cc) mm = fmaxf(mm, __ldcg(ph + cc * (HD + 2)));
    float ll = 0.f;
    for (int cc = 0; cc < C; ++cc) {
      const float lc = __ldcg(ph + cc * (HD + 2) + 1);
      if (lc > 0.f) ll += expf(__ldcg(ph + cc * (HD + 2)) - mm) * lc;
    }
    const float inv = 1.f / ll;
    for (int d = tid; d < HD; d += NT) {
      float t = 0.f;
      for (int cc = 0; cc < C; ++cc) {
        const float lc = __ldcg(ph + cc * (HD + 2) + 1);
        if (lc > 0.f) t += expf(__ldcg(ph + cc * (HD + 2)) - mm) * __ldcg(ph + cc * (HD + 2) + 2 + d);
      }
      out[h * HD + d] = from_f<T>(t * inv);
    }
    if (tid == 0) *count = 0u;
  }
  __syncthreads();  // the shared scratch is free for the block's next item
}

}  // namespace parley
"""

# The ring_attn kernel: block (h, c) = ring_item (h, c).
_RING_ATTN = r"""
  using namespace parley;
  __shared__ float sc[CL];
  __shared__ float red[32];
  __shared__ float acc_s[NT / 32 * HD];
  __shared__ int last_s;
  ring_item<T, HD, S, C, CL, LPR, NT, false, Q8>(
      blockIdx.x / C, blockIdx.x % C, q, k, v, const_cast<void*>((const void*)kring),
      const_cast<void*>((const void*)vring), const_cast<float*>(kpar), const_cast<float*>(vpar),
      meta[0], meta[1], {scale}f, part, const_cast<unsigned int*>(cnt), out, sc, red, acc_s,
      &last_s);
"""


def on_cuda() -> bool:
    """Whether MLX's CUDA backend is the default device."""
    try:
        return bool(mx.cuda.is_available()) and mx.default_device().type == mx.DeviceType.gpu
    except AttributeError:
        return False


def enabled() -> bool:
    """Whether the fused kernels can run: MLX's CUDA backend is the default device, and
    PARLEY_FUSED is not 0."""
    if os.environ.get("PARLEY_FUSED", "1") == "0":
        return False
    return on_cuda()


def supports(lin: Linear, dtype: mx.Dtype) -> bool:
    """Whether `lin` (with activations of `dtype`) fits the kernels' layout."""
    if dtype not in (mx.bfloat16, mx.float32):
        return False
    n, k = _shape(lin)
    if lin.quantized:
        vpl = 128 // lin.bits
        ok = lin.bits in (4, 8) and lin.group_size % vpl == 0 and k % lin.group_size == 0
        ok = ok and lin.scales.dtype == dtype
    else:
        vpl = 16 // dtype.size
        ok = lin.weight.dtype == dtype
    return ok and k % vpl == 0 and k + vpl <= 12 * 1024 and n % 2 == 0


def _shape(lin: Linear) -> tuple[int, int]:
    n = int(lin.weight.shape[-2])
    k = int(lin.weight.shape[-1]) * (32 // lin.bits if lin.quantized else 1)
    return n, k


def _rows_per_warp(n: int) -> int:
    """Rows per warp of the attention kernel, which stages its input per block."""
    return 4 if n % 4 == 0 else 2


def _direct_rows(n: int, even: bool = False) -> int:
    """Rows per warp of the direct-read products: the most of 4, 2, 1 (even for RoPE's pairs)
    dividing n that still leaves MIN_BLOCKS blocks (256: two a multiprocessor on an H100/H200):
    more rows a warp read x fewer times, more blocks keep more weight loads in flight."""
    choices = (4, 2) if even else (4, 2, 1)
    fits = [rw for rw in choices if n % rw == 0]
    for rw in fits:
        if n // (rw * WARPS) >= MIN_BLOCKS:
            return rw
    return fits[-1]


@functools.cache
def _kernel(kind: str, stage: str = "", epilogue: str = "", nkv: int = 0,
            scale: float = 0.0, neg_log_base_2_over_hd: float = 0.0):
    eps = repr(float(RMS_EPS))
    if kind == "gemv":
        inputs = ["x"] + (["alpha"] if stage == "norm" else []) + ["w", "scales", "biases"]
        inputs += ["res"] if epilogue == "res" else []
        epi = ("y[rows[r]] = from_f<T>(to_f(res[rows[r]]) + round_t<T>(acc[r]));"
               if epilogue == "res" else "y[rows[r]] = from_f<T>(acc[r]);")
        src = (_GEMV.replace("{alpha}", "alpha" if stage == "norm" else "nullptr")
               .replace("{eps}", eps).replace("{epilogue}", epi))
        outputs = ["y"]
    elif kind == "gated":
        inputs, outputs = ["x", "alpha", "w", "scales", "biases"], ["out"]
        src = _GATED.replace("{eps}", eps)
    elif kind == "qkv":
        inputs, outputs = ["x", "alpha", "w", "scales", "biases", "pos"], ["q", "k", "v"]
        src = (_QKV.replace("{alpha}", "alpha").replace("{eps}", eps)
               .replace("{neg_log_base_2_over_hd}", repr(float(neg_log_base_2_over_hd))))
    elif kind == "ring_attn":
        inputs = ["q", "k", "v", "kring", "vring", "kpar", "vpar", "meta", "cnt"]
        outputs = ["out", "part"]
        src = _RING_ATTN.replace("{scale}", repr(float(scale)))
    elif kind == "attn":
        k_names, v_names = [f"k{j}" for j in range(nkv)], [f"v{j}" for j in range(nkv)]
        inputs, outputs = ["q", *k_names, *v_names, "w", "scales", "biases", "res"], ["out"]
        src = (_ATTN.replace("{{{k_list}}}", "{" + ", ".join(k_names) + "}")
               .replace("{{{v_list}}}", "{" + ", ".join(v_names) + "}")
               .replace("{scale}", repr(float(scale))))
    else:
        raise ValueError(kind)
    # MLX caches compiled kernels on disk by name (MLX_PTX_CACHE_DIR, default under /tmp), so the
    # name carries a digest of the source: a changed kernel must never load an old build.
    header = _HEADER + (_RING_HELPERS if kind == "ring_attn" else "")
    digest = hashlib.sha1((header + src).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"parley_{kind}_{digest}", input_names=inputs,
                               output_names=outputs, source=src, header=header)


def _weights(lin: Linear, dtype: mx.Dtype) -> list[mx.array]:
    if lin.quantized:
        return [lin.weight, lin.scales, lin.biases]
    dummy = mx.zeros((1,), dtype=dtype)  # unused by BITS = 0; the kernel signature wants them
    return [lin.weight, dummy, dummy]


def _template(lin: Linear, dtype: mx.Dtype, rw: int, **extra) -> list:
    n, k = _shape(lin)
    t = [("T", dtype), ("BITS", lin.bits if lin.quantized else 0), ("K", k), ("N", n),
         ("GROUP", lin.group_size if lin.quantized else 64), ("RW", rw),
         ("WL", WEIGHT_LOADS), ("SPLIT", SPLIT_X)]
    return t + list(extra.items())


def _grid(rows: int, rw: int) -> dict:
    blocks = -(-rows // (rw * WARPS))
    return {"grid": (blocks * WARPS * 32, 1, 1), "threadgroup": (WARPS * 32, 1, 1)}


def gemv(x: mx.array, lin: Linear, alpha: mx.array | None = None,
         res: mx.array | None = None) -> mx.array:
    """lin(rms_norm_f32(x, alpha) if alpha is given else x) (+ res): x [..., K] with one
    position -> [..., N] like x."""
    n, k = _shape(lin)
    rw = _direct_rows(n)
    ins = [x.reshape(k)] + ([alpha] if alpha is not None else []) + _weights(lin, x.dtype)
    if res is not None:
        ins.append(res.reshape(n))
    kern = _kernel("gemv", "norm" if alpha is not None else "", "res" if res is not None else "")
    (y,) = kern(inputs=ins, template=_template(lin, x.dtype, rw, NORM=alpha is not None),
                output_shapes=[(n,)], output_dtypes=[x.dtype], **_grid(n, rw))
    return y.reshape(*x.shape[:-1], n)


def gemv_gated(x: mx.array, alpha: mx.array, lin_in: Linear) -> mx.array:
    """silu(g) · u where [g; u] = lin_in(rms_norm_f32(x, alpha)): x [..., K] -> [..., N/2]."""
    n, k = _shape(lin_in)
    half = n // 2
    # A warp computes RW gate rows and their RW up rows: at most 2 + 2, the shape at which the
    # plain product streams fastest (H200: 4 rows a warp 1.7 TB/s, 8 rows 0.9 TB/s).
    rw = min(_direct_rows(half), 2 if half % 2 == 0 else 1)
    (out,) = _kernel("gated")(inputs=[x.reshape(k), alpha, *_weights(lin_in, x.dtype)],
                              template=_template(lin_in, x.dtype, rw), output_shapes=[(half,)],
                              output_dtypes=[x.dtype], **_grid(half, rw))
    return out.reshape(*x.shape[:-1], half)


def qkv(x: mx.array, alpha: mx.array, lin: Linear, num_heads: int, pos: mx.array | None = None,
        max_period: float = 10000.0) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v [1, H, 1, hd] of one position: lin(rms_norm_f32(x, alpha)) split in heads, with
    interleaved RoPE (in float32) on q and k at position `pos` (an int32 [1] array) if given."""
    n, k = _shape(lin)
    d = n // 3
    hd = d // num_heads
    rw = _direct_rows(n, even=True)
    rope = pos is not None
    c = -math.log(max_period) * 2 / hd
    kern = _kernel("qkv", neg_log_base_2_over_hd=c if rope else 0.0)
    pos_in = pos if rope else mx.zeros((1,), dtype=mx.int32)
    outs = kern(inputs=[x.reshape(k), alpha, *_weights(lin, x.dtype), pos_in],
                template=_template(lin, x.dtype, rw, NORM=True, HD=hd, ROPE=rope),
                output_shapes=[(d,)] * 3, output_dtypes=[x.dtype] * 3, **_grid(n, rw))
    return tuple(o.reshape(1, num_heads, 1, hd) for o in outs)


def attn_gemv(q: mx.array, keys: list[mx.array], values: list[mx.array], lin: Linear,
              res: mx.array, num_heads: int, scale: float) -> mx.array:
    """res + lin(attention(q, keys, values)) for one query: q, and each of the steps' keys and
    values so far, holds d values head-major (any shape, e.g. [1, H, 1, hd]) -> like res."""
    n, k = _shape(lin)
    rw = _rows_per_warp(n)
    kern = _kernel("attn", nkv=len(keys), scale=scale)
    (out,) = kern(inputs=[q.reshape(k), *[a.reshape(k) for a in keys],
                          *[a.reshape(k) for a in values], *_weights(lin, q.dtype), res.reshape(n)],
                  template=_template(lin, q.dtype, rw, H=num_heads, NKV=len(keys)),
                  output_shapes=[(n,)], output_dtypes=[q.dtype], **_grid(n, rw))
    return out.reshape(res.shape)


def ring_layout(head_dim: int, quantized: bool = False) -> tuple[int, int] | None:
    """(values a lane holds, lanes a row) of ring_attention for this head size, or None if it
    cannot take it (rows must split into a power of two of lanes, at most a warp; of an 8-bit
    ring, a lane's share must be whole 4-byte words)."""
    dpl = max(4, head_dim // 32)
    lpr = head_dim // dpl
    if head_dim % dpl or lpr < 1 or lpr > 32 or lpr & (lpr - 1) or (quantized and dpl % 4):
        return None
    return dpl, lpr


RING_CHUNK = 256  # most slots a block of ring_attention scores (a head's ring is split in chunks)


def ring_attention(q: mx.array, k: mx.array, v: mx.array, keys: mx.array, values: mx.array,
                   meta: mx.array, counters: mx.array, scale: float,
                   key_params: mx.array | None = None,
                   value_params: mx.array | None = None) -> mx.array:
    """Attention of one new position over a KV ring, writing its key and value into the ring.

    q, k, v: the position's [1, H, 1, hd]; keys, values: the ring [1, H, S, hd] (written in place
    at meta[0]: they must be materialised, contiguous arrays no other kernel uses at the same
    time), in q's dtype or uint8 with key_params / value_params [1, H, S, 2] float32 (an 8-bit
    ring, engine/lm/kv_ring.py; written in place too); meta: int32 [slot, n] (attend slots
    0 .. n-1, the new one included); counters: uint32 [H] zeros (left zero). Returns the
    attention output [1, H, 1, hd], like `scaled_dot_product_attention` over the ring after the
    write."""
    _, H, S, hd = keys.shape
    _, lpr = ring_layout(hd)
    q8 = keys.dtype == mx.uint8
    if not q8 or key_params is None:
        key_params = value_params = mx.zeros((1,), dtype=mx.float32)
    chunks = -(-S // RING_CHUNK)
    cl = -(-S // chunks)
    nt = 256
    kern = _kernel("ring_attn", scale=scale)
    out, _ = kern(inputs=[q.reshape(H * hd), k.reshape(H * hd), v.reshape(H * hd), keys, values,
                          key_params, value_params, meta, counters],
                  template=[("T", q.dtype), ("HD", hd), ("S", S), ("C", chunks), ("CL", cl),
                            ("LPR", lpr), ("NT", nt), ("Q8", q8)],
                  output_shapes=[(H * hd,), (H * chunks * (hd + 2),)],
                  output_dtypes=[q.dtype, mx.float32],
                  grid=(H * chunks * nt, 1, 1), threadgroup=(nt, 1, 1))
    return out.reshape(1, H, 1, hd)
