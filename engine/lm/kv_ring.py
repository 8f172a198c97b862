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


class KVRing:
    def __init__(self, num_layers: int, num_heads: int, head_dim: int, context: int,
                 dtype: mx.Dtype = mx.float32, rule: str = "nvidia"):
        if context < 2:
            raise ValueError("the attention context must be at least 2")
        if rule not in RULES:
            raise ValueError(f"window rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.context = context
        self.slots = context - 1 if rule == "nvidia" else context
        self.dtype = dtype
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.end = 0  # next absolute position (= number of positions written so far)
        self.reset()

    def reset(self) -> None:
        shape = (1, self.num_heads, self.slots, self.head_dim)
        self.keys = [mx.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.values = [mx.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.end = 0
        self._counters = None  # ring_attention's per-head counters (see `counters`)

    def arrays(self) -> list[mx.array]:
        return self.keys + self.values

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
        K, V = self._write(layer, slot, k, v)
        if pos + 1 < S:
            n = pos + 1
            return mx.fast.scaled_dot_product_attention(q, K[:, :, :n], V[:, :, :n], scale=scale)
        # Full ring: exactly the keys the rule shows (context − 1 or context of them), any order.
        return mx.fast.scaled_dot_product_attention(q, K, V, scale=scale)

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
        if n_old:
            old_pos = np.arange(start - n_old, start)
            old_slots = old_pos % S
            order = mx.array(old_slots)
            K_all = mx.concatenate([self.keys[layer][:, :, order] if start > S else
                                    self.keys[layer][:, :, :n_old], k], axis=2)
            V_all = mx.concatenate([self.values[layer][:, :, order] if start > S else
                                    self.values[layer][:, :, :n_old], v], axis=2)
            kpos = np.concatenate([old_pos, np.arange(start, start + T)])
        else:
            K_all, V_all = k, v
            kpos = np.arange(start, start + T)
        qpos = np.arange(start, start + T)
        mask = (kpos[None, :] >= np.maximum(lower, 0)[:, None]) & (kpos[None, :] <= qpos[:, None])
        out = mx.fast.scaled_dot_product_attention(q, K_all, V_all, scale=scale,
                                                   mask=mx.array(mask))
        self._write_chunk(layer, k, v, start)
        return out

    def _write_chunk(self, layer: int, k: mx.array, v: mx.array, start: int) -> None:
        T = k.shape[2]
        C = self.slots
        m = min(T, C)
        k, v = k[:, :, T - m:], v[:, :, T - m:]
        first = start + T - m
        s0 = first % C
        n1 = min(m, C - s0)
        self._write(layer, s0, k[:, :, :n1], v[:, :, :n1])
        if n1 < m:
            self._write(layer, 0, k[:, :, n1:], v[:, :, n1:])

    def _write(self, layer: int, slot: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Writes k, v [1, H, n, hd] into slots slot .. slot+n−1. A static slice update: the ring
        array is donated to it (no copy of the cache), and unlike `mx.slice_update` with an index
        array it needs no extra kernel to compute the offset."""
        n = k.shape[2]
        K, V = self.keys[layer], self.values[layer]
        K[:, :, slot: slot + n] = k
        V[:, :, slot: slot + n] = v
        return K, V

    def advance(self, n: int) -> None:
        self.end += n
