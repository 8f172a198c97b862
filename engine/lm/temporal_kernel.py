"""The temporal transformer's one-position step as a few CUDA kernels, on MLX's CUDA backend only.

Why: with engine/lm/fused.py's kernels the temporal step is still five kernels a layer (QKV,
ring attention, out projection, gated FFN, down projection), ~160 a frame, and on the H200 MLX
spends ~2.5 ms of host time issuing them plus ~0.9 ms of Python building the step
(docs/benchmarks.md, session 6): the frame is bound by the host about as much as by the device.
Here one kernel runs LAYERS_PER_LAUNCH layers (default 8: four launches a frame), the way the
depth step kernel (engine/lm/depth_kernel.py) runs a depth step: a grid of one block per SM,
phases separated by grid-wide barriers, a layer being

1. RMSNorm + QKV + RoPE (q, k, v to scratch);
2. the attention over the KV ring: fused.ring_item for every (head, chunk) item, blocks taking
   items in turn, the last block of a head combining its chunks; the new key and value are
   written into the ring slot in place;
3. out projection + residual;
4. RMSNorm + the gated half of the feed-forward;
5. down projection + residual;

and the last launch ends with the out_norm. Numerics are those of the fused temporal step with
ring attention (the same products summed in the same order, the same attention chunks), except
that each block normalises its staged input with a block-wide sum of squares instead of a warp's:
within float32 summation order of it. The default on MLX's CUDA backend since session 7, where
with three blocks an SM and four loads in flight a lane it took the H200's 4-bit frame from 12.3
to ~10.9 ms (docs/benchmarks.md); PARLEY_TEMPORAL_KERNEL=0 keeps the fused step. Values written
in a launch and read by other blocks of it are read through L2.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os

import mlx.core as mx

from . import depth_kernel, fused
from .layers import RMS_EPS, attention_scale

WARPS = 8  # warps per block: 256 threads, as fused.ring_item's chunks are sized for
# Layers per launch; PARLEY_TEMPORAL_LAYERS_PER_LAUNCH overrides it, to measure. A launch's
# kernel takes 16 arrays a layer, so fewer launches mean longer parameter lists.
LAYERS_PER_LAUNCH = int(os.environ.get("PARLEY_TEMPORAL_LAYERS_PER_LAUNCH", "8"))
# Blocks resident on each SM (PARLEY_TEMPORAL_BLOCKS_PER_SM; fewer where the SM's shared memory
# cannot hold them): with 2 or more the kernel is compiled with launch bounds that cap its
# registers, so that the grid still fits at once. One block (~250 registers) left 8 warps an SM
# and the kernel ~2x slower than with three (H200, session 7).
BLOCKS_PER_SM = int(os.environ.get("PARLEY_TEMPORAL_BLOCKS_PER_SM", "3"))
# Weight loads a lane keeps in flight in the products (PARLEY_TEMPORAL_LOADS); 0 leaves the
# schedule to the compiler (fused.gemv_rows, fully unrolled: ~250 registers at 7B widths).
LOADS = int(os.environ.get("PARLEY_TEMPORAL_LOADS", "4"))
# The attention phase's layout, to measure: values of a key row a lane loads at once
# (PARLEY_TEMPORAL_RING_DPL; 0: fused.ring_layout's) and most slots an item scores
# (PARLEY_TEMPORAL_RING_CHUNK; 0: fused.RING_CHUNK). Other than the defaults they change the
# order of the attention's sums (within float32 rounding of the fused step's).
RING_DPL = int(os.environ.get("PARLEY_TEMPORAL_RING_DPL", "0"))
RING_CHUNK = int(os.environ.get("PARLEY_TEMPORAL_RING_CHUNK", "0"))
# What each warp asks L2 to fetch for the next phase once it is done with its share of this one
# (PARLEY_TEMPORAL_PREFETCH, a mask): 1 its block's attention items' ring chunks (after the
# QKV), 2 its out projection rows (after the attention), 4 its gated rows (after the out
# projection), 8 its down projection rows (after the gated half), 16 its next layer's QKV rows
# (after the down projection, within a launch). The weights and the ring do not depend on the
# phase before, so their loads can start while the other warps finish, the grid barrier waits
# and the next input is staged, time in which DRAM otherwise idles. Hints only: no value changes.
# Measured on the H200 (docs/benchmarks.md, session 12): every mask made the step slower (1.50 ->
# 1.62-1.95 ms for 8 layers; the issuing phase pays, the next one does not speed up), so off.
PREFETCH = int(os.environ.get("PARLEY_TEMPORAL_PREFETCH", "0"))
PF_RING, PF_OUT, PF_GATED, PF_DOWN, PF_NEXT_QKV = 1, 2, 4, 8, 16
# Tensor-core products (PARLEY_TEMPORAL_MMA). The products of a step are most of its time (~100
# of ~146 us a layer on the H200) and ran ~5 instructions a 4-bit weight on the CUDA cores
# (unpack, convert, multiply-add, staged x). With MMA each block takes tiles of 16 rows, its 8
# warps a K-slice each; a lane unpacks a weight word into bf16 pairs (128 + q, one logic
# operation a pair; an 8-bit weight as two nibble planes) and the tensor cores multiply them by
# x staged as matching bf16 pairs (mma.sync m16n8k16, float32 sums): ~1.6 instructions a 4-bit
# value. Each group of 64 values is scaled as MLX does, s * (sum q x) + b * (sum x), with the
# 128s taken back out through the group's sum of x. Only bf16 with 4- or 8-bit weights in
# groups of 64 and widths that split into 8 slices of 128 (the 7B's); other models keep the
# CUDA-core products. Sums in another order: within bf16 rounding of them, not bit-equal.
# Measured on the H200 (docs/benchmarks.md, session 14): an 8-layer 4-bit launch 1.59 -> 1.56
# ms (8-bit ring), a frame 8.02 -> 7.58-7.81 ms; at 8 bits slower (1.49 -> 1.91 ms a launch:
# twice the mma work a value). So the default (None) uses them at 4 bits only; "1" wherever
# they fit, "0" never.


def mma_from(value: str) -> bool | None:
    """PARLEY_TEMPORAL_MMA's value as MMA: "1" True, "0" False, anything else None (4 bits)."""
    return {"1": True, "0": False}.get(value.strip())


MMA: bool | None = mma_from(os.environ.get("PARLEY_TEMPORAL_MMA", ""))
# Steps of 128 values a lane loads ahead in the tensor-core products (PARLEY_TEMPORAL_MMA_STEPS).
MMA_STEPS = max(1, int(os.environ.get("PARLEY_TEMPORAL_MMA_STEPS", "2") or 2))
# norm1, in_proj (w, s, b), out_proj (3), norm2, linear_in (3), linear_out (3), keys, values,
# key params, value params (an 8-bit ring's row scales; a dummy otherwise)
_PER_LAYER = 18
_WEIGHTS = 14  # of them weights (the rest: the rings)

_HELPERS = r"""
namespace parley {

// gemv_rows with its loads bounded: the K range is walked U lane-iterations at a time, each
// step's RW x U weight loads (and their scales and biases) issued before any is used, so a lane
// keeps about RW x U loads in flight and the registers stay few enough for more warps an SM.
// The sums are those of gemv_rows, in the same order (bit-identical).
template <typename T, int BITS, int K, int GROUP, int RW, int U>
__device__ __forceinline__ void gemv_rows_u(const float* xs, const void* wp, const T* scales,
                                            const T* biases, const int* rows, float* acc,
                                            int lane) {
  if constexpr (U == 0) {
    gemv_rows<T, BITS, K, GROUP, RW>(xs, wp, scales, biases, rows, acc, lane);
  } else {
    constexpr int VPL = Pack<T, BITS>::VPL;
    constexpr int KV = K / VPL;
    constexpr int ITERS = (KV + 31) / 32;
    constexpr int G = BITS ? K / GROUP : 1;
    const uint4* w = reinterpret_cast<const uint4*>(wp);
#pragma unroll
    for (int r = 0; r < RW; ++r) acc[r] = 0.f;
#pragma unroll 1
    for (int i0 = 0; i0 < ITERS; i0 += U) {
      uint4 wq[U][RW];
      float sc[U][RW] = {}, bs[U][RW] = {};
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = lane + 32 * (i0 + u);
        if ((ITERS % U == 0 || i0 + u < ITERS) && (KV % 32 == 0 || v < KV)) {
#pragma unroll
          for (int r = 0; r < RW; ++r) {
            wq[u][r] = __ldg(w + (size_t)rows[r] * KV + v);
            if constexpr (BITS != 0) {
              const size_t g = (size_t)rows[r] * G + (v * VPL) / GROUP;
              sc[u][r] = to_f(scales[g]);
              bs[u][r] = to_f(biases[g]);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = lane + 32 * (i0 + u);
        if ((ITERS % U == 0 || i0 + u < ITERS) && (KV % 32 == 0 || v < KV)) {
          float xv[VPL];
          const float xsum = chunk_x<BITS, VPL, KV>(xs, v, xv);
#pragma unroll
          for (int r = 0; r < RW; ++r)
            acc[r] += chunk_dot<T, BITS>(wq[u][r], sc[u][r], bs[u][r], xv, xsum);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RW; ++r) acc[r] = warp_sum(acc[r]);
  }
}

// The loads a lane keeps in flight (LOADS) as lane-iterations for RW rows at a time.
template <int RW> __device__ constexpr int unroll_for(int loads) {
  return loads <= 0 ? 0 : (loads / RW > 1 ? loads / RW : 1);
}

// y[row] = T(res[row] + T(W[row] . staged xs)) for the rows of every task t of this warp: a
// projection added to a residual stream (res may be y itself: each row is read and written by
// one lane).
template <typename T, int BITS, int K, int GROUP, int RW, int N, int TW, int LOADS>
__device__ __forceinline__ void add_rows(T* y, const T* res, const float* xs, const void* w,
                                         const T* s, const T* b, int gw, int lane) {
  for (int t = gw; t < N / RW; t += TW) {
    int rows[RW];
    float acc[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) rows[r] = t * RW + r;
    const float resv = lane < RW ? ld_cg(res + t * RW + lane) : 0.f;
    gemv_rows_u<T, BITS, K, GROUP, RW, unroll_for<RW>(LOADS)>(xs, w, s, b, rows, acc, lane);
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      if (lane == r) y[rows[r]] = from_f<T>(resv + round_t<T>(acc[r]));
    }
  }
}

// ---- Tensor-core products (MMA): 4- or 8-bit weights, scales and biases in bf16, groups of 64 --
//
// A weight word's nibbles become bf16 pairs of 128 + q (nib_pair: nibbles j and j + 4 of the
// word, j = 0..3 after shifting by 4j). With 4 bits they are values 8w + j and 8w + j + 4 of the
// row; with 8 bits a byte is two nibbles, q = lo + 16 hi, so the pairs are (lo, hi) planes of
// values 4w + {0, 2} and 4w + {1, 3}, multiplied by x and by 16 x. Either way a word's four pairs
// meet the four x pairs stage_pairs writes for it, and sum (128 + q) x over a group comes out as
// sum q x + FOLD * sum x (FOLD = 128, or 128 * 17 for the two planes).
template <int BITS> struct MmaLayout {
  static constexpr int VPW = 32 / BITS;           // values a 32-bit word
  static constexpr int WPG = 64 / VPW;            // words a group of 64
  static constexpr int WPT = WPG / 4;             // words of a group a lane loads (of 4 lanes)
  static constexpr float FOLD = BITS == 4 ? 128.f : 128.f * 17.f;
};

// The staged input for them, written over xs (the float copy it is made from): for each weight
// word's values of x, the x pairs its nibble pairs meet, as bf16 (uint4 a word, from xs[0]):
// 4 bits, x[8i..8i+8): (x0,x4) (x1,x5) (x2,x6) (x3,x7); 8 bits, x[4i..4i+4): (x0,x2)
// (16x0,16x2) (x1,x3) (16x1,16x3). Then each group of 64 values' sum (floats after them). x
// must be bf16 values (stage_x of bf16 rows: it is; 16 x is exact too).
template <int BITS, int K, int VPL, int NT>
__device__ __forceinline__ void stage_pairs(float* xs) {
  using M = MmaLayout<BITS>;
  constexpr int KV = K / VPL;
  constexpr int W = K / M::VPW;
  constexpr int PER = (W + NT - 1) / NT;
  static_assert(NT % M::WPG == 0 && K % 64 == 0, "a group's words on lanes of one warp");
  uint4 pk[PER];
  float gs[PER];
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    const int i = threadIdx.x + m * NT;
    float sum = 0.f;
    if (W % NT == 0 || i < W) {
      float v[M::VPW];
#pragma unroll
      for (int j = 0; j < M::VPW; ++j) {
        v[j] = xs[xs_at<VPL, KV>(M::VPW * i + j)];
        sum += v[j];
      }
      // A bf16 value's bits are its float's upper half; a pair's first value in the low half.
      auto pair = [](float lo, float hi) {
        return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xffff0000u);
      };
      if constexpr (BITS == 4) {
        pk[m] = make_uint4(pair(v[0], v[4]), pair(v[1], v[5]), pair(v[2], v[6]), pair(v[3], v[7]));
      } else {
        pk[m] = make_uint4(pair(v[0], v[2]), pair(16.f * v[0], 16.f * v[2]), pair(v[1], v[3]),
                           pair(16.f * v[1], 16.f * v[3]));
      }
    }
#pragma unroll
    for (int o = 1; o < M::WPG; o *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    gs[m] = sum;
  }
  __syncthreads();  // every thread holds its words: xs can be overwritten
  uint4* xb = reinterpret_cast<uint4*>(xs);
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    const int i = threadIdx.x + m * NT;
    if (W % NT == 0 || i < W) {
      xb[i] = pk[m];
      if (i % M::WPG == 0) xs[4 * W + i / M::WPG] = gs[m];
    }
  }
  __syncthreads();
}

// Nibbles 0 and 4 of w as a bf16 pair of 128 + q (0x4300 is 128; its 7 mantissa bits hold q).
// One LOP3 with both constants in registers (written in C, the compiler spends two on it).
__device__ __forceinline__ uint32_t nib_pair(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "r"(0x000F000Fu), "r"(0x43004300u));
  return r;  // 0xEA: (a & b) | c
}

// d += A B on the tensor cores: A 16 x 16 bf16 (a0-a3 as PTX lays them out), B 16 x 8 bf16
// (b0, b1), d 16 x 8 float32.
__device__ __forceinline__ void mma_bf16(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A group's term, s * (sum q x) + b * (sum x), from d = sum q x + FOLD sum x; s and b are half
// `h` of a bf16 pair (the pair's two groups).
template <int BITS>
__device__ __forceinline__ float group_term(uint32_t sp, uint32_t bp, int h, float d, float xsum) {
  const float s = __uint_as_float(h ? sp & 0xffff0000u : sp << 16);
  const float b = __uint_as_float(h ? bp & 0xffff0000u : bp << 16);
  return fmaf(s, d - MmaLayout<BITS>::FOLD * xsum, b * xsum);
}

// A lane's words of one row's group (WPT of them: 8 or 16 bytes).
template <int BITS> struct GroupWords;
template <> struct GroupWords<4> {
  uint2 v;
  __device__ __forceinline__ uint32_t operator[](int i) const { return i ? v.y : v.x; }
};
template <> struct GroupWords<8> {
  uint4 v;
  __device__ __forceinline__ uint32_t operator[](int i) const {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
  }
};
template <int BITS>
__device__ __forceinline__ GroupWords<BITS> load_group_words(const uint32_t* row, int grp, int c) {
  GroupWords<BITS> g;
  constexpr int WPG = MmaLayout<BITS>::WPG, WPT = MmaLayout<BITS>::WPT;
  if constexpr (BITS == 4) {
    g.v = __ldg(reinterpret_cast<const uint2*>(row + grp * WPG + c * WPT));
  } else {
    g.v = __ldg(reinterpret_cast<const uint4*>(row + grp * WPG + c * WPT));
  }
  return g;
}

// Rows ra + g and rb + g (g = lane / 4: the fragment's rows g and g + 8) of W [N, K] times x
// (stage_pairs' xb and group sums xg) over the K-slice [k0, k0 + KS), in steps of 128 values
// (two groups). In a step, lane c = lane % 4 of a row loads its WPT words of both groups (words
// c WPT.. of each): every mma then sums values of one group, so each group is scaled on its own.
// The mma's k order is ours to choose as long as A and B agree: a word's nibble pairs 0 and 1
// go to one mma, 2 and 3 to the next, with the x pairs stage_pairs made for that word.
// lo and hi get the rows' sums over the slice (every lane of a row the same).
template <typename T, int BITS, int K, int KS, int U>
__device__ __forceinline__ void mma_rows(const uint4* xb, const float* xg, const void* wp,
                                         const T* scales, const T* biases, int ra, int rb,
                                         int k0, int lane, float& lo, float& hi) {
  using M = MmaLayout<BITS>;
  static_assert(KS % 128 == 0, "steps of two groups");
  constexpr int STEPS = KS / 128;
  constexpr int G = K / 64;  // groups a row (even: a pair of them is one 4-byte load)
  const int g = lane >> 2, c = lane & 3;
  const uint32_t* wa = reinterpret_cast<const uint32_t*>(wp) + (size_t)(ra + g) * (K / M::VPW);
  const uint32_t* wb = reinterpret_cast<const uint32_t*>(wp) + (size_t)(rb + g) * (K / M::VPW);
  const uint32_t* sa = reinterpret_cast<const uint32_t*>(scales + (size_t)(ra + g) * G);
  const uint32_t* sb = reinterpret_cast<const uint32_t*>(scales + (size_t)(rb + g) * G);
  const uint32_t* ba = reinterpret_cast<const uint32_t*>(biases + (size_t)(ra + g) * G);
  const uint32_t* bb = reinterpret_cast<const uint32_t*>(biases + (size_t)(rb + g) * G);
  lo = 0.f;
  hi = 0.f;
#pragma unroll 1
  for (int s0 = 0; s0 < STEPS; s0 += U) {
    GroupWords<BITS> wA[U][2], wB[U][2];
    uint32_t scA[U], scB[U], bsA[U], bsB[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // every load of U steps first
      if (STEPS % U == 0 || s0 + u < STEPS) {
        const int grp = k0 / 64 + 2 * (s0 + u);  // the step's first group (even)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wA[u][h] = load_group_words<BITS>(wa, grp + h, c);
          wB[u][h] = load_group_words<BITS>(wb, grp + h, c);
        }
        scA[u] = __ldg(sa + grp / 2);
        scB[u] = __ldg(sb + grp / 2);
        bsA[u] = __ldg(ba + grp / 2);
        bsB[u] = __ldg(bb + grp / 2);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (STEPS % U == 0 || s0 + u < STEPS) {
        const int grp = k0 / 64 + 2 * (s0 + u);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int w = 0; w < M::WPT; ++w) {
            const uint32_t a = wA[u][h][w];  // row ra + g, word c WPT + w of the group
            const uint32_t b = wB[u][h][w];  // row rb + g
            const uint4 xv = xb[(grp + h) * M::WPG + c * M::WPT + w];
            mma_bf16(d, nib_pair(a), nib_pair(b), nib_pair(a >> 4), nib_pair(b >> 4), xv.x, xv.y);
            mma_bf16(d, nib_pair(a >> 8), nib_pair(b >> 8), nib_pair(a >> 12), nib_pair(b >> 12),
                     xv.z, xv.w);
          }
          const float xsum = xg[grp + h];
          lo += group_term<BITS>(scA[u], bsA[u], h, d[0], xsum);  // d[0]: row g, d[2]: g + 8
          hi += group_term<BITS>(scB[u], bsB[u], h, d[2], xsum);
        }
      }
    }
  }
}

// A tile of 16 rows (tile row r: ra + r for r < 8, rb + r - 8 after) times the staged x, by the
// whole block: warp w takes the K-slice [w K / WARPS, (w + 1) K / WARPS). Thread r < 16 gets
// tile row r's sum (the warps' slices added in order); other threads 0. Every thread of the
// block must call it (it synchronises the block).
template <typename T, int BITS, int K, int WARPS, int U>
__device__ __forceinline__ float mma_tile(const float* xs, const void* w, const T* s, const T* b,
                                          int ra, int rb, float* mpart, int lane, int warp) {
  constexpr int KS = K / WARPS;
  float lo, hi;
  mma_rows<T, BITS, K, KS, U>(reinterpret_cast<const uint4*>(xs),
                              xs + 4 * (K / MmaLayout<BITS>::VPW), w, s, b, ra, rb, warp * KS,
                              lane, lo, hi);
  if ((lane & 3) == 0) {
    mpart[warp * 16 + (lane >> 2)] = lo;
    mpart[warp * 16 + 8 + (lane >> 2)] = hi;
  }
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x < 16) {
#pragma unroll
    for (int i = 0; i < WARPS; ++i) total += mpart[i * 16 + threadIdx.x];
  }
  __syncthreads();  // the partials are read: the next tile may write them
  return total;
}

// y[row] = T(res[row] + T(W[row] . staged x)) for the N rows of W, a tile of 16 at a time over
// the grid's NB blocks (the tensor-core add_rows; res may be y itself: each row is read and
// written by one thread).
template <typename T, int BITS, int K, int N, int NB, int WARPS, int U>
__device__ __forceinline__ void mma_add_rows(T* y, const T* res, const float* xs, const void* w,
                                             const T* s, const T* b, float* mpart, int lane,
                                             int warp) {
  for (int tile = blockIdx.x; tile < N / 16; tile += NB) {
    const float a = mma_tile<T, BITS, K, WARPS, U>(xs, w, s, b, 16 * tile, 16 * tile + 8, mpart,
                                                   lane, warp);
    if (threadIdx.x < 16) {
      const int row = 16 * tile + threadIdx.x;
      y[row] = from_f<T>(ld_cg(res + row) + round_t<T>(a));
    }
  }
}

}  // namespace parley
"""

_BODY = r"""
  using namespace parley;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gw = blockIdx.x * WARPS + warp;  // this warp's index in the grid
  constexpr int TW = NB * WARPS;             // warps in the grid
  constexpr int NT = WARPS * 32;
  constexpr int VPL = Pack<T, BITS>::VPL;
  unsigned int* bar = const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync));
  unsigned int* counts = const_cast<unsigned int*>(cnt);
  __shared__ __align__(16) float xs[XS];  // the staged input; the attention's scratch in phase 2
  __shared__ float mpart[MMA ? WARPS * 16 : 1];  // a tile's partial sums (MMA)
  __shared__ float red[32];
  __shared__ int last_s;
  __shared__ const void* lp[L * PER_LAYER];
  {layer_ptrs}
  __syncthreads();
  const int p = pos[0], slot = meta[0], n = meta[1];
  // With PROBE, block 0 notes the GPU's clock (ns) at the start and after each phase's barrier.
  auto tick = [&](int i) {
    if constexpr (PROBE) {
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        ticks[i] = now;
      }
    }
  };
  tick(0);

  for (int l = 0; l < L; ++l) {
    const void* const* pl = lp + l * PER_LAYER;  // this layer's arrays (see _layer_names)
    const float* n1 = (const float*)pl[0];
    const void* wq = pl[1];
    const T* sq = (const T*)pl[2];
    const T* bq = (const T*)pl[3];
    const void* wo = pl[4];
    const T* so = (const T*)pl[5];
    const T* bo = (const T*)pl[6];
    const float* n2 = (const float*)pl[7];
    const void* wi = pl[8];
    const T* si = (const T*)pl[9];
    const T* bi = (const T*)pl[10];
    const void* wd = pl[11];
    const T* sd = (const T*)pl[12];
    const T* bd = (const T*)pl[13];
    void* kring = const_cast<void*>(pl[14]);
    void* vring = const_cast<void*>(pl[15]);
    float* kpar = const_cast<float*>((const float*)pl[16]);
    float* vpar = const_cast<float*>((const float*)pl[17]);
    const T* xr = l == 0 ? x0 : x;  // the residual stream entering this layer

    // 1. RMSNorm + QKV, RoPE on queries and keys (as fused._QKV_EPI): q, k, v to scratch.
    stage_x<T, VPL, D, NT, true, true>(xr, n1, {eps}f, xs, red);
    // Rows (row, row + 1) of the QKV product (row even) to q, k or v, RoPE'd if q or k.
    auto qkv_out = [&](int row, float a0, float a1) {
      a0 = round_t<T>(a0);
      a1 = round_t<T>(a1);
      if (row < 2 * D) {
        const int i = (row % HD) / 2;
        const float freq = expf((float)i * {neg_log_base_2_over_hd}f);
        const float theta = freq * (float)p;
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
    };
    if constexpr (MMA) {
      stage_pairs<BITS, D, VPL, NT>(xs);
      for (int tile = blockIdx.x; tile < 3 * D / 16; tile += NB) {
        const float a = mma_tile<T, BITS, D, WARPS, MU>(xs, wq, sq, bq, 16 * tile,
                                                        16 * tile + 8, mpart, lane, warp);
        if (warp == 0) {
          const float a1 = __shfl_down_sync(0xffffffffu, a, 1);
          if (lane < 16 && (lane & 1) == 0) qkv_out(16 * tile + lane, a, a1);
        }
      }
    } else {
      for (int t = gw; t < 3 * D / RWQ; t += TW) {
        int rows[RWQ];
        float acc[RWQ];
#pragma unroll
        for (int r = 0; r < RWQ; ++r) rows[r] = t * RWQ + r;
        gemv_rows_u<T, BITS, D, GROUP, RWQ, unroll_for<RWQ>(LOADS)>(xs, wq, sq, bq, rows, acc,
                                                                     lane);
        if (lane == 0) {
#pragma unroll
          for (int r = 0; r < RWQ; r += 2) qkv_out(rows[r], acc[r], acc[r + 1]);
        }
      }
    }
    if constexpr ((PF & 1) != 0) {  // this block's attention items: their chunks of both rings
      for (int i = 0, it = blockIdx.x; it < H * C; ++i, it += NB) {
        if (i % WARPS != warp) continue;
        const int h = it / C, j0 = (it % C) * CL, j1 = min(j0 + CL, n);
        if (j1 <= j0) continue;
        constexpr size_t RB = Q8 ? HD : HD * sizeof(T);
        const size_t at = (size_t)h * S + j0, rows = (size_t)(j1 - j0);
        l2_prefetch(reinterpret_cast<const char*>(kring) + at * RB, rows * RB, lane);
        l2_prefetch(reinterpret_cast<const char*>(vring) + at * RB, rows * RB, lane);
        if constexpr (Q8) {
          l2_prefetch(kpar + 2 * at, rows * 2 * sizeof(float), lane);
          l2_prefetch(vpar + 2 * at, rows * 2 * sizeof(float), lane);
        }
      }
    }
    grid_sync<AR>(bar, NB);
    tick(1 + 5 * l);

    // 2. Attention over the ring (and the ring write), a (head, chunk) item at a time.
    for (int it = blockIdx.x; it < H * C; it += NB) {
      ring_item<T, HD, S, C, CL, LPR, NT, true, Q8>(it / C, it % C, q, k, v, kring, vring, kpar,
                                                    vpar, slot, n, {scale}f, part, counts, attn,
                                                    xs, red, xs + CL, &last_s);
    }
    if constexpr ((PF & 2) != 0) prefetch_tasks<T, BITS, D, GROUP, RWO, D, TW>(wo, so, bo, gw, lane);
    grid_sync<AR>(bar, NB);
    tick(2 + 5 * l);

    // 3. Out projection + residual.
    stage_x<T, VPL, D, NT, true, false>(attn, nullptr, 0.f, xs, red);
    if constexpr (MMA) {
      stage_pairs<BITS, D, VPL, NT>(xs);
      mma_add_rows<T, BITS, D, D, NB, WARPS, MU>(x, xr, xs, wo, so, bo, mpart, lane, warp);
    } else {
      add_rows<T, BITS, D, GROUP, RWO, D, TW, LOADS>(x, xr, xs, wo, so, bo, gw, lane);
    }
    if constexpr ((PF & 4) != 0) {  // both halves of the gated rows
      prefetch_tasks<T, BITS, D, GROUP, RWG, HID, TW>(wi, si, bi, gw, lane);
      prefetch_tasks<T, BITS, D, GROUP, RWG, HID, TW>(wi, si, bi, gw, lane, HID);
    }
    grid_sync<AR>(bar, NB);
    tick(3 + 5 * l);

    // 4. RMSNorm + the gated half of the feed-forward.
    stage_x<T, VPL, D, NT, true, true>(x, n2, {eps}f, xs, red);
    // Row r of the gated half from its gate and up sums.
    auto gated_out = [&](int r, float gate, float up) {
      const float g = round_t<T>(gate);
      const float u = round_t<T>(up);
      const float sig = round_t<T>(1.f / (1.f + expf(-g)));
      hb[r] = from_f<T>(round_t<T>(g * sig) * u);
    };
    if constexpr (MMA) {  // a tile: 8 gate rows, then their 8 up rows
      stage_pairs<BITS, D, VPL, NT>(xs);
      for (int tile = blockIdx.x; tile < HID / 8; tile += NB) {
        const float a = mma_tile<T, BITS, D, WARPS, MU>(xs, wi, si, bi, 8 * tile,
                                                        HID + 8 * tile, mpart, lane, warp);
        if (warp == 0) {
          const float up = __shfl_down_sync(0xffffffffu, a, 8);
          if (lane < 8) gated_out(8 * tile + lane, a, up);
        }
      }
    } else {
      for (int t = gw; t < HID / RWG; t += TW) {
        int rows[2 * RWG];
        float acc[2 * RWG];
#pragma unroll
        for (int r = 0; r < RWG; ++r) { rows[r] = t * RWG + r; rows[RWG + r] = HID + t * RWG + r; }
        gemv_rows_u<T, BITS, D, GROUP, 2 * RWG, unroll_for<2 * RWG>(LOADS)>(xs, wi, si, bi, rows,
                                                                             acc, lane);
#pragma unroll
        for (int r = 0; r < RWG; ++r) {
          if (lane == r) gated_out(rows[r], acc[r], acc[RWG + r]);
        }
      }
    }
    if constexpr ((PF & 8) != 0) prefetch_tasks<T, BITS, HID, GROUP, RWD, D, TW>(wd, sd, bd, gw, lane);
    grid_sync<AR>(bar, NB);
    tick(4 + 5 * l);

    // 5. Down projection + residual.
    stage_x<T, VPL, HID, NT, true, false>(hb, nullptr, 0.f, xs, red);
    if constexpr (MMA) {
      stage_pairs<BITS, HID, VPL, NT>(xs);
      mma_add_rows<T, BITS, HID, D, NB, WARPS, MU>(x, x, xs, wd, sd, bd, mpart, lane, warp);
    } else {
      add_rows<T, BITS, HID, GROUP, RWD, D, TW, LOADS>(x, x, xs, wd, sd, bd, gw, lane);
    }
    if constexpr ((PF & 16) != 0) {  // the next layer's QKV rows (RoPE pairs: RWQ a task)
      if (l + 1 < L) {
        const void* const* pn = pl + PER_LAYER;
        for (int t = gw; t < 3 * D / RWQ; t += TW)
          prefetch_rows<T, BITS, D, GROUP>(pn[1], (const T*)pn[2], (const T*)pn[3], t * RWQ, RWQ,
                                           lane);
      }
    }
    if (l + 1 < L || LAST) grid_sync<AR>(bar, NB);
    tick(5 + 5 * l);
  }

  if constexpr (LAST) {  // out_norm, each block writing its share
    stage_x<T, VPL, D, NT, true, true>(x, out_norm, {eps}f, xs, red);
    for (int i = blockIdx.x * NT + threadIdx.x; i < D; i += NB * NT)
      y[i] = from_f<T>(xs[xs_at<VPL, D / VPL>(i)]);
  }
"""


def _layer_names(l: int) -> list[str]:
    return [f"n1_{l}", f"wq_{l}", f"sq_{l}", f"bq_{l}", f"wo_{l}", f"so_{l}", f"bo_{l}",
            f"n2_{l}", f"wi_{l}", f"si_{l}", f"bi_{l}", f"wd_{l}", f"sd_{l}", f"bd_{l}",
            f"kr_{l}", f"vr_{l}", f"kp_{l}", f"vp_{l}"]




@functools.cache
def _kernel(layers: int, scale: float, neg_log_base_2_over_hd: float, blocks_per_sm: int = 1,
            table: bool = False):
    """The step kernel over `layers` layers. With `table`, a layer's weights come from `wtab`
    (weight_table's device addresses) and only the rings are inputs of their own."""
    names = ["x0", "pos", "meta", "cnt", "sync", "out_norm"]
    if table:
        names.append("wtab")
        for l in range(layers):
            names += _layer_names(l)[_WEIGHTS:]
        rings = " ".join(f"lp[{l * _PER_LAYER + i}] = {n};" for l in range(layers)
                         for i, n in enumerate(_layer_names(l)) if i >= _WEIGHTS)
        layer_ptrs = (f"if (threadIdx.x == 0) {{ {rings} }}\n"
                      f"  for (int i = threadIdx.x; i < L * {_WEIGHTS}; i += NT)\n"
                      f"    lp[i / {_WEIGHTS} * PER_LAYER + i % {_WEIGHTS}]"
                      " = (const void*)wtab[i];")
    else:
        for l in range(layers):
            names += _layer_names(l)
        layer_ptrs = "if (threadIdx.x == 0) { " + " ".join(
            f"lp[{l * _PER_LAYER + i}] = {n};"
            for l in range(layers) for i, n in enumerate(_layer_names(l))) + " }"
    src = (_BODY.replace("{layer_ptrs}", layer_ptrs).replace("{eps}", repr(float(RMS_EPS)))
           .replace("{scale}", repr(float(scale)))
           .replace("{neg_log_base_2_over_hd}", repr(float(neg_log_base_2_over_hd))))
    header = fused._HEADER + fused._RING_HELPERS + depth_kernel._HELPERS + _HELPERS
    if blocks_per_sm > 1:
        header += depth_kernel.LAUNCH_BOUNDS.format(threads=WARPS * 32, blocks=blocks_per_sm)
    digest = hashlib.sha1((header + src).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"parley_temporal_{digest}", input_names=names,
                               output_names=["y", "x", "q", "k", "v", "attn", "hb", "part",
                                             "ticks"],
                               source=src, header=header)


@functools.cache
def _capture_kernel(n: int):
    names = [f"w{i}" for i in range(n)]
    src = ("if (threadIdx.x == 0 && blockIdx.x == 0) {\n"
           + "".join(f"  table[{i}] = (unsigned long long)(const void*)w{i};\n" for i in range(n))
           + "}")
    # ensure_row_contiguous off: MLX would copy a strided input into a temporary, whose address
    # would outlive it; the weights are dense arrays of their own (loaded, converted or made).
    return mx.fast.cuda_kernel(name=f"parley_weight_table_{n}", input_names=names,
                               output_names=["table"], source=src, ensure_row_contiguous=False)


def _layer_weights(layer, dtype: mx.Dtype) -> list[mx.array]:
    """A layer's weight arrays in _layer_names' order (the first _WEIGHTS of them)."""
    return [layer.norm1, *fused._weights(layer.in_proj, dtype),
            *fused._weights(layer.out_proj, dtype), layer.norm2,
            *fused._weights(layer.linear_in, dtype), *fused._weights(layer.linear_out, dtype)]


class WeightTables:
    """For each launch of a step, one uint64 array of its layers' weights' device addresses
    (_WEIGHTS a layer, in _layer_names' order), so a launch takes one input for its weights
    instead of ~112. MLX encodes every input of a launch and counts its bytes toward committing
    its CUDA graph (MLX_MAX_MB_PER_BUFFER, 400 MB on an H100/H200), so eight layers' weights as
    inputs (~900 MB at 4 bits) likely make each launch a graph of its own; on the H200 the
    tables took handing a step over from 0.93 to 0.62 ms (docs/benchmarks.md, session 11).
    Holds the arrays it points at, so they live as long as the addresses are used. Only for
    weights, which nothing writes after loading; the rings, written in place and replaced by
    resets, stay inputs of their own (MLX orders the launches that touch them).
    """

    def __init__(self, temporal, dtype: mx.Dtype):
        self.held, self.tables = [], []
        layers = temporal.layers
        for first in range(0, len(layers), LAYERS_PER_LAUNCH):
            ws = []
            for layer in layers[first:first + LAYERS_PER_LAUNCH]:
                ws += _layer_weights(layer, dtype)
            mx.eval(ws)
            table = _capture_kernel(len(ws))(inputs=ws, grid=(32, 1, 1), threadgroup=(32, 1, 1),
                                             output_shapes=[(len(ws),)],
                                             output_dtypes=[mx.uint64])[0]
            mx.eval(table)
            self.held.append(ws)
            self.tables.append(table)


def supports(temporal, dtype: mx.Dtype, head_dim: int,
             layers_a_launch: int | None = None) -> bool:
    """Whether `temporal` (a Temporal) fits the kernel: every linear in fused.py's layouts with
    one BITS/GROUP for all, heads fused.ring_item takes, and a staged input that fits a block's
    shared memory (with `layers_a_launch` layers a launch, default LAYERS_PER_LAUNCH: each adds
    its arrays' addresses to a block's shared memory)."""
    if dtype not in (mx.bfloat16, mx.float32) or fused.ring_layout(head_dim) is None:
        return False
    lins = [lin for layer in temporal.layers
            for lin in (layer.in_proj, layer.out_proj, layer.linear_in, layer.linear_out)]
    if not all(fused.supports(lin, dtype) for lin in lins):
        return False
    if len({(lin.bits, lin.group_size) for lin in lins}) != 1:
        return False
    D = fused._shape(temporal.layers[0].out_proj)[0]
    HID = fused._shape(temporal.layers[0].linear_out)[1]
    lin = temporal.layers[0].in_proj
    vpl = 128 // lin.bits if lin.quantized else 16 // dtype.size
    floats = max(_xs_floats(D, vpl), _xs_floats(HID, vpl))
    lpl = LAYERS_PER_LAUNCH if layers_a_launch is None else layers_a_launch
    return D % temporal.num_heads == 0 and floats + 32 + lpl * _PER_LAYER * 2 <= 12 * 1024


def _xs_floats(k: int, vpl: int) -> int:
    return vpl * (k // vpl + 1)


def _geometry(temporal, dtype: mx.Dtype, slots: int,
              mma: bool = False) -> tuple[int, int, int, int]:
    """(attention chunks a head, slots a chunk, floats of a block's staged input, blocks an SM)
    of a launch over a ring of `slots` (with `mma`, room for the tensor-core products' staged
    pairs and group sums too)."""
    D = fused._shape(temporal.layers[0].out_proj)[0]
    HID = fused._shape(temporal.layers[0].linear_out)[1]
    hd = D // temporal.num_heads
    chunks = -(-slots // (RING_CHUNK or fused.RING_CHUNK))
    cl = -(-slots // chunks)
    lin = temporal.layers[0].in_proj
    vpl = 128 // lin.bits if lin.quantized else 16 // dtype.size
    xs = max(_xs_floats(D, vpl), _xs_floats(HID, vpl), cl + WARPS * hd)
    if mma:  # 16 bytes a weight word's x pairs (8 or 4 values), then a float a group
        xs = max(xs, *(4 * k * lin.bits // 32 + k // 64 for k in (D, HID)))
    bps = blocks_that_fit(BLOCKS_PER_SM, 4 * (xs + 33) + 8 * LAYERS_PER_LAUNCH * _PER_LAYER)
    return chunks, cl, xs, bps


def launch_settings(temporal, dtype: mx.Dtype, slots: int) -> dict:
    """How the step's launches are laid out on this GPU (for `parley bench --json`)."""
    mma = _uses_mma(temporal, dtype)
    _, _, _, bps = _geometry(temporal, dtype, slots, mma)
    return {"layers_per_launch": LAYERS_PER_LAUNCH, "blocks_per_sm": bps,
            "sms": depth_kernel.sm_count(), "loads_in_flight": LOADS,
            "l2_prefetch": PREFETCH, "tensor_core_products": mma}


def _uses_mma(temporal, dtype: mx.Dtype) -> bool:
    """Whether the step's products run on the tensor cores: they fit, and MMA asks for them
    (None: at 4 bits, where they are faster)."""
    lin = temporal.layers[0].in_proj
    bits = lin.bits if lin.quantized else 0
    wanted = bits == 4 if MMA is None else MMA
    return wanted and mma_fits(dtype, bits, lin.group_size if lin.quantized else 0,
                               fused._shape(temporal.layers[0].out_proj)[0],
                               fused._shape(temporal.layers[0].linear_out)[1])


def mma_fits(dtype: mx.Dtype, bits: int, group: int, d: int, hidden: int) -> bool:
    """Whether the tensor-core products (MMA) take a model: bf16 activations, 4- or 8-bit
    weights in groups of 64, and both input widths (d, hidden) in 8 slices (a block's warps) of
    steps of 128 values; tiles of 16 rows (8 gate rows and their 8 up rows)."""
    return (dtype == mx.bfloat16 and bits in (4, 8) and group == 64
            and d % (128 * WARPS) == 0 and hidden % (128 * WARPS) == 0 and d % 16 == 0
            and hidden % 8 == 0)


def step(temporal, x: mx.array, offset: mx.array, meta: mx.array, counters: mx.array,
         barrier: mx.array, keys: list[mx.array], values: list[mx.array],
         key_params: list[mx.array], value_params: list[mx.array], probe: bool = False,
         submit=None, tables: WeightTables | None = None):
    """The one-position step: x [1, 1, D] at position `offset` (int32 scalar), meta = [slot, n]
    of the KV ring (KVRing.step_meta), counters uint32 [H] zeros (left zero), barrier a grid
    barrier state (depth_kernel.new_barrier), keys/values each layer's ring [1, H, S, hd]
    (written in place; uint8 for an 8-bit ring, whose rows' (scale, low) are key_params /
    value_params [1, H, S, 2], else those are dummies: KVRing.kernel_inputs) -> out_norm(h)
    [1, 1, D]. With `probe`, (out, ticks): for each launch the
    GPU clock in ns at its start and after each layer's five phases (uint64 [1 + 5 L]).
    `submit` (e.g. mx.async_eval; uncompiled callers only) is called with each launch's output
    but the last's, as soon as that launch is built. With `tables` (WeightTables of this
    temporal and dtype) each launch takes its weights through its table."""
    dtype = x.dtype
    layers = temporal.layers
    H = temporal.num_heads
    D = fused._shape(layers[0].out_proj)[0]
    HID = fused._shape(layers[0].linear_out)[1]
    hd = D // H
    S = int(keys[0].shape[2])
    lpr = _lanes_a_row(hd, keys[0].dtype == mx.uint8)
    lin = layers[0].in_proj
    bits = lin.bits if lin.quantized else 0
    mma = _uses_mma(temporal, dtype)
    chunks, cl, xs, bps = _geometry(temporal, dtype, S, mma)
    nb = depth_kernel.sm_count() * bps
    warps = nb * WARPS
    c = -math.log(temporal.max_period) * 2 / hd
    pos = offset.reshape(1).astype(mx.int32)
    h = x.reshape(D)
    n = len(layers)
    ticks = []
    for first in range(0, n, LAYERS_PER_LAUNCH):
        group = range(first, min(first + LAYERS_PER_LAUNCH, n))
        last = group[-1] == n - 1
        ins = [h, pos, meta, counters, barrier, temporal.out_norm]
        if tables is not None:
            ins.append(tables.tables[first // LAYERS_PER_LAUNCH])
        for i in group:
            if tables is None:
                ins += _layer_weights(layers[i], dtype)
            ins += [keys[i], values[i], key_params[i], value_params[i]]
        template = [("T", dtype), ("BITS", bits), ("GROUP", lin.group_size if bits else 64),
                    ("D", D), ("HID", HID), ("H", H), ("HD", hd), ("L", len(group)),
                    ("S", S), ("C", chunks), ("CL", cl), ("LPR", lpr), ("NB", nb),
                    ("WARPS", WARPS), ("XS", xs), ("PER_LAYER", _PER_LAYER), ("LAST", last),
                    ("AR", os.environ.get("PARLEY_DEPTH_BARRIER") == "acqrel"),
                    ("PROBE", probe), ("LOADS", LOADS), ("Q8", keys[0].dtype == mx.uint8),
                    ("PF", PREFETCH), ("MMA", mma), ("MU", MMA_STEPS),
                    ("RWQ", _even_rows(3 * D, warps)),
                    ("RWO", depth_kernel._rows_per_warp(D, warps)),
                    ("RWG", depth_kernel._rows_per_warp(HID, warps)),
                    ("RWD", depth_kernel._rows_per_warp(D, warps))]
        kern = _kernel(len(group), attention_scale(hd), c, bps, tables is not None)
        outs = kern(inputs=ins, template=template,
                    output_shapes=[(D if last else 1,), (D,), (D,), (D,), (D,), (D,), (HID,),
                                   (H * chunks * (hd + 2),), (1 + 5 * len(group) if probe else 1,)],
                    output_dtypes=[dtype] * 7 + [mx.float32, mx.uint64],
                    grid=(nb * WARPS * 32, 1, 1), threadgroup=(WARPS * 32, 1, 1))
        h = outs[0] if last else outs[1]
        ticks.append(outs[8])
        if submit is not None and not last:
            submit(h)
    out = h.reshape(1, 1, D)
    return (out, ticks) if probe else out


def blocks_that_fit(wanted: int, block_shared_bytes: int) -> int:
    """Blocks an SM for the grid: `wanted`, fewer if the SM's shared memory cannot hold them all
    at once (each block also takes 1 KB the runtime reserves), 1 if the driver cannot say."""
    if wanted <= 1:
        return 1
    per_sm = depth_kernel.shared_memory_per_sm()
    if per_sm is None:
        return 1
    return max(1, min(wanted, per_sm // (block_shared_bytes + 1024)))


def _lanes_a_row(hd: int, quantized: bool = False) -> int:
    """Lanes that share a key row in the attention phase: RING_DPL values each if that splits the
    row into a power of two of lanes, at most a warp (whole 4-byte words of an 8-bit ring); else
    fused.ring_layout's choice."""
    if RING_DPL > 0 and hd % RING_DPL == 0 and not (quantized and RING_DPL % 4):
        lpr = hd // RING_DPL
        if 1 <= lpr <= 32 and not lpr & (lpr - 1):
            return lpr
    return fused.ring_layout(hd, quantized)[1]


def _even_rows(n: int, warps: int) -> int:
    """Rows per warp task of the QKV phase: 2 or 4 (RoPE rotates pairs of rows)."""
    return 2 if n % 4 or n // 2 <= warps else 4
