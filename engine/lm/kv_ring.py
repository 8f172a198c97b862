"""The temporal transformer's KV cache: a preallocated ring of `slots` slots per layer.

Position p lives in slot p mod slots. Visibility follows the reference's streaming ring, whose
rule differs between the two PyTorch implementations (`rule`):

* "nvidia" — NVIDIA's PersonaPlex fork (MODEL.md §3.2, §13.3): a query at position q, in a chunk
  ending (exclusive) at E, sees keys max(0, q − context + 1, E − context + 1) … q. The live LM steps
  one position at a time (E = q + 1), so a query sees keys max(0, q − context + 2) … q: everything
  until the ring is full, then exactly context − 1 keys.
* "kyutai" — Kyutai's `moshi` 0.2.13 (tests/fixtures/reference/README.md): keys
  max(0, q − context + 1, E − context) … q, i.e. for one position per call an exact window of
  `context` keys (the whole ring once full).

Before the ring fills both rules are the plain causal mask.

`bits=8` stores the ring in 8 bits (about half the bytes: 0.83 instead of 1.57 GB for the 7B's
3000-slot window): each head's key or value row of `head_dim` values becomes unsigned bytes q with
a float32 (scale, low) pair, value = q · scale + low, where low is the row's minimum and scale its
range / 255 (`quantize_rows`). A position is quantized when written and every later read,
including the step that writes it, sees the dequantized row, so all paths (MLX operations here,
engine/lm/fused.py's ring attention, the temporal step kernel) attend over the same ring.

The ring holds `slots` positions: context − 1 under "nvidia" (the most any query sees, so a full
ring needs no mask — a masked attention is several times dearer to issue on MLX's CUDA backend),
context under "kyutai".

* A step writes its key in place (a static slice update of an array nothing else references,
  which MLX performs without copying the cache) and attends only over the filled slots until the ring is full.
* `attend_chunk` handles a batch of new positions: the batched prefill uses the one-position-at-a-
  time rule per query ("step" visibility), so it leaves exactly the state of a frame-by-frame
  prefill; teacher forcing uses the exact window of `context` keys ("exact" visibility), which is
  what the reference's one-pass `LMModel.forward` does.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

RULES = ("nvidia", "kyutai")
KV_BITS = (8,)  # quantized ring widths (None: the model's dtype)
_MIN_SCALE = 1e-30  # a constant row quantizes to zeros with this scale (and dequantizes to low)
_QMM_GROUPS = (32, 64, 128)  # head sizes that are one group of MLX's quantized products


def quantize_rows(x: mx.array) -> tuple[mx.array, mx.array]:
    """x [..., hd] -> (uint8 q [..., hd], float32 [..., 2] of (scale, low)): each row's values
    rounded to 256 even steps from its minimum to its maximum."""
    xf = x.astype(mx.float32)
    low = mx.min(xf, axis=-1, keepdims=True)
    scale = mx.maximum((mx.max(xf, axis=-1, keepdims=True) - low) / 255.0, _MIN_SCALE)
    q = mx.clip(mx.round((xf - low) / scale), 0, 255).astype(mx.uint8)
    return q, mx.concatenate([scale, low], axis=-1)


def dequantize_rows(q: mx.array, params: mx.array, dtype: mx.Dtype) -> mx.array:
    """The inverse of `quantize_rows`, in `dtype`."""
    return (q.astype(mx.float32) * params[..., :1] + params[..., 1:]).astype(dtype)


class KVRing:
    def __init__(self, num_layers: int, num_heads: int, head_dim: int, context: int,
                 dtype: mx.Dtype = mx.float32, rule: str = "nvidia", bits: int | None = None):
        if context < 2:
            raise ValueError("the attention context must be at least 2")
        if rule not in RULES:
            raise ValueError(f"window rule must be one of {RULES}, got {rule!r}")
        if bits is not None and bits not in KV_BITS:
            raise ValueError(f"KV ring bits must be None or one of {KV_BITS}, got {bits!r}")
        self.rule = rule
        self.bits = bits
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.context = context
        self.slots = context - 1 if rule == "nvidia" else context
        self.dtype = dtype
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        # With bits: each row's (scale, low), [1, H, slots, 2] float32 a layer.
        self.key_params: list[mx.array] = []
        self.value_params: list[mx.array] = []
        # Without bits the kernels still take params: one evaluated one-float stand-in for all.
        self._no_params = None if self.quantized else mx.zeros((1,), dtype=mx.float32)
        if self._no_params is not None:
            mx.eval(self._no_params)
        self.end = 0  # next absolute position (= number of positions written so far)
        self.reset()

    def reset(self) -> None:
        n = self.num_layers
        self.keys, self.values, self.key_params, self.value_params = (
            [list(a) for a in zip(*(self.blank_layer() for _ in range(n)))])
        self.end = 0
        self._counters = None  # ring_attention's per-head counters (see `counters`)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def blank_layer(self) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """One layer's zeroed (keys, values, key params, value params) in this ring's layout
        (for a ring in the model's dtype the params are the shared one-float stand-in)."""
        shape = (1, self.num_heads, self.slots, self.head_dim)
        if not self.quantized:
            return (mx.zeros(shape, dtype=self.dtype), mx.zeros(shape, dtype=self.dtype),
                    self._no_params, self._no_params)
        pshape = shape[:-1] + (2,)
        return (mx.zeros(shape, dtype=mx.uint8), mx.zeros(shape, dtype=mx.uint8),
                mx.zeros(pshape, dtype=mx.float32), mx.zeros(pshape, dtype=mx.float32))

    def arrays(self) -> list[mx.array]:
        out = self.keys + self.values
        return out + self.key_params + self.value_params if self.quantized else out

    def kernel_inputs(self) -> list[mx.array]:
        """What the CUDA kernels take, 4 · layers arrays: every layer's keys, then values, key
        params, value params (for a ring in the model's dtype the params are the one-float
        stand-in)."""
        return self.keys + self.values + self.key_params + self.value_params

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    @property
    def filled(self) -> int:
        return min(self.end, self.slots)

    # -------------------------------------------------------------------------------------------
    def attend_step(self, layer: int, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """One new position (q, k, v: [1, H, 1, hd]) at position `self.end`: writes the ring slot
        and attends. Call `advance(1)` once all layers are done."""
        pos = self.end
        S = self.slots
        slot = pos % S
        self._write(layer, slot, k, v)
        # Until the ring is full only the filled slots; then exactly the keys the rule shows
        # (context − 1 or context of them), in any order.
        n = pos + 1 if pos + 1 < S else S
        if self.quantized and self.head_dim in _QMM_GROUPS:
            return self._attend_quantized(layer, q, n, scale)
        K, V = self._read(layer, n)
        return mx.fast.scaled_dot_product_attention(q, K, V, scale=scale)

    def _attend_quantized(self, layer: int, q: mx.array, n: int, scale: float) -> mx.array:
        """One query over slots 0 .. n−1 of an 8-bit ring without dequantizing it: a ring row is
        one group of MLX's 8-bit affine quantization (four bytes a uint32, low byte first;
        scale and low as its scale and bias), so both products are `quantized_matmul`s, reading
        the bytes once (a dequantized copy would write and read the ring twice more)."""
        def part(ring, params):
            words = ring.view(mx.uint32)
            if n < self.slots:
                words, params = words[:, :, :n], params[:, :, :n]
            return words, params[..., :1], params[..., 1:]

        hd = self.head_dim
        scores = mx.quantized_matmul(q, *part(self.keys[layer], self.key_params[layer]),
                                     transpose=True, group_size=hd, bits=8)
        weights = mx.softmax(scores.astype(mx.float32) * scale, axis=-1)
        out = mx.quantized_matmul(weights, *part(self.values[layer], self.value_params[layer]),
                                  transpose=False, group_size=hd, bits=8)
        return out.astype(q.dtype)

    def step_meta(self) -> mx.array:
        """[slot, n] of the new position at `self.end`, for `ring_attention`: its ring slot and
        how many slots it attends (the same for every layer of a step)."""
        pos, S = self.end, self.slots
        return mx.array([pos % S, pos + 1 if pos + 1 < S else S], dtype=mx.int32)

    def counters(self) -> mx.array:
        """The per-head counters engine/lm/fused.py's `ring_attention` needs (zeros; the kernel
        leaves them zero). Its kernel writes the ring slot in place, so with it the ring arrays
        stay the same arrays from step to step (Temporal.step_compiled)."""
        if self._counters is None:
            self._counters = mx.zeros((self.num_heads,), dtype=mx.uint32)
            mx.eval(self._counters)
        return self._counters

    def attend_chunk(self, layer: int, q: mx.array, k: mx.array, v: mx.array, scale: float,
                     visibility: str = "step") -> mx.array:
        """T new positions (q, k, v: [1, H, T, hd]) starting at `self.end`. visibility "step":
        each query sees what it would see had the positions been fed one at a time; "exact": an
        exact window of `context` keys. Writes the last min(T, context) keys into the ring."""
        T = q.shape[2]
        C, S = self.context, self.slots
        start = self.end
        n_old = self.filled
        lower = np.arange(start, start + T) - C + (
            2 if visibility == "step" and self.rule == "nvidia" else 1)
        rows = None
        if self.quantized:  # the chunk attends its own keys as the ring will hold them
            rows = quantize_rows(k), quantize_rows(v)  # quantized once: attended, then written
            k_att = dequantize_rows(*rows[0], k.dtype)
            v_att = dequantize_rows(*rows[1], v.dtype)
        else:
            k_att, v_att = k, v
        if n_old:
            old_pos = np.arange(start - n_old, start)
            old_slots = old_pos % S
            K_old, V_old = self._read(layer, S if start > S else n_old)
            if start > S:
                order = mx.array(old_slots)
                K_old, V_old = K_old[:, :, order], V_old[:, :, order]
            K_all = mx.concatenate([K_old, k_att], axis=2)
            V_all = mx.concatenate([V_old, v_att], axis=2)
            kpos = np.concatenate([old_pos, np.arange(start, start + T)])
        else:
            K_all, V_all = k_att, v_att
            kpos = np.arange(start, start + T)
        qpos = np.arange(start, start + T)
        mask = (kpos[None, :] >= np.maximum(lower, 0)[:, None]) & (kpos[None, :] <= qpos[:, None])
        out = mx.fast.scaled_dot_product_attention(q, K_all, V_all, scale=scale,
                                                   mask=mx.array(mask))
        self._write_chunk(layer, k, v, start, rows)
        return out

    def _write_chunk(self, layer: int, k: mx.array, v: mx.array, start: int, rows=None) -> None:
        """`rows`: k and v already quantized ((bytes, params) each) for an 8-bit ring."""
        T = k.shape[2]
        C = self.slots
        m = min(T, C)
        first = start + T - m
        s0 = first % C
        n1 = min(m, C - s0)

        def part(a, lo, hi):  # positions lo .. hi-1 of the chunk's last m
            return a[:, :, T - m + lo: T - m + hi]

        def piece(lo, hi):
            if rows is None:
                return part(k, lo, hi), part(v, lo, hi), None
            (kq, kp), (vq, vp) = rows
            return part(kq, lo, hi), part(vq, lo, hi), (part(kp, lo, hi), part(vp, lo, hi))

        self._write(layer, s0, *piece(0, n1))
        if n1 < m:
            self._write(layer, 0, *piece(n1, m))

    def _write(self, layer: int, slot: int, k: mx.array, v: mx.array, params=None) -> None:
        """Writes k, v [1, H, n, hd] into slots slot .. slot+n−1 (quantized with bits, unless
        `params` says they already are: (key params, value params)). A static slice update: the
        ring array is donated to it (no copy of the cache), and unlike `mx.slice_update` with an
        index array it needs no extra kernel to compute the offset."""
        n = k.shape[2]
        if self.quantized:
            if params is None:
                (k, kp), (v, vp) = quantize_rows(k), quantize_rows(v)
            else:
                kp, vp = params
            self.key_params[layer][:, :, slot: slot + n] = kp
            self.value_params[layer][:, :, slot: slot + n] = vp
        self.keys[layer][:, :, slot: slot + n] = k
        self.values[layer][:, :, slot: slot + n] = v

    def _read(self, layer: int, n: int) -> tuple[mx.array, mx.array]:
        """Slots 0 .. n−1 of a layer's keys and values, in the model's dtype."""
        K, V = self.keys[layer], self.values[layer]
        if n < self.slots:
            K, V = K[:, :, :n], V[:, :, :n]
        if not self.quantized:
            return K, V
        kp, vp = self.key_params[layer], self.value_params[layer]
        if n < self.slots:
            kp, vp = kp[:, :, :n], vp[:, :, :n]
        return dequantize_rows(K, kp, self.dtype), dequantize_rows(V, vp, self.dtype)

    def advance(self, n: int) -> None:
        self.end += n
