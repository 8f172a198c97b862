"""Streaming causal convolutions for Mimi, channels-last (MLX layout [1, T, C]).

Semantics follow Kyutai's `moshi` 0.2.13 `StreamingConv1d` / `StreamingConvTranspose1d`
(MODEL.md §10.4):

* a causal conv keeps the last (effective kernel − stride) input samples; before the first call that
  buffer is zeros ("constant" padding) or the first input sample repeated ("replicate", used by the
  downsample). Each call emits exactly T / stride outputs; there is never right padding, so
  feeding a clip at once or frame by frame gives the same result.
* a transposed conv emits stride × T samples per call; the overlapping tail (kernel − stride
  samples) is kept, minus the bias, and added to the start of the next call's output (the bias
  counts once).

All arrays are float32 and batch size 1. Nothing here evaluates: results and states are lazy MLX
arrays, and the caller decides where to put `mx.eval`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from engine.mxops import unbatch


def elu(x: mx.array) -> mx.array:
    """ELU with alpha 1: x for x > 0, exp(x) − 1 otherwise."""
    return mx.where(x > 0, x, mx.expm1(mx.minimum(x, 0.0)))


class StreamingConv1d:
    """Causal 1-D convolution with streaming state.

    `weight` is in PyTorch layout [out, in/groups, k] (numpy or mx), converted once at
    construction: to a contiguous [k·in, out] matrix (the matmul path) or to MLX's [out, k, in/g].
    """

    def __init__(self, weight, bias=None, *, stride: int = 1, dilation: int = 1, groups: int = 1,
                 pad_mode: str = "constant"):
        w = np.asarray(weight, dtype=np.float32)
        self.out_channels, in_per_group, self.kernel_size = (int(s) for s in w.shape)
        self.in_channels = in_per_group * groups
        k = self.kernel_size
        # MLX's CPU conv is several times slower than one contiguous matmul over an im2col view,
        # so the common cases are matmuls: taps are flattened (tap, channel) into a [k·in, out]
        # weight. Strided convs whose kernel is a multiple of the stride gather their windows by
        # reshaping the input into rows of `stride` samples. Anything else uses mx.conv1d.
        self.mode = "conv"
        if groups == 1 and (stride == 1 or (dilation == 1 and k % stride == 0)):
            self.mode = "matmul"
            self.weight = mx.array(np.ascontiguousarray(
                w.transpose(2, 1, 0).reshape(k * self.in_channels, self.out_channels)))
        else:
            self.weight = mx.array(np.ascontiguousarray(w.transpose(0, 2, 1)))  # [out, k, in/g]
        self.bias = None if bias is None else mx.array(np.asarray(bias, dtype=np.float32))
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unsupported pad mode {pad_mode!r}")
        self.pad_mode = pad_mode
        self.context = (k - 1) * dilation + 1 - stride  # samples kept between calls
        if self.context < 0:
            raise ValueError("a streaming convolution needs stride <= effective kernel size")
        self.reset()

    def reset(self) -> None:
        self._previous = mx.zeros((1, self.context, self.in_channels), dtype=mx.float32)
        self._first = True

    def get_state(self):
        return self._previous, self._first

    def set_state(self, state) -> None:
        self._previous, self._first = state

    @property
    def replicates_next(self) -> bool:
        """Whether the next call pads by replicating its first sample (a host-side decision a
        compiled step cannot make)."""
        return self.pad_mode == "replicate" and self._first and self.context > 0

    def state_arrays(self) -> list[mx.array]:
        """The device part of the state, for a compiled step (see `replicates_next`)."""
        return [self._previous] if self.context else []

    def set_state_arrays(self, arrays: list[mx.array]) -> None:
        if self.context:
            (self._previous,) = arrays

    def __call__(self, x: mx.array) -> mx.array:
        """x [1, T, C_in] with T a multiple of the stride -> [1, T / stride, C_out]."""
        T = x.shape[1]
        if T == 0 or T % self.stride:
            raise ValueError(f"input length {T} is not a positive multiple of stride {self.stride}")
        if self.context:
            previous = self._previous
            if self.pad_mode == "replicate" and self._first:
                if T < self.context:
                    raise ValueError("not enough samples to replicate-pad the first chunk")
                previous = mx.repeat(x[:, :1], self.context, axis=1)
            x = mx.concatenate([previous, x], axis=1)
            self._previous = x[:, -self.context:]
            self._first = False
        if self.mode == "conv":
            y = mx.conv1d(x, self.weight, stride=self.stride, dilation=self.dilation,
                          groups=self.groups)
        else:
            y = self._matmul(unbatch(x), T // self.stride)[None]
        if self.bias is not None:
            y = y + self.bias
        return y

    def _matmul(self, x: mx.array, n_out: int) -> mx.array:
        """x [context + T, C_in] (already padded) -> [n_out, C_out]."""
        k, S, d, C = self.kernel_size, self.stride, self.dilation, self.in_channels
        if k == 1:  # (then S == 1: the stride never exceeds the kernel)
            cols = x
        elif S == k and x.shape[0] == n_out * k:  # non-overlapping windows: a plain reshape
            cols = x.reshape(n_out, k * C)
        else:
            # im2col as one strided view (window i, tap j = row i·S + j·d), made contiguous by
            # one copy: a concatenation of the k taps would issue k copy kernels.
            cols = mx.as_strided(x, (n_out, k, C), (S * C, d * C, 1)).reshape(n_out, k * C)
        return cols @ self.weight


def _overlap_add(y: mx.array, stride: int) -> mx.array:
    """y [T, m, S, C] (kernel taps grouped by stride) -> [(T + m − 1) · S, C].

    Output block b sums y[b − i, i] over the taps i; the sum runs in tap order.
    """
    T, m, S, C = y.shape
    out = None
    for i in range(m):
        part = mx.pad(y[:, i], [(i, m - 1 - i), (0, 0), (0, 0)])  # [T + m − 1, S, C]
        out = part if out is None else out + part
    return out.reshape((T + m - 1) * S, C)


class StreamingConvTranspose1d:
    """Causal transposed 1-D convolution with streaming state (dense or depthwise).

    `weight` is in PyTorch layout [in, out/groups, k]. Only groups == 1 (dense) and
    groups == in == out (depthwise, Mimi's upsample) are supported. The output is computed as one
    matmul (dense) or one broadcast multiply (depthwise) followed by an overlap-add, which is what a
    transposed convolution is.
    """

    def __init__(self, weight, bias=None, *, stride: int, groups: int = 1):
        w = np.asarray(weight, dtype=np.float32)
        cin, out_per_group, k = w.shape
        self.stride = stride
        self.kernel_size = k
        self.taps = math.ceil(k / stride)  # kernel blocks of `stride` samples
        kpad = self.taps * stride
        w = np.pad(w, [(0, 0), (0, 0), (0, kpad - k)])  # zero taps up to a multiple of stride
        if groups == 1:
            self.depthwise = False
            self.in_channels, self.out_channels = cin, out_per_group
            # [in, k, out] -> [in, k·out]: one matmul gives every tap of every input step.
            self.weight = mx.array(np.ascontiguousarray(w.transpose(0, 2, 1).reshape(cin, -1)))
        elif groups == cin and out_per_group == 1:
            self.depthwise = True
            self.in_channels = self.out_channels = cin
            self.weight = mx.array(np.ascontiguousarray(w[:, 0, :].T))  # [k, C]
        else:
            raise ValueError("only dense or depthwise transposed convolutions are supported")
        self.bias = None if bias is None else mx.array(np.asarray(bias, dtype=np.float32))
        self.context = (self.taps - 1) * stride  # tail kept between calls (>= k − stride)
        self.reset()

    def reset(self) -> None:
        self._partial = mx.zeros((self.context, self.out_channels), dtype=mx.float32)

    def get_state(self):
        return self._partial

    def set_state(self, state) -> None:
        self._partial = state

    def state_arrays(self) -> list[mx.array]:
        return [self._partial] if self.context else []

    def set_state_arrays(self, arrays: list[mx.array]) -> None:
        if self.context:
            (self._partial,) = arrays

    def __call__(self, x: mx.array) -> mx.array:
        """x [1, T, C_in] -> [1, T · stride, C_out]."""
        T = x.shape[1]
        if self.depthwise:
            y = unbatch(x)[:, None, :] * self.weight  # [T, kpad, C]
        else:
            y = unbatch(x) @ self.weight  # [T, kpad · C_out]
        y = _overlap_add(y.reshape(T, self.taps, self.stride, self.out_channels), self.stride)
        if self.bias is not None:
            y = y + self.bias
        n = T * self.stride
        if self.context:
            if n < self.context:
                raise ValueError("a transposed-conv chunk is shorter than its kernel overlap")
            head = y[: self.context] + self._partial
            tail = y[n:]
            if self.bias is not None:
                tail = tail - self.bias
            self._partial = tail
            y = mx.concatenate([head, y[self.context: n]], axis=0) if n > self.context else head
        return y[None]
