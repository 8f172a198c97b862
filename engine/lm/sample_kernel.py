"""Top-k sampling of one token as one CUDA kernel, on MLX's CUDA backend only (the default there;
PARLEY_FUSED_SAMPLING=0 keeps engine/lm/sampling.py's MLX operations).

Why: between two depth steps engine/lm/sampling.py's `sample` is ~7 MLX operations (a cast and
scale, argpartition, two gathers, the categorical draw's noise, add and argmax) and their launch
gaps; on the H200 the depth step kernel itself takes 157 µs of a ~375 µs step (docs/benchmarks.md,
session 5), the rest is this glue. Here one block of 512 threads does it all:

1. x = logits / temperature in float32 (as `sample` computes it);
2. the k-th largest x by a radix select on x's order-preserving 32-bit key (four 8-bit passes
   of a shared-memory histogram), so the candidates are exactly k: every x above that value and,
   of the x equal to it, those of lowest index (`argpartition` breaks such ties its own way; any
   choice is a valid top-k set);
3. the draw: argmax over the candidates of x + g, g standard Gumbel noise given per vocabulary
   entry (drawn with `mx.random.gumbel`, once per frame for all steps). The Gumbel-max draw over
   the candidates has the distribution of `mx.random.categorical` over them (softmax of the top-k
   at that temperature); the random numbers map to tokens differently, so sampled tokens differ
   from `sample`'s for one key while their distribution does not. Ties in x + g go to the lowest
   index.

It also applies the frame's forced token (teacher forcing): outputs [sampled, conditioning],
the conditioning being the forced value where the mask says so.
"""

from __future__ import annotations

import functools
import hashlib
import os

import mlx.core as mx

from . import fused

THREADS = 512  # one block; 512 leaves room for up to 128 registers a thread

_SOURCE = r"""
  using namespace parley;
  constexpr int E = (V + NT - 1) / NT;   // entries a thread owns: [tid * E, tid * E + E)
  __shared__ unsigned int hist[256];
  __shared__ unsigned int sh_bin, sh_rem;
  __shared__ unsigned int wsum[NT / 32];
  __shared__ float best_v[NT / 32];
  __shared__ int best_i[NT / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // x and its order-preserving key are recomputed from the logits (L1-resident) on every pass
  // rather than held: a vocabulary of 32000 would need more registers than a block has.
  // Round-to-nearest division whatever the compiler's math flags: x must equal `sample`'s.
  auto x_at = [&](int i) { return __fdiv_rn(to_f(logits[i]), {temp}f); };
  auto key_of = [](float f) {
    const unsigned int b = f == 0.0f ? 0u : __float_as_uint(f);  // -0 and +0: one key
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  };
  // The key of the TOPK-th largest x, and how many entries equal to it are candidates.
  unsigned int prefix = 0u, pmask = 0u, rem = TOPK;
  if (TOPK < V) {
#pragma unroll 1
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      for (int i = tid; i < 256; i += NT) hist[i] = 0u;
      __syncthreads();
      for (int i = tid * E; i < min(tid * E + E, V); ++i) {
        const unsigned int key = key_of(x_at(i));
        if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l holds bins 8l .. 8l+7; `above` counts the entries in higher bins.
        unsigned int c[8], total = 0u;
#pragma unroll
        for (int j = 0; j < 8; ++j) { c[j] = hist[lane * 8 + j]; total += c[j]; }
        unsigned int above = 0u;
        for (int o = 0; o < 32; ++o) {  // every lane takes part in every shuffle
          const unsigned int t = __shfl_sync(0xffffffffu, total, o);
          if (o > lane) above += t;
        }
#pragma unroll
        for (int j = 7; j >= 0; --j) {
          if (above < rem && above + c[j] >= rem) { sh_bin = lane * 8 + j; sh_rem = rem - above; }
          above += c[j];
        }
      }
      __syncthreads();
      prefix |= sh_bin << shift;
      pmask |= 255u << shift;
      rem = sh_rem;
      __syncthreads();
    }
  }
  // Ranks, by index, of the entries equal to the threshold (only the first `rem` are candidates).
  unsigned int eq = 0u;
  if (TOPK < V) {
    for (int i = tid * E; i < min(tid * E + E, V); ++i) eq += key_of(x_at(i)) == prefix ? 1u : 0u;
  }
  unsigned int incl = eq;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) wsum[warp] = incl;
  __syncthreads();
  unsigned int base = incl - eq;
  for (int w = 0; w < warp; ++w) base += wsum[w];
  // The draw: argmax of x + g over the candidates, lowest index on ties.
  float bv = -3.4e38f;
  int bi = 0x7fffffff;
  for (int i = tid * E; i < min(tid * E + E, V); ++i) {
    const float xi = x_at(i);
    bool cand = true;
    if (TOPK < V) {
      const unsigned int key = key_of(xi);
      if (key == prefix) { cand = base < rem; ++base; }
      else cand = key > prefix;
    }
    if (cand) {
      const float s = xi + noise[i];
      if (s > bv || (s == bv && i < bi)) { bv = s; bi = i; }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < NT / 32; ++w) {
      if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) { bv = best_v[w]; bi = best_i[w]; }
    }
    if (bi >= V) bi = 0;  // every score NaN: a defined token rather than garbage
    out[0] = bi;
    out[1] = forced[2 * J] ? forced[2 * J + 1] : bi;
  }
"""


def enabled() -> bool:
    """Where the fused kernels run, unless PARLEY_FUSED_SAMPLING=0."""
    return os.environ.get("PARLEY_FUSED_SAMPLING") != "0" and fused.enabled()


@functools.cache
def _kernel(temp: float):
    src = _SOURCE.replace("{temp}", repr(float(temp)))
    digest = hashlib.sha1((fused._HEADER + src).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"parley_sample_topk_{digest}",
                               input_names=["logits", "noise", "forced"], output_names=["out"],
                               source=src, header=fused._HEADER)


def forced_pairs(mask: mx.array, vals: mx.array) -> mx.array:
    """The frame's forced tokens as int32 [K+1, 2] (mask, value) pairs, the kernel's `forced`."""
    return mx.stack([mask.astype(mx.int32), vals.astype(mx.int32)], axis=1)


def sample_topk(logits: mx.array, noise: mx.array, temp: float, top_k: int | None,
                forced: mx.array, j: int) -> tuple[mx.array, mx.array]:
    """One token from logits [V] (top-k at `temp`, Gumbel noise [V] float32) -> (sampled,
    conditioning) int32 scalars: the conditioning is forced[j]'s value where its mask is set."""
    V = int(logits.shape[-1])
    k = V if top_k is None or top_k <= 0 else min(int(top_k), V)
    (out,) = _kernel(float(temp))(
        inputs=[logits.reshape(V), noise.reshape(V), forced],
        template=[("T", logits.dtype), ("V", V), ("TOPK", k), ("NT", THREADS), ("J", j)],
        output_shapes=[(2,)], output_dtypes=[mx.int32],
        grid=(THREADS, 1, 1), threadgroup=(THREADS, 1, 1))
    return out[0], out[1]
