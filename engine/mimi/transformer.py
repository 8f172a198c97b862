"""Mimi's encoder/decoder transformers with the reference's streaming attention window.

Layer (moshi `StreamingTransformerLayer`, MODEL.md §10.1):
    x += ls1 ⊙ attn(LN1(x));  x += ls2 ⊙ linear2(gelu(linear1(LN2(x))))
with LayerNorm eps 1e-5 (with bias), exact erf GELU, no biases in attention/MLP, interleaved RoPE
(pairs (2i, 2i+1)) and a causal mask.

Streaming (MODEL.md §13.3/§13.4): every codec frame feeds P positions (P = 2 at 25 Hz / 12.5 Hz),
positions count from the last reset, and a query at position q whose frame ends (exclusive) at E
sees the keys max(0, q − context + 1, E − context + h) … q, where h depends on the reference:

* window "personaplex" (h = 1, the default): NVIDIA's PersonaPlex fork, the pipeline the app must
  reproduce (MODEL.md §13.3). Its `RingKVCache` labels the oldest of its `context` slots as a future
  position once the ring is full, so a frame's two queries see context − 2 / context − 1 keys.
* window "moshi" (h = 0): Kyutai's `moshi` 0.2.13, which labels every slot correctly: context − 1 /
  context keys. The golden fixtures in tests/fixtures/reference/ come from it.

While E < context both rules are the plain causal mask (NVIDIA's starts hiding with the call that
fills its ring, moshi's with the first call that wraps it). Keys live in a fixed ring of
exactly `context` slots per layer, each slot tagged with its absolute position, so memory never
grows. A call may carry several frames at once (whole-clip encode/decode): the rule above is then
applied per frame, so the result is the same as feeding the frames one by one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from engine.mimi import transformer_kernel

_SQRT1_2 = 0.7071067811865476

# h above: how many of the ring's oldest keys a frame's queries lose once the ring is full.
WINDOWS = {"personaplex": 1, "moshi": 0}

# How the layers' weight matrices may be stored. bfloat16 halves their memory (quantized models,
# already lossy, fit their budget with it); activations and arithmetic stay float32 either way.
WEIGHT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def gelu_exact(x: mx.array) -> mx.array:
    """GELU with the exact erf form (not the tanh approximation)."""
    return x * 0.5 * (1.0 + mx.erf(x * _SQRT1_2))


def rope_tables(positions: np.ndarray, head_dim: int, max_period: float):
    """cos/sin tables [T, head_dim/2] in float32, rounded like the reference's float32 math."""
    half = head_dim // 2
    ds = np.arange(half, dtype=np.float32)
    freqs = np.exp((ds * np.float32(-math.log(max_period) * 2 / head_dim)).astype(np.float64))
    freqs = freqs.astype(np.float32)
    angles = positions.astype(np.float32)[:, None] * freqs[None, :]  # float32 product
    a64 = angles.astype(np.float64)
    return np.cos(a64).astype(np.float32), np.sin(a64).astype(np.float32)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Interleaved rotation of x [H, T, d] with tables [T, d/2]."""
    H, T, d = x.shape
    x = x.reshape(H, T, d // 2, 2)
    xr, xi = x[..., 0], x[..., 1]
    out_r = xr * cos - xi * sin
    out_i = xr * sin + xi * cos
    return mx.stack([out_r, out_i], axis=-1).reshape(H, T, d)


class _Layer:
    def __init__(self, p: dict[str, np.ndarray], out_in: bool = False,
                 weight_dtype: mx.Dtype = mx.float32):
        # Weights as contiguous [in, out] (x @ W, fast on the CPU), or with `out_in` as PyTorch's
        # [out, in] rows, which the CUDA kernels read (the MLX path then takes x @ W.T).
        self.out_in = out_in

        def vec(name):
            return mx.array(np.asarray(p[name], dtype=np.float32))

        def mat(name):
            w = np.asarray(p[name], dtype=np.float32)
            w = mx.array(np.ascontiguousarray(w if out_in else w.T))
            if weight_dtype == mx.float32:
                return w
            w = w.astype(weight_dtype)
            mx.eval(w)  # now, so that the float32 source is freed rather than kept by the graph
            return w

        self.norm1_w, self.norm1_b = vec("norm1.weight"), vec("norm1.bias")
        self.norm2_w, self.norm2_b = vec("norm2.weight"), vec("norm2.bias")
        self.in_proj = mat("self_attn.in_proj_weight")  # [D, 3D]
        self.out_proj = mat("self_attn.out_proj.weight")  # [D, D]
        self.linear1 = mat("linear1.weight")  # [D, F]
        self.linear2 = mat("linear2.weight")  # [F, D]
        self.scale1 = vec("layer_scale_1.scale")
        self.scale2 = vec("layer_scale_2.scale")

    def matmul(self, x: mx.array, w: mx.array) -> mx.array:
        if w.dtype != x.dtype:  # stored narrower: widened for this product only, float32 math
            w = w.astype(x.dtype)
        return x @ (w.T if self.out_in else w)


class MimiTransformer:
    """A stack of causal transformer layers with a KV ring of exactly `context` slots.

    `layer_params` holds, per layer, the tensors named relative to `…transformer.layers.{i}.`
    (PyTorch naming, numpy arrays). `positions_per_frame` is P, the number of positions one codec frame feeds.
    `weights` ("float32" or "bfloat16") is how the matrices (not norms, biases, layer scales) are
    stored; see WEIGHT_DTYPES.
    """

    # Longest chunk of positions run through the layers at once (bounds attention memory).
    MAX_BLOCK = 256

    def __init__(self, layer_params: list[dict], *, d_model: int, num_heads: int, context: int,
                 max_period: float, positions_per_frame: int, window: str = "personaplex",
                 kernel: bool | None = None, weights: str = "float32"):
        if window not in WINDOWS:
            raise ValueError(f"unknown attention window {window!r}; use one of {list(WINDOWS)}")
        if weights not in WEIGHT_DTYPES:
            raise ValueError(f"unknown transformer weight type {weights!r}; "
                             f"use one of {list(WEIGHT_DTYPES)}")
        self.weights = weights
        self.window = window
        self._hide = WINDOWS[window]
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.context = context
        self.max_period = max_period
        self.P = positions_per_frame
        # A frame's step through the CUDA kernels of transformer_kernel.py (None: where they run).
        ffn = int(np.asarray(layer_params[0]["linear1.weight"]).shape[0]) if layer_params else 4
        if kernel is None:
            kernel = transformer_kernel.enabled()
        self.kernel = bool(kernel and layer_params
                           and transformer_kernel.supports(d_model, num_heads, ffn))
        self.layers = [_Layer(p, out_in=self.kernel, weight_dtype=WEIGHT_DTYPES[weights])
                       for p in layer_params]
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.block = max(self.P, (self.MAX_BLOCK // self.P) * self.P)
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self.slot_pos = np.full(self.context, -1, dtype=np.int64)  # absolute position per slot
        shape = (self.num_heads, self.context, self.head_dim)
        self.ring_k = [mx.zeros(shape, dtype=mx.float32) for _ in self.layers]
        self.ring_v = [mx.zeros(shape, dtype=mx.float32) for _ in self.layers]
        if self.kernel:  # the kernels write the rings in place: they must be real buffers
            mx.eval(self.ring_k, self.ring_v)

    def get_state(self):
        return (self.offset, self.slot_pos.copy(), list(self.ring_k), list(self.ring_v))

    def set_state(self, state) -> None:
        self.offset, slot_pos, ring_k, ring_v = state
        self.slot_pos = slot_pos.copy()
        self.ring_k, self.ring_v = list(ring_k), list(ring_v)

    def state_arrays(self) -> list[mx.array]:
        """The device part of the state (the key/value rings), for a compiled step."""
        return self.ring_k + self.ring_v

    def set_state_arrays(self, arrays: list[mx.array]) -> None:
        n = len(self.layers)
        self.ring_k, self.ring_v = list(arrays[:n]), list(arrays[n:])

    def __call__(self, x: mx.array) -> mx.array:
        """x [T, D] (T a multiple of P) -> [T, D]; advances the streaming state by T positions."""
        T = x.shape[0]
        if T % self.P:
            raise ValueError(f"{T} positions is not a whole number of frames of {self.P}")
        if T <= self.block:
            return self._run(x)
        outs = [self._run(x[s: s + self.block]) for s in range(0, T, self.block)]
        return mx.concatenate(outs, axis=0)

    def _mask(self, qpos: np.ndarray) -> mx.array:
        kpos = np.concatenate([self.slot_pos, qpos])
        frame_end = (qpos // self.P + 1) * self.P
        lo = np.maximum(qpos - self.context + 1, frame_end - self.context + self._hide)
        lo = np.maximum(lo, 0)
        ok = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] <= qpos[:, None])
        return mx.array(np.where(ok, np.float32(0.0), np.float32(-np.inf)))

    def _ring_writes(self, start: int, T: int):
        """(ring_lo, ring_hi, src_lo, src_hi) slices storing the chunk's last keys in the ring."""
        first = max(start, start + T - self.context)
        writes = []
        p = first
        while p < start + T:
            slot = p % self.context
            n = min(start + T - p, self.context - slot)
            writes.append((slot, slot + n, p - start, p - start + n))
            p += n
        return writes

    def _run(self, x: mx.array) -> mx.array:
        return self.apply(x, self.plan(x.shape[0]))

    def plan(self, T: int) -> "Plan":
        """The host side of the next T positions: RoPE tables, the attention mask and where the
        keys go in the ring. Advances the position bookkeeping; `apply` must then run them."""
        qpos = np.arange(self.offset, self.offset + T, dtype=np.int64)
        cos, sin = rope_tables(qpos, self.head_dim, self.max_period)
        mask = self._mask(qpos)
        writes = self._ring_writes(self.offset, T)
        for lo, hi, a, b in writes:
            self.slot_pos[lo:hi] = qpos[a:b]
        self.offset += T
        return Plan(mx.array(cos), mx.array(sin), mask,
                    [mx.array([lo], dtype=mx.int32) for lo, _, _, _ in writes],
                    tuple((a, b) for _, _, a, b in writes))

    def apply(self, x: mx.array, plan: "Plan") -> mx.array:
        """The device side: x [T, D] through the layers, keys written into the rings. Uses only
        `plan`'s arrays, so it can be traced by `mx.compile` for a fixed segment layout."""
        T = x.shape[0]
        if self.kernel and T == self.P and x.dtype == mx.float32:
            return transformer_kernel.apply(self, x, plan)
        H, d = self.num_heads, self.head_dim
        cos, sin, mask = plan.cos, plan.sin, plan.mask
        for i, L in enumerate(self.layers):
            h = mx.fast.layer_norm(x, L.norm1_w, L.norm1_b, 1e-5)
            qkv = L.matmul(h, L.in_proj).reshape(T, 3, H, d)  # views below, not gathers (engine/mxops.py)
            q = apply_rope(qkv[:, 0].transpose(1, 0, 2), cos, sin)  # [H, T, d]
            k = apply_rope(qkv[:, 1].transpose(1, 0, 2), cos, sin)
            v = qkv[:, 2].transpose(1, 0, 2)
            keys = mx.concatenate([self.ring_k[i], k], axis=1)
            values = mx.concatenate([self.ring_v[i], v], axis=1)
            scores = (q @ keys.transpose(0, 2, 1)) * self.scale + mask
            attn = mx.softmax(scores, axis=-1) @ values  # [H, T, d]
            attn = L.matmul(attn.transpose(1, 0, 2).reshape(T, self.d_model), L.out_proj)
            x = x + L.scale1 * attn
            h = mx.fast.layer_norm(x, L.norm2_w, L.norm2_b, 1e-5)
            x = x + L.scale2 * L.matmul(gelu_exact(L.matmul(h, L.linear1)), L.linear2)
            rk, rv = self.ring_k[i], self.ring_v[i]
            for start, (a, b) in zip(plan.starts, plan.segments):
                rk = mx.slice_update(rk, k[:, a:b], start, axes=(1,))
                rv = mx.slice_update(rv, v[:, a:b], start, axes=(1,))
            self.ring_k[i], self.ring_v[i] = rk, rv
        return x


class Plan(NamedTuple):
    """What `MimiTransformer.apply` needs from the host for one call."""

    cos: mx.array  # [T, head_dim / 2]
    sin: mx.array
    mask: mx.array  # [T, context + T] additive
    starts: list  # ring slot (int32 [1]) of each contiguous run of written keys
    segments: tuple  # (a, b): the run's positions within the call

    def arrays(self) -> list[mx.array]:
        return [self.cos, self.sin, self.mask, *self.starts]

    def with_arrays(self, arrays: list[mx.array]) -> "Plan":
        return Plan(arrays[0], arrays[1], arrays[2], list(arrays[3:]), self.segments)
