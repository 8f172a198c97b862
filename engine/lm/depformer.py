"""The depth transformer ("depformer", MODEL.md §3.3).

Per frame it runs K steps (K = 8 agent codebooks live, `dep_q` for full parity). Step k's input is
`depformer_in[k](hn)` plus the embedding of the token used at step k−1 (the text token for k = 0);
every linear has separate weights per step, stored stacked [S, out, in] and indexed by step; the
norms are shared by all steps; there is no positional encoding; step k attends to steps 0..k of the
frame (never windowed by `depformer_context`, §13.5) — except that with NVIDIA's ring rule
("nvidia", see kv_ring.py) the frame's depth keys sit in a ring of `dep_q` slots and the step that
fills it (k = dep_q − 1) no longer sees step 0 (measured on NVIDIA's pipeline: step 15 of a 16-step
depformer attends to steps 1..15; with 8 live steps of 16 this never happens). Kyutai's rule
("kyutai") and the teacher-forced pass see all steps. The output of step k goes through `linears[k]` to `card` logits.
Steps past K are never computed: the depformer is causal over steps, so steps 0..K−1 do not depend
on them (§11.1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from . import depth_kernel, fused
from .layers import (Embedding, StackedLinear, attention_scale, gated_ffn, merge_heads,
                     rms_norm_f32, split_heads)


@dataclass
class DepformerLayer:
    norm1: mx.array  # [D] float32, shared by all steps
    in_proj: StackedLinear  # [S, 3D, D]
    out_proj: StackedLinear  # [S, D, D]
    norm2: mx.array
    linear_in: StackedLinear  # [S, 2hd, D]
    linear_out: StackedLinear  # [S, D, hd]

    def arrays(self) -> list[mx.array]:
        out = [self.norm1, self.norm2]
        for lin in (self.in_proj, self.out_proj, self.linear_in, self.linear_out):
            out += lin.arrays()
        return out


class Depformer:
    def __init__(self, layers: list[DepformerLayer], depformer_in: StackedLinear,
                 text_emb: Embedding, emb: list[Embedding], heads: StackedLinear, num_heads: int,
                 capacity: int):
        self.layers = layers
        self.capacity = capacity  # the reference's depth KV ring size (dep_q)
        self.depformer_in = depformer_in
        self.text_emb = text_emb
        self.emb = emb  # emb[k] is the input of step k+1
        self.heads = heads
        self.num_heads = num_heads
        self._barrier = None  # depth_kernel's grid-barrier state, made on first use

    @property
    def num_steps(self) -> int:
        return self.depformer_in.num_steps

    def arrays(self) -> list[mx.array]:
        out = self.depformer_in.arrays() + self.text_emb.arrays() + self.heads.arrays()
        for e in self.emb:
            out += e.arrays()
        for layer in self.layers:
            out += layer.arrays()
        return out

    def new_cache(self) -> list:
        """Per layer, the frame's depth keys and values so far (None before step 0)."""
        return [None for _ in self.layers]

    def can_fuse(self, dtype: mx.Dtype) -> bool:
        """Whether `step(..., use_fused=True)` can run: MLX's CUDA backend, and every linear of a
        step in a layout engine/lm/fused.py handles."""
        if not fused.enabled():
            return False
        lins = [self.depformer_in.step(0)]
        for layer in self.layers:
            lins += [lin.step(0) for lin in (layer.in_proj, layer.out_proj, layer.linear_in,
                                             layer.linear_out)]
        return all(fused.supports(lin, dtype) for lin in lins)

    def can_run_step_kernel(self, dtype: mx.Dtype) -> bool:
        """Whether `step_kernel` can run: the fused kernels can (`can_fuse`), the layout fits
        engine/lm/depth_kernel.py, and PARLEY_DEPTH_KERNEL is not 0."""
        if os.environ.get("PARLEY_DEPTH_KERNEL", "1") == "0" or not self.can_fuse(dtype):
            return False
        return depth_kernel.supports(self, dtype)

    def step_kernel(self, k: int, hn: mx.array, token: mx.array,
                    priors: list[mx.array]) -> tuple[mx.array, mx.array]:
        """Depth step k for one position as one CUDA kernel (engine/lm/depth_kernel.py): hn (the
        temporal output, one position), token (the one conditioning step k), `priors` the kv
        outputs of the earlier steps this one attends to -> (logits [card], kv)."""
        if hn.size != hn.shape[-1]:
            raise ValueError("the depth step kernel runs one position at a time")
        if self._barrier is None:
            self._barrier = depth_kernel.new_barrier()
        return depth_kernel.step(self, k, hn, token, priors, self._barrier)

    def step_kernel_failed(self) -> bool:
        """Whether a step kernel's grid barrier ever gave up (its results were then wrong)."""
        return self._barrier is not None and depth_kernel.barrier_failed(self._barrier)

    def forget_barrier(self) -> None:
        """Drops the barrier state (after a failure it may be inconsistent); the next step kernel
        makes a fresh one."""
        self._barrier = None

    def token_embedding(self, k: int, token: mx.array) -> mx.array:
        """Embedding of the token that conditions step k (text for k = 0, audio cb k−1 else)."""
        table = self.text_emb if k == 0 else self.emb[k - 1]
        return table(token)

    def step(self, k: int, hn: mx.array, prev_token: mx.array, cache, rule: str = "kyutai",
             use_fused: bool = False) -> mx.array:
        """Depth step k for one frame. hn [B, T, d] (the temporal output), prev_token [B, T] int
        -> logits [B, T, card]. `cache` is the frame's per-layer list of keys/values so far.
        `use_fused` (one position, see `can_fuse`) runs each layer as four fused CUDA kernels."""
        if use_fused:
            return self._step_fused(k, hn, prev_token, cache, rule)
        x = self.depformer_in.step(k)(hn) + self.token_embedding(k, prev_token)
        H = self.num_heads
        for i, layer in enumerate(self.layers):
            h = rms_norm_f32(x, layer.norm1)
            q, kk, v = split_heads(layer.in_proj.step(k)(h), H)
            # The frame's keys so far grow by one concatenation of two arrays a step (a
            # concatenation costs one copy kernel per input, so joining every step's keys anew
            # would cost k + 1 kernels at step k).
            if cache[i] is None:
                K, V = kk, v
            else:
                K = mx.concatenate([cache[i][0], kk], axis=2)
                V = mx.concatenate([cache[i][1], v], axis=2)
            cache[i] = (K, V)
            first = max(0, k - self.capacity + 2) if rule == "nvidia" else 0  # module docstring
            if first:
                K, V = K[:, :, first:], V[:, :, first:]
            a = mx.fast.scaled_dot_product_attention(q, K, V, scale=attention_scale(q.shape[-1]))
            x = x + layer.out_proj.step(k)(merge_heads(a))
            x = x + gated_ffn(rms_norm_f32(x, layer.norm2), layer.linear_in.step(k),
                              layer.linear_out.step(k))
        return self.heads.step(k)(x)

    def _step_fused(self, k: int, hn: mx.array, prev_token: mx.array, cache, rule: str) -> mx.array:
        """`step` for one position with engine/lm/fused.py: per layer RMSNorm + QKV; attention
        over the frame's keys (kept as one array per step, so never concatenated) + out
        projection + residual; RMSNorm + gated half of the FFN; down projection + residual."""
        if hn.size != hn.shape[-1]:
            raise ValueError("the fused depth step runs one position at a time")
        x = fused.gemv(hn, self.depformer_in.step(k), res=self.token_embedding(k, prev_token))
        H = self.num_heads
        first = max(0, k - self.capacity + 2) if rule == "nvidia" else 0  # module docstring
        for i, layer in enumerate(self.layers):
            q, kk, v = fused.qkv(x, layer.norm1, layer.in_proj.step(k), H)
            if cache[i] is None:
                cache[i] = ([], [])
            cache[i][0].append(kk)
            cache[i][1].append(v)
            keys, values = cache[i][0][first:], cache[i][1][first:]
            x = fused.attn_gemv(q, keys, values, layer.out_proj.step(k), x, H,
                                attention_scale(q.shape[-1]))
            h = fused.gemv_gated(x, layer.norm2, layer.linear_in.step(k))
            x = fused.gemv(h, layer.linear_out.step(k), res=x)
        return self.heads.step(k)(x)

    def teacher_forced(self, hn: mx.array, prev_tokens: mx.array, steps: int | None = None) -> mx.array:
        """All steps at once for every position: hn [B, T, d], prev_tokens [B, T, K] (the token
        conditioning each step) -> logits [B, T, K, card]. Positions are independent: step k of
        position t attends to steps 0..k of the same position."""
        K = steps or self.num_steps
        B, T, _ = hn.shape
        # Fold positions into the batch: one depth sequence per position.
        hn1 = hn.reshape(B * T, 1, -1)
        toks = prev_tokens.reshape(B * T, 1, -1)
        cache = self.new_cache()
        outs = [self.step(k, hn1, toks[:, :, k], cache) for k in range(K)]
        return mx.stack(outs, axis=2).reshape(B, T, K, -1)
