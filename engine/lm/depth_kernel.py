"""One CUDA kernel for a whole depth-transformer step, on MLX's CUDA backend only.

Why: with the per-layer fused kernels (engine/lm/fused.py) a live frame's depth transformer is
still ~200 kernels (8 steps x 6 layers x 4, plus the input projection and the head), and on CUDA
each costs MLX 5-10 µs of host time to issue however little it computes (docs/benchmarks.md).
This kernel runs one step — the
input projection plus the previous token's embedding (a plain table, or an MLX-quantized one
dequantized as MLX's CUDA backend does, `table_value`), every layer (RMSNorm + QKV, attention over
the frame's keys + out projection + residual, RMSNorm + gated FFN half, down projection +
residual) and the step's head — in one launch, so a step costs one kernel plus its sampling.

The phases between which every output row needs every input value are separated by a grid-wide
barrier (1 + 4 per layer). A grid barrier needs every block resident at once: the grid is one
block per streaming multiprocessor (`grid_blocks()`), which fits whatever else runs beside it,
and a barrier that waits past ~2 s gives up and raises a flag in the barrier state instead of hanging
the GPU (`barrier_failed`; the engine then falls back to the per-layer kernels, see
LMGen.check_depth_kernel). The barrier state is a small uint32 buffer owned by the caller and
written by the kernel although MLX passes it as an input: kernels using one buffer must not run
at the same time, which holds for a depth transformer's steps (each depends on the previous one's
token). Values written in this kernel and read by other blocks are read through L2 (`__ldcg`),
never from a possibly stale L1 line.

Numerics follow engine/lm/fused.py (and so the unfused MLX code): float32 sums, and a rounding to
the activation dtype wherever the unfused code stores an intermediate. Measured on the H100
(session 4): ~350-400 µs a step against ~25 µs of weight traffic, so a step is bound by its 25
phases' latency (memory round trips and barriers), not by bandwidth; see docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os

import mlx.core as mx

from . import fused
from .layers import RMS_EPS, Embedding, attention_scale

# Warps per block: 16 (512 threads). The kernel needs ~128 registers a thread, so one block an
# SM either way: with 8 warps (the first layout) only 8 warps hid a latency-bound step's loads.
# Launch bounds cap the registers at 128 so that a block of 16 fits an SM's 64K. Measured on
# the H200 (docs/benchmarks.md, session 13): a 4-bit frame back to back 9.12 -> 8.98 ms with
# `parley bench` (9.26 -> 8.76 ms in the timeline), ~0.3 ms more at real-time pace (a block that
# fills an SM waits for the encode worker's kernels to leave it).
# PARLEY_DEPTH_WARPS picks another count (8: the old layout); a block holds at most 32 warps
# (its reductions' scratch), so a value outside 1-32, or not a number, keeps 16. Read when a
# depth step is traced.
def warps_from(value: str | None) -> int:
    """Warps a block for a PARLEY_DEPTH_WARPS value (None: unset)."""
    return int(value) if value and value.isdigit() and 1 <= int(value) <= 32 else 16


WARPS = warps_from(os.environ.get("PARLEY_DEPTH_WARPS"))
_BARRIER_WORDS = 4  # arrived count, generation, failure flag, spare
_PER_LAYER = 14  # norm1, in_proj (w, s, b), out_proj (3), norm2, linear_in (3), linear_out (3)

_BODY = r"""
  using namespace parley;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gw = blockIdx.x * WARPS + warp;  // this warp's index in the grid
  constexpr int TW = NB * WARPS;             // warps in the grid
  constexpr int NT = WARPS * 32;             // threads a block
  constexpr int HD = D / H;
  constexpr int VPL = Pack<T, BITS>::VPL;
  constexpr int VPLH = Pack<T, HBITS>::VPL;
  unsigned int* bar = const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync));
  __shared__ float xs[XS];
  __shared__ float red[32];
  __shared__ const void* lp[L * PER_LAYER];
  __shared__ const T* kvp[NKV + 1];
  if (threadIdx.x == 0) {
    {layer_ptrs}
    {kv_ptrs}
    kvp[NKV] = kv;
  }
  __syncthreads();
  if constexpr (PF) {  // every weight row this warp reads in the step, asked of L2 at once
    prefetch_tasks<T, BITS, HIN, GROUP, RW0, D, TW>(win, win_s, win_b, gw, lane);
    for (int l = 0; l < L; ++l) {
      const void* const* p = lp + l * PER_LAYER;
      prefetch_tasks<T, BITS, D, GROUP, RWQ, 3 * D, TW>(p[1], (const T*)p[2], (const T*)p[3], gw,
                                                        lane);
      prefetch_tasks<T, BITS, D, GROUP, RWO, D, TW>(p[4], (const T*)p[5], (const T*)p[6], gw, lane);
      prefetch_tasks<T, BITS, D, GROUP, RWG, HID, TW>(p[8], (const T*)p[9], (const T*)p[10], gw,
                                                      lane);
      prefetch_tasks<T, BITS, D, GROUP, RWG, HID, TW>(p[8], (const T*)p[9], (const T*)p[10], gw,
                                                      lane, HID);
      prefetch_tasks<T, BITS, HID, GROUP, RWD, D, TW>(p[11], (const T*)p[12], (const T*)p[13], gw,
                                                      lane);
    }
    prefetch_tasks<T, HBITS, D, HGROUP, RWH, CARD, TW>(hw, hw_s, hw_b, gw, lane);
  }

  // Input: x = depformer_in(hn) + emb(token) (id -1 embeds as zeros).
  stage_x<T, VPL, HIN, NT, false, false>(hn, nullptr, 0.f, xs, red);
  {
    const int tk = tok[0];
    for (int t = gw; t < D / RW0; t += TW) {
      int rows[RW0];
      float acc[RW0];
#pragma unroll
      for (int r = 0; r < RW0; ++r) rows[r] = t * RW0 + r;
      // Lane r's embedding value, loaded before the product so the two overlap.
      const float e = (lane < RW0 && tk >= 0)
          ? table_value<T, EBITS, EGROUP, D>(emb, emb_s, emb_b, tk, t * RW0 + lane) : 0.f;
      gemv_rows<T, BITS, HIN, GROUP, RW0>(xs, win, win_s, win_b, rows, acc, lane);
#pragma unroll
      for (int r = 0; r < RW0; ++r) {
        if (lane == r) x[rows[r]] = from_f<T>(e + round_t<T>(acc[r]));
      }
    }
  }
  grid_sync<AR>(bar, NB);

  for (int l = 0; l < L; ++l) {
    const void* const* p = lp + l * PER_LAYER;  // this layer's arrays (see _layer_names)
    const float* n1 = (const float*)p[0];
    const void* wq = p[1];
    const T* sq = (const T*)p[2];
    const T* bq = (const T*)p[3];
    const void* wo = p[4];
    const T* so = (const T*)p[5];
    const T* bo = (const T*)p[6];
    const float* n2 = (const float*)p[7];
    const void* wi = p[8];
    const T* si = (const T*)p[9];
    const T* bi = (const T*)p[10];
    const void* wd = p[11];
    const T* sd = (const T*)p[12];
    const T* bd = (const T*)p[13];
    T* kl = kv + (size_t)l * 2 * D;  // this step's key and value for layer l

    // RMSNorm + QKV: q to scratch, k and v to this step's kv output.
    stage_x<T, VPL, D, NT, true, true>(x, n1, {eps}f, xs, red);
    for (int t = gw; t < 3 * D / RWQ; t += TW) {
      int rows[RWQ];
      float acc[RWQ];
#pragma unroll
      for (int r = 0; r < RWQ; ++r) rows[r] = t * RWQ + r;
      gemv_rows<T, BITS, D, GROUP, RWQ>(xs, wq, sq, bq, rows, acc, lane);
#pragma unroll
      for (int r = 0; r < RWQ; ++r) {
        if (lane == r) {
          const int row = rows[r];
          T* dst = row < D ? q + row : kl + (row - D);
          dst[0] = from_f<T>(acc[r]);
        }
      }
    }
    grid_sync<AR>(bar, NB);

    // Attention of the query over this frame's keys so far (every block computes all heads, a
    // warp per head, straight into its staged input), then out projection + residual.
    for (int h = warp; h < H; h += WARPS) {
      // Every value this warp needs is loaded at once (lane: dims lane, lane + 32, ...).
      constexpr int DPL = (HD + 31) / 32;
      float qv[DPL], kr[NKV + 1][DPL], vr[NKV + 1][DPL];
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        const bool in = HD % 32 == 0 || d < HD;
        qv[i] = in ? ld_cg(q + h * HD + d) : 0.f;
#pragma unroll
        for (int j = 0; j <= NKV; ++j) {
          const T* kj = (j == NKV ? (const T*)kl : kvp[j] + (size_t)l * 2 * D);
          kr[j][i] = in ? ld_cg(kj + h * HD + d) : 0.f;
          vr[j][i] = in ? ld_cg(kj + D + h * HD + d) : 0.f;
        }
      }
      float s[NKV + 1];
      float m = -3.0e38f;
#pragma unroll
      for (int j = 0; j <= NKV; ++j) {
        float part = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) part = fmaf(qv[i], kr[j][i], part);
        s[j] = warp_sum(part) * {scale}f;
        m = fmaxf(m, s[j]);
      }
      float total = 0.f;
#pragma unroll
      for (int j = 0; j <= NKV; ++j) { s[j] = expf(s[j] - m); total += s[j]; }
      const float inv = 1.f / total;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        if (HD % 32 == 0 || d < HD) {
          float o = 0.f;
#pragma unroll
          for (int j = 0; j <= NKV; ++j) o = fmaf(s[j], vr[j][i], o);
          xs[xs_at<VPL, D / VPL>(h * HD + d)] = round_t<T>(o * inv);
        }
      }
    }
    __syncthreads();
    add_rows_to<T, BITS, D, GROUP, RWO, D, TW>(x, xs, wo, so, bo, gw, lane);
    grid_sync<AR>(bar, NB);

    // RMSNorm + the gated half of the feed-forward.
    stage_x<T, VPL, D, NT, true, true>(x, n2, {eps}f, xs, red);
    for (int t = gw; t < HID / RWG; t += TW) {
      int rows[2 * RWG];
      float acc[2 * RWG];
#pragma unroll
      for (int r = 0; r < RWG; ++r) { rows[r] = t * RWG + r; rows[RWG + r] = HID + t * RWG + r; }
      gemv_rows<T, BITS, D, GROUP, 2 * RWG>(xs, wi, si, bi, rows, acc, lane);
#pragma unroll
      for (int r = 0; r < RWG; ++r) {
        if (lane == r) {
          const float g = round_t<T>(acc[r]);
          const float u = round_t<T>(acc[RWG + r]);
          const float sig = round_t<T>(1.f / (1.f + expf(-g)));
          hb[rows[r]] = from_f<T>(round_t<T>(g * sig) * u);
        }
      }
    }
    grid_sync<AR>(bar, NB);

    // Down projection + residual.
    stage_x<T, VPL, HID, NT, true, false>(hb, nullptr, 0.f, xs, red);
    add_rows_to<T, BITS, HID, GROUP, RWD, D, TW>(x, xs, wd, sd, bd, gw, lane);
    grid_sync<AR>(bar, NB);
  }

  // The step's head: logits over the codebook.
  stage_x<T, VPLH, D, NT, true, false>(x, nullptr, 0.f, xs, red);
  for (int t = gw; t < CARD / RWH; t += TW) {
    int rows[RWH];
    float acc[RWH];
#pragma unroll
    for (int r = 0; r < RWH; ++r) rows[r] = t * RWH + r;
    gemv_rows<T, HBITS, D, HGROUP, RWH>(xs, hw, hw_s, hw_b, rows, acc, lane);
#pragma unroll
    for (int r = 0; r < RWH; ++r) {
      if (lane == r) logits[rows[r]] = from_f<T>(acc[r]);
    }
  }
"""

_HELPERS = r"""
namespace parley {

// scale * q + bias as MLX's CUDA dequantization computes it: one fused multiply-add, rounded once
// to T (measured: MLX 0.32.4's CUDA `dequantize` equals this for bf16 and float32, whereas its
// CPU backend rounds the product first).
template <typename T> __device__ __forceinline__ float dequant(T s, uint32_t q, T b);
template <> __device__ __forceinline__ float dequant<float>(float s, uint32_t q, float b) {
  return fmaf(s, (float)q, b);
}
template <> __device__ __forceinline__ float dequant<__nv_bfloat16>(__nv_bfloat16 s, uint32_t q,
                                                                    __nv_bfloat16 b) {
  return __bfloat162float(__hfma(s, __float2bfloat16((float)q), b));  // q < 256: exact in bf16
}

// Value `col` of row `tk` of an embedding table [rows, D]: plain T (EBITS = 0), or MLX's affine
// quantization: a row's values packed little-endian into uint32 words (value i at bit i * EBITS
// of the row, so 3, 5 and 6 bits can straddle two words), a scale and a bias every EGROUP values.
template <typename T, int EBITS, int EGROUP, int D>
__device__ __forceinline__ float table_value(const void* emb, const T* scales, const T* biases,
                                             int tk, int col) {
  if constexpr (EBITS == 0) {
    return to_f(reinterpret_cast<const T*>(emb)[(size_t)tk * D + col]);
  } else {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(emb) + (size_t)tk * (D * EBITS / 32);
    const int bit = col * EBITS;
    uint32_t u = w[bit / 32] >> (bit % 32);
    if constexpr (32 % EBITS != 0) {
      if (bit % 32 + EBITS > 32) u |= w[bit / 32 + 1] << (32 - bit % 32);
    }
    const size_t g = (size_t)tk * (D / EGROUP) + col / EGROUP;
    return dequant<T>(scales[g], u & ((1u << EBITS) - 1u), biases[g]);
  }
}

// Asks L2 to fetch the 16-byte-aligned interior of [p, p + bytes): a hint, nothing comes back
// and nothing waits for it. On Hopper one bulk prefetch (lane 0), before that a line a lane.
__device__ __forceinline__ void l2_prefetch(const void* p, size_t bytes, int lane) {
  const size_t a = (reinterpret_cast<size_t>(p) + 15) & ~size_t(15);
  const size_t e = (reinterpret_cast<size_t>(p) + bytes) & ~size_t(15);
  if (e <= a) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (lane == 0)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"((unsigned)(e - a))
                 : "memory");
#else
  for (size_t q = a + 128 * (size_t)lane; q < e; q += 128 * 32)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(q));
#endif
}

// Rows [r0, r0 + cnt) of a product's matrix (K inputs) into L2: weights, scales and biases.
template <typename T, int BITS, int K, int GROUP>
__device__ __forceinline__ void prefetch_rows(const void* w, const T* s, const T* b, int r0,
                                              int cnt, int lane) {
  constexpr size_t RB = BITS ? (size_t)K * BITS / 8 : (size_t)K * sizeof(T);
  l2_prefetch(reinterpret_cast<const char*>(w) + (size_t)r0 * RB, (size_t)cnt * RB, lane);
  if constexpr (BITS != 0) {
    constexpr size_t G = K / GROUP;
    l2_prefetch(s + (size_t)r0 * G, (size_t)cnt * G * sizeof(T), lane);
    l2_prefetch(b + (size_t)r0 * G, (size_t)cnt * G * sizeof(T), lane);
  }
}

// Every task of this warp in a product of N rows, RW rows a task (tasks as add_rows takes them).
template <typename T, int BITS, int K, int GROUP, int RW, int N, int TW>
__device__ __forceinline__ void prefetch_tasks(const void* w, const T* s, const T* b, int gw,
                                               int lane, int row_offset = 0) {
  for (int t = gw; t < N / RW; t += TW)
    prefetch_rows<T, BITS, K, GROUP>(w, s, b, row_offset + t * RW, RW, lane);
}

// x[row] += T(W[row] . staged xs) for the rows of every task t of this warp (RW rows a task):
// a projection added to the residual stream in place (each row read and written by one lane).
template <typename T, int BITS, int K, int GROUP, int RW, int N, int TW>
__device__ __forceinline__ void add_rows_to(T* x, const float* xs, const void* w, const T* s,
                                            const T* b, int gw, int lane) {
  for (int t = gw; t < N / RW; t += TW) {
    int rows[RW];
    float acc[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) rows[r] = t * RW + r;
    const float resv = lane < RW ? ld_cg(x + t * RW + lane) : 0.f;  // lane r's residual
    gemv_rows<T, BITS, K, GROUP, RW>(xs, w, s, b, rows, acc, lane);
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      if (lane == r) x[rows[r]] = from_f<T>(resv + round_t<T>(acc[r]));
    }
  }
}

// Grid-wide barrier (every block resident: the grid is at most one block per SM). bar[0] counts
// arrivals, bar[1] is the generation the last arrival bumps, bar[2] is raised if a wait gives up
// (~2 s), so a misconfigured grid fails loudly instead of hanging the GPU. AR = false orders
// memory with full fences (__threadfence, as cooperative groups do); AR = true with
// acquire/release atomics and loads at GPU scope, which order the same things more cheaply
// (experimental: PARLEY_DEPTH_BARRIER=acqrel, to be measured).
template <bool AR = false>
__device__ __forceinline__ void grid_sync(unsigned int* bar, unsigned int nblocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const long long t0 = clock64();
    if constexpr (AR) {
      unsigned int g, old, cur;
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(g) : "l"(bar + 1) : "memory");
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(bar) : "memory");
      if (old == nblocks - 1) {
        asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" :: "l"(bar), "r"(0u) : "memory");
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(bar + 1) : "memory");
      } else {
        do {
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(cur) : "l"(bar + 1) : "memory");
          if (clock64() - t0 > 4000000000LL) { atomicExch(bar + 2, 1u); break; }
        } while (cur == g);
      }
    } else {
      volatile unsigned int* gen = bar + 1;
      const unsigned int g = *gen;
      __threadfence();
      if (atomicAdd(bar, 1u) == nblocks - 1) {
        atomicExch(bar, 0u);
        __threadfence();
        atomicAdd(bar + 1, 1u);
      } else {
        while (*gen == g) {
          if (clock64() - t0 > 4000000000LL) { atomicExch(bar + 2, 1u); break; }
        }
      }
      __threadfence();
    }
  }
  __syncthreads();
}

}  // namespace parley
"""


def _layer_names(l: int) -> list[str]:
    return [f"n1_{l}", f"wq_{l}", f"sq_{l}", f"bq_{l}", f"wo_{l}", f"so_{l}", f"bo_{l}",
            f"n2_{l}", f"wi_{l}", f"si_{l}", f"bi_{l}", f"wd_{l}", f"sd_{l}", f"bd_{l}"]


# Launch bounds (the temporal kernel's BLOCKS_PER_SM > 1, this kernel's WARPS > 8). MLX's
# cuda_kernel writes the kernel's signature itself, so the bounds ride on the `__global__` it
# writes: redefined after every header that uses it, to carry them (the kernel is the only
# function declared after our header).
LAUNCH_BOUNDS = """
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__({threads}, {blocks})
"""
# The same with a register cap instead (CUDA 12.4+; it cannot go with launch bounds).
MAX_REGISTERS = """
#undef __global__
#define __global__ __attribute__((global)) __maxnreg__({regs})
"""


@functools.cache
def _kernel(layers: int, nkv: int, scale: float, warps: int = 8):
    names = ["hn", "tok", "emb", "emb_s", "emb_b", "win", "win_s", "win_b"]
    for l in range(layers):
        names += _layer_names(l)
    names += ["hw", "hw_s", "hw_b"] + [f"kv{j}" for j in range(nkv)] + ["sync"]
    layer_ptrs = " ".join(f"lp[{l * _PER_LAYER + i}] = {n};"
                          for l in range(layers) for i, n in enumerate(_layer_names(l)))
    kv_ptrs = " ".join(f"kvp[{j}] = kv{j};" for j in range(nkv))
    src = (_BODY.replace("{layer_ptrs}", layer_ptrs).replace("{kv_ptrs}", kv_ptrs)
           .replace("{eps}", repr(float(RMS_EPS))).replace("{scale}", repr(float(scale))))
    header = fused._HEADER + _HELPERS
    if warps >= 16:  # at most 65536 / threads registers (128 at 16 warps): a block fits an SM
        header += LAUNCH_BOUNDS.format(threads=warps * 32, blocks=1)
    elif warps > 8:  # launch bounds would allow more than 128 (150 at 12 warps): cap at 128, so
        header += MAX_REGISTERS.format(regs=128)  # the SM keeps room for the encode's blocks
    digest = hashlib.sha1((header + src).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"parley_depth_step_{digest}", input_names=names,
                               output_names=["logits", "kv", "x", "q", "hb"], source=src,
                               header=header)


# PARLEY_DEPTH_PREFETCH=1: each warp asks L2 for every weight row it will read in the step as
# the step starts (~40 MB at 4 bits, within an H100/H200's 50 MB of L2), so the phases after the
# first read from L2 instead of waiting on DRAM between their barriers. A hint: no value changes.
# Read when a depth step is traced. Measured on the H200 (docs/benchmarks.md, session 12): no
# gain (4-bit frame 9.19 ms with it, 9.04 without), so off.
PREFETCH = int(os.environ.get("PARLEY_DEPTH_PREFETCH", "0") or 0)

# Blocks in the depth step kernel's grid; 0: one a streaming multiprocessor (`sm_count()`).
# PARLEY_DEPTH_BLOCKS sets it, to measure: fewer blocks make each grid barrier cheaper (a step
# has ~26) and each product's share of the reads larger. Read when a depth step is traced.
BLOCKS = int(os.environ.get("PARLEY_DEPTH_BLOCKS", "0") or 0)


def grid_blocks() -> int:
    """The depth step kernel's grid: BLOCKS, else one block a streaming multiprocessor. Blocks
    of more than 8 warps take a whole SM's registers, so then BLOCKS is capped at one an SM (a
    grid that is not resident at once fails its barriers)."""
    if BLOCKS <= 0:
        return sm_count()
    return min(BLOCKS, sm_count()) if WARPS > 8 else BLOCKS


@functools.cache
def sm_count() -> int:
    """Streaming multiprocessors of CUDA device 0 (from the driver); 32 if the driver cannot
    say (a grid that small fits any CUDA GPU MLX supports)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, n = ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0):
            return 32
        # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
        if cuda.cuDeviceGetAttribute(ctypes.byref(n), 16, dev) or n.value <= 0:
            return 32
        return int(n.value)
    except OSError:
        return 32


@functools.cache
def shared_memory_per_sm() -> int | None:
    """Bytes of shared memory an SM of CUDA device 0 has for its resident blocks (from the
    driver), or None if the driver cannot say."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, n = ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0):
            return None
        # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81
        if cuda.cuDeviceGetAttribute(ctypes.byref(n), 81, dev) or n.value <= 0:
            return None
        return int(n.value)
    except OSError:
        return None


def _rows_per_warp(n: int, warps: int) -> int:
    """Rows per warp task: the smallest of 1, 2, 4 dividing n that leaves no more tasks than the
    grid has warps (more rows per warp = more loads in flight per warp)."""
    for rw in (1, 2, 4):
        if n % rw == 0 and n // rw <= warps:
            return rw
    return 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1


def _xs_floats(k: int, vpl: int) -> int:
    return vpl * (k // vpl + 1)


_TABLE_BITS = (2, 3, 4, 5, 6, 8)  # every width MLX's affine quantization packs
_TABLE_GROUPS = (32, 64, 128)


def _table_fits(table: Embedding, d: int, dtype: mx.Dtype) -> bool:
    """Whether an embedding table fits `table_value`: rows of d values, plain in `dtype`, or
    affine-quantized the MLX way with scales and biases in `dtype` (its bits and group need not
    be the linears')."""
    if table.scales is None:
        return table.weight.dtype == dtype and int(table.weight.shape[-1]) == d
    return (table.bits in _TABLE_BITS and table.group_size in _TABLE_GROUPS
            and d % table.group_size == 0 and table.weight.dtype == mx.uint32
            and int(table.weight.shape[-1]) * 32 == d * table.bits
            and table.scales.dtype == dtype and table.biases.dtype == dtype)


def _table_arrays(table: Embedding, dtype: mx.Dtype) -> list[mx.array]:
    """The kernel's emb, emb_s and emb_b inputs (a plain table gets dummy scales and biases,
    unused with EBITS = 0)."""
    if table.scales is not None:
        return [table.weight, table.scales, table.biases]
    dummy = mx.zeros((1,), dtype=dtype)
    return [table.weight, dummy, dummy]


def supports(dep, dtype: mx.Dtype) -> bool:
    """Whether `dep` (a Depformer) fits the kernel: every linear in fused.py's layouts, the
    layers' linears alike (one BITS/GROUP), embedding tables plain or MLX-quantized
    (`_table_fits`), heads divisible by H."""
    if dtype not in (mx.bfloat16, mx.float32):
        return False
    lins = [dep.depformer_in.step(0)]
    for layer in dep.layers:
        lins += [lin.step(0) for lin in (layer.in_proj, layer.out_proj, layer.linear_in,
                                         layer.linear_out)]
    if not all(fused.supports(lin, dtype) for lin in lins + [dep.heads.step(0)]):
        return False
    if len({(lin.bits, lin.group_size) for lin in lins}) != 1:
        return False
    d = int(dep.layers[0].out_proj.step(0).weight.shape[-2])
    tables: list[Embedding] = [dep.text_emb, *dep.emb]
    if not all(_table_fits(t, d, dtype) for t in tables):
        return False
    return d % dep.num_heads == 0 and d // dep.num_heads <= 1024 and dep.num_steps <= 64


def step(dep, k: int, hn: mx.array, token: mx.array, priors: list[mx.array],
         barrier: mx.array) -> tuple[mx.array, mx.array]:
    """Depth step k for one position: hn [..., HIN] (the temporal output), token (int, one value:
    the token conditioning step k), `priors` the kv outputs of the earlier steps it attends to ->
    (logits [card], kv [L·2·D]: this step's keys and values for the later steps)."""
    dtype = hn.dtype
    layers = dep.layers
    L = len(layers)
    din = dep.depformer_in.step(k)
    D, HIN = fused._shape(din)
    HID = fused._shape(layers[0].linear_out.step(k))[1]
    head = dep.heads.step(k)
    CARD = fused._shape(head)[0]
    H = dep.num_heads
    nb = grid_blocks()
    warps = nb * WARPS
    vpl = 128 // din.bits if din.quantized else 16 // dtype.size
    vplh = 128 // head.bits if head.quantized else 16 // dtype.size
    xs = max(_xs_floats(HIN, vpl), _xs_floats(D, vpl), _xs_floats(HID, vpl), _xs_floats(D, vplh))
    table = dep.text_emb if k == 0 else dep.emb[k - 1]
    ins = [hn.reshape(HIN), token.reshape(1).astype(mx.int32), *_table_arrays(table, dtype),
           *fused._weights(din, dtype)]
    for layer in layers:
        ins += [layer.norm1, *fused._weights(layer.in_proj.step(k), dtype),
                *fused._weights(layer.out_proj.step(k), dtype), layer.norm2,
                *fused._weights(layer.linear_in.step(k), dtype),
                *fused._weights(layer.linear_out.step(k), dtype)]
    ins += [*fused._weights(head, dtype), *[p.reshape(-1) for p in priors], barrier]
    hd = D // H
    template = [("T", dtype), ("BITS", din.bits if din.quantized else 0),
                ("GROUP", din.group_size if din.quantized else 64),
                ("HBITS", head.bits if head.quantized else 0),
                ("HGROUP", head.group_size if head.quantized else 64),
                ("EBITS", table.bits if table.scales is not None else 0),
                ("EGROUP", table.group_size if table.scales is not None else 64),
                ("HIN", HIN), ("D", D), ("HID", HID), ("CARD", CARD), ("H", H), ("L", L),
                ("NKV", len(priors)), ("NB", nb), ("WARPS", WARPS), ("XS", xs),
                ("AR", os.environ.get("PARLEY_DEPTH_BARRIER") == "acqrel"),
                ("PER_LAYER", _PER_LAYER), ("PF", bool(PREFETCH)),
                ("RW0", _rows_per_warp(D, warps)), ("RWQ", _rows_per_warp(3 * D, warps)),
                ("RWO", _rows_per_warp(D, warps)), ("RWG", _rows_per_warp(HID, warps)),
                ("RWD", _rows_per_warp(D, warps)), ("RWH", _rows_per_warp(CARD, warps))]
    kern = _kernel(L, len(priors), attention_scale(hd), WARPS)
    logits, kv, _, _, _ = kern(
        inputs=ins, template=template,
        output_shapes=[(CARD,), (L * 2 * D,), (D,), (D,), (HID,)],
        output_dtypes=[dtype] * 5,
        grid=(nb * WARPS * 32, 1, 1), threadgroup=(WARPS * 32, 1, 1))
    return logits, kv


def new_barrier() -> mx.array:
    """A zeroed barrier state for `step` (evaluated: it is written in place by the kernel)."""
    b = mx.zeros((_BARRIER_WORDS,), dtype=mx.uint32)
    mx.eval(b)
    return b


def barrier_failed(barrier: mx.array) -> bool:
    """Whether a grid barrier gave up waiting (the grid did not fit the GPU at once): the
    kernel's results are then wrong."""
    return bool(int(barrier[2].item()) != 0)
