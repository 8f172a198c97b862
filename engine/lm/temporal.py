"""The temporal ("main") transformer (MODEL.md §3.1): pre-norm layers of fused-QKV attention with
interleaved RoPE over the KV ring, and a SiLU-gated feed-forward; then `out_norm`.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import mlx.core as mx

from . import depth_kernel, fused, temporal_kernel
from .kv_ring import KVRing
from .layers import Linear, attention_scale, gated_ffn, merge_heads, rms_norm_f32, split_heads


@dataclass
class TemporalLayer:
    norm1: mx.array  # [d] float32
    in_proj: Linear  # [3d, d]
    out_proj: Linear  # [d, d]
    norm2: mx.array
    linear_in: Linear  # [2h, d]
    linear_out: Linear  # [d, h]

    def arrays(self) -> list[mx.array]:
        out = [self.norm1, self.norm2]
        for lin in (self.in_proj, self.out_proj, self.linear_in, self.linear_out):
            out += lin.arrays()
        return out


class Temporal:
    def __init__(self, layers: list[TemporalLayer], out_norm: mx.array, num_heads: int,
                 context: int, max_period: float):
        self.layers = layers
        self.out_norm = out_norm
        self.num_heads = num_heads
        self.context = context
        self.max_period = float(max_period)
        # The one-position step through engine/lm/fused.py's kernels (see `can_fuse`); LMGen turns
        # it on where they run (H200, one process: temporal stage 8.0 -> 6.4 ms, frame 14.8 ->
        # 14.1 ms; docs/benchmarks.md). PARLEY_FUSED_TEMPORAL=0 keeps the MLX operations.
        self.use_fused = False
        # With use_fused: the attention over the KV ring (and the ring write) as one kernel too
        # (fused.ring_attention; on by default with use_fused, PARLEY_RING_ATTENTION=0 turns it off).
        self.ring_attention = False
        # With ring_attention: the whole step as engine/lm/temporal_kernel.py's kernels, a few
        # layers a launch (LMGen's default where they run; PARLEY_TEMPORAL_KERNEL=0 turns it off).
        self.step_kernel = False
        # With step_kernel: hand each launch to the device as soon as it is built (uncompiled,
        # `mx.async_eval` after each but the last), so the device starts on the first layers
        # while the host still issues the rest. Opt-in (PARLEY_SPLIT_SUBMIT=1) until measured.
        self.split_submit = os.environ.get("PARLEY_SPLIT_SUBMIT") == "1"
        # With step_kernel: each launch takes its weights through one table of their device
        # addresses (temporal_kernel.WeightTables) instead of ~112 inputs: less for MLX to
        # encode when the step is handed over (H200: the handover 0.93 -> 0.62 ms, frame
        # 9.46 -> 9.07 ms back to back; same bits). PARLEY_WEIGHT_TABLE=0 turns it off.
        self.weight_tables = os.environ.get("PARLEY_WEIGHT_TABLE", "1") != "0"
        self._barrier = None  # the step kernel's grid-barrier state, made on first use
        self._step_fns = {}
        self._tables = {}  # (dtype, layers a launch) -> WeightTables, made on first use

    def can_attend_fused(self, head_dim: int, quantized_ring: bool = False) -> bool:
        """Whether fused.ring_attention takes this model's heads (in an 8-bit ring or not)."""
        return fused.ring_layout(head_dim, quantized_ring) is not None

    def can_run_step_kernel(self, dtype: mx.Dtype, head_dim: int) -> bool:
        """Whether temporal_kernel.py's step kernel can run: where the fused kernels do, for
        layers and heads it takes."""
        return self.can_fuse(dtype) and temporal_kernel.supports(self, dtype, head_dim)

    def step_kernel_failed(self) -> bool:
        """Whether a step kernel's grid barrier ever gave up (its results were then wrong)."""
        return self._barrier is not None and depth_kernel.barrier_failed(self._barrier)

    def forget_barrier(self) -> None:
        """Drops the barrier state (after a failure it may be inconsistent)."""
        self._barrier = None

    def _kernel_step(self):
        """With step_kernel: the step as one compiled call of (x, offset, meta, counters,
        barrier, *KVRing.kernel_inputs()) through temporal_kernel.step."""
        # a trace holds its tables (or their absence), its launches, their L2 prefetches and
        # their products (tensor cores or not)
        key = ("kernel", self.weight_tables, temporal_kernel.LAYERS_PER_LAUNCH,
               temporal_kernel.PREFETCH, temporal_kernel.MMA, temporal_kernel.MMA_STEPS)
        if key not in self._step_fns:
            n = len(self.layers)

            def step(x, offset, meta, counters, barrier, *rings):
                return temporal_kernel.step(self, x, offset, meta, counters, barrier,
                                            list(rings[:n]), list(rings[n:2 * n]),
                                            list(rings[2 * n:3 * n]), list(rings[3 * n:]),
                                            tables=self.weight_tables_for(x.dtype))

            compiled = mx.compile(step)

            def call(x, *rest):
                self.weight_tables_for(x.dtype)  # made (and evaluated) before the trace
                return compiled(x, *rest)

            self._step_fns[key] = call
        return self._step_fns[key]

    def weight_tables_for(self, dtype: mx.Dtype):
        """The step kernel's WeightTables for `dtype` with weight_tables on, else None."""
        if not self.weight_tables:
            return None
        key = (dtype, temporal_kernel.LAYERS_PER_LAUNCH)
        if key not in self._tables:
            self._tables[key] = temporal_kernel.WeightTables(self, dtype)
        return self._tables[key]

    def _barrier_state(self) -> mx.array:
        if self._barrier is None:
            self._barrier = depth_kernel.new_barrier()
        return self._barrier

    def can_fuse(self, dtype: mx.Dtype) -> bool:
        """Whether the fused step can run: MLX's CUDA backend and every layer's linears in a
        layout engine/lm/fused.py handles."""
        if not fused.enabled():
            return False
        return all(fused.supports(lin, dtype) for layer in self.layers
                   for lin in (layer.in_proj, layer.out_proj, layer.linear_in, layer.linear_out))

    def arrays(self) -> list[mx.array]:
        out = [self.out_norm]
        for layer in self.layers:
            out += layer.arrays()
        return out

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        # Interleaved pairs (2i, 2i+1), i.e. MLX's "traditional" RoPE; the math runs in float32.
        hd = x.shape[-1]
        y = mx.fast.rope(x.astype(mx.float32), hd, traditional=True, base=self.max_period,
                         scale=1.0, offset=offset)
        return y.astype(x.dtype)

    def _make_step_fns(self):
        """The parts of a one-position step between the KV-ring accesses, compiled: `first` (norm1,
        QKV and RoPE of layer 0), `joints[i]` (layer i's out projection, residual and FFN, then
        layer i+1's norm1, QKV and RoPE) and `last` (the last layer's tail and out_norm). One
        compiled call per layer, rather than two, halves the calls' fixed cost. With `use_fused`
        the pieces are engine/lm/fused.py's kernels: RMSNorm+QKV+RoPE, out projection+residual,
        RMSNorm+gated FFN half, down projection+residual."""
        H = self.num_heads

        def pre(layer, x, offset):
            h = rms_norm_f32(x, layer.norm1)
            qkv = layer.in_proj(h)
            B, T, three_d = qkv.shape
            d = three_d // 3
            hd = d // H
            # Queries and keys rotated together: one RoPE (and one cast each way) instead of
            # two; the rotation is per element, so the result is the same.
            qk = qkv[..., : 2 * d].reshape(B, T, 2 * H, hd).transpose(0, 2, 1, 3)
            qk = mx.fast.rope(qk.astype(mx.float32), hd, traditional=True,
                              base=self.max_period, scale=1.0, offset=offset).astype(qkv.dtype)
            v = qkv[..., 2 * d:].reshape(B, T, H, hd).transpose(0, 2, 1, 3)
            return qk[:, :H], qk[:, H:], v

        def post(layer, x, a):
            x = x + layer.out_proj(merge_heads(a))
            return x + gated_ffn(rms_norm_f32(x, layer.norm2), layer.linear_in, layer.linear_out)

        if self.use_fused:
            def pre(layer, x, offset):  # noqa: F811 (the fused variant of the same step)
                return fused.qkv(x, layer.norm1, layer.in_proj, H, offset.reshape(1),
                                 self.max_period)

            def post(layer, x, a):  # noqa: F811
                x = fused.gemv(merge_heads(a), layer.out_proj, res=x)
                h = fused.gemv_gated(x, layer.norm2, layer.linear_in)
                return fused.gemv(h, layer.linear_out, res=x)

        layers = self.layers
        first = mx.compile(lambda x, offset: pre(layers[0], x, offset))
        joints = []
        for i in range(len(layers) - 1):
            def joint(x, a, offset, this=layers[i], nxt=layers[i + 1]):
                x = post(this, x, a)
                return (x, *pre(nxt, x, offset))

            joints.append(mx.compile(joint))
        last = mx.compile(lambda x, a: rms_norm_f32(post(layers[-1], x, a), self.out_norm))
        return first, joints, last

    def _compiled_step(self):
        """(first, joints, last) for the current `use_fused`, made once each (`_step_fns` also
        keeps `_whole_step`'s function, under "whole")."""
        if self.use_fused not in self._step_fns:
            self._step_fns[self.use_fused] = self._make_step_fns()
        return self._step_fns[self.use_fused]

    def _whole_step(self):
        """With ring_attention: the whole one-position step as one compiled call of (x, offset,
        meta, counters, *KVRing.kernel_inputs()), the ring attention included. Its kernel writes the ring
        in place, so the rings are inputs like any other and no slice update splits the step:
        one Python call a frame instead of two a layer."""
        if "whole" not in self._step_fns:
            first, joints, last = self._compiled_step()
            n = len(self.layers)

            def step(x, offset, meta, counters, *rings):
                q, k, v = first(x, offset)
                scale = attention_scale(q.shape[-1])
                for i in range(n):
                    a = fused.ring_attention(q, k, v, rings[i], rings[n + i], meta, counters, scale,
                                             rings[2 * n + i], rings[3 * n + i])
                    if i + 1 < n:
                        x, q, k, v = joints[i](x, a, offset)
                    else:
                        out = last(x, a)
                return out

            self._step_fns["whole"] = mx.compile(step)
        return self._step_fns["whole"]

    def warm_up(self, x: mx.array, kv: KVRing | None = None) -> list[mx.array]:
        """Traces the compiled one-position step on throwaway inputs (x [1, 1, d]), touching no
        ring, and returns its outputs: evaluating them compiles the step's kernels too (with
        `kv`, the ring attention kernel's too, on a throwaway ring of kv's shape)."""
        first, joints, last = self._compiled_step()
        offset = mx.array(0, dtype=mx.int32)
        q, k, v = first(x, offset)
        a = mx.fast.scaled_dot_product_attention(q, k, v, scale=attention_scale(q.shape[-1]))
        outs = [a]
        if self.use_fused and self.ring_attention and kv is not None:
            keys, values, kp, vp = kv.blank_layer()
            outs.append(fused.ring_attention(
                q, k, v, keys, values, mx.array([0, 1], dtype=mx.int32),
                mx.zeros((kv.num_heads,), dtype=mx.uint32), attention_scale(q.shape[-1]), kp, vp))
            # Trace the whole step too (never evaluated here: it would write the real ring).
            self._whole_step()(x, offset, kv.step_meta(), kv.counters(), *kv.kernel_inputs())
            if self.step_kernel:
                # The step kernel on the real ring, but at slot -1: it writes no slot and attends
                # to slot 0 only, so evaluating it (to compile it) leaves the ring as it was.
                outs.append(self._kernel_step()(x, offset, mx.array([-1, 1], dtype=mx.int32),
                                                kv.counters(), self._barrier_state(),
                                                *kv.kernel_inputs()))
        for joint in joints:
            outs += joint(x, a, offset)
        outs.append(last(x, a))
        return outs

    def step_compiled(self, x: mx.array, kv: KVRing) -> mx.array:
        """One position ([1, 1, d]) with the compiled functions; same result as `__call__`."""
        offset = mx.array(kv.end, dtype=mx.int32)
        if self.use_fused and self.ring_attention and self.step_kernel and self.split_submit:
            n = len(self.layers)
            rings = kv.kernel_inputs()
            out = temporal_kernel.step(self, x, offset, kv.step_meta(), kv.counters(),
                                       self._barrier_state(), rings[:n], rings[n:2 * n],
                                       rings[2 * n:3 * n], rings[3 * n:], submit=mx.async_eval,
                                       tables=self.weight_tables_for(x.dtype))
            kv.advance(1)
            return out
        if self.use_fused and self.ring_attention and self.step_kernel:
            out = self._kernel_step()(x, offset, kv.step_meta(), kv.counters(),
                                      self._barrier_state(), *kv.kernel_inputs())
            kv.advance(1)
            return out
        if self.use_fused and self.ring_attention:
            out = self._whole_step()(x, offset, kv.step_meta(), kv.counters(),
                                     *kv.kernel_inputs())
            kv.advance(1)
            return out
        first, joints, last = self._compiled_step()
        q, k, v = first(x, offset)
        scale = attention_scale(q.shape[-1])
        n = len(self.layers)
        for i in range(n):
            a = kv.attend_step(i, q, k, v, scale)
            if i + 1 < n:
                x, q, k, v = joints[i](x, a, offset)
            else:
                out = last(x, a)
        kv.advance(1)
        return out

    def __call__(self, x: mx.array, kv: KVRing, visibility: str = "step") -> mx.array:
        """x [1, T, d] at positions kv.end .. kv.end+T−1 -> out_norm(h) [1, T, d]. Writes the ring
        and advances it by T."""
        T = x.shape[1]
        pos = kv.end
        H = self.num_heads
        for i, layer in enumerate(self.layers):
            h = rms_norm_f32(x, layer.norm1)
            q, k, v = split_heads(layer.in_proj(h), H)
            scale = attention_scale(q.shape[-1])
            q, k = self._rope(q, pos), self._rope(k, pos)
            if T == 1 and visibility == "step":
                a = kv.attend_step(i, q, k, v, scale)
            else:
                a = kv.attend_chunk(i, q, k, v, scale, visibility)
            x = x + layer.out_proj(merge_heads(a))
            x = x + gated_ffn(rms_norm_f32(x, layer.norm2), layer.linear_in, layer.linear_out)
        kv.advance(T)
        return rms_norm_f32(x, self.out_norm)
