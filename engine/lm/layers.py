"""Building blocks of the LM (MODEL.md §3.2): fp32 RMSNorm, (quantizable) linear layers, single and
step-stacked, the gated SiLU feed-forward, embedding lookups with the −1 zero token, and the
attention projections.

Linear weights keep PyTorch's [out, in] layout (`y = x @ W.T`). A quantized layer holds MLX affine
quantization (`mx.quantize` along the input dimension) and runs `mx.quantized_matmul`.
Depformer linears are stacked [S, out, in] and indexed by step at run time (MODEL.md §4.2).
"""

from __future__ import annotations

import math

import mlx.core as mx

RMS_EPS = 1e-8

_CPU_QMM_F32: bool | None = None


def _cpu_qmm_f32() -> bool:
    """On the CPU backend, `quantized_matmul` with 16-bit activations *and* 16-bit scales takes a
    path ~8x slower than with float32 activations (measured with MLX 0.32.4 on x86-64), so there
    the activations are widened to float32 for the product and the result is rounded back."""
    global _CPU_QMM_F32
    if _CPU_QMM_F32 is None:
        _CPU_QMM_F32 = mx.default_device().type == mx.DeviceType.cpu
    return _CPU_QMM_F32


def rms_norm_f32(x: mx.array, alpha: mx.array, eps: float = RMS_EPS) -> mx.array:
    """`rms_norm_f32`: computed in float32, `y = x * rsqrt(mean(x²) + eps) * alpha`, cast back.
    `alpha` is stored in float32."""
    return mx.fast.rms_norm(x.astype(mx.float32), alpha, eps).astype(x.dtype)


class Linear:
    """y = x @ W.T with W [out, in]; affine-quantized when `scales` is set."""

    __slots__ = ("weight", "scales", "biases", "bits", "group_size")

    def __init__(self, weight: mx.array, scales: mx.array | None = None,
                 biases: mx.array | None = None, bits: int = 0, group_size: int = 0):
        self.weight, self.scales, self.biases = weight, scales, biases
        self.bits, self.group_size = bits, group_size

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def __call__(self, x: mx.array) -> mx.array:
        if self.scales is None:
            return x @ self.weight.T
        if x.dtype != mx.float32 and _cpu_qmm_f32():
            y = mx.quantized_matmul(x.astype(mx.float32), self.weight, self.scales, self.biases,
                                    transpose=True, group_size=self.group_size, bits=self.bits)
            return y.astype(x.dtype)
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.weight, self.scales, self.biases) if a is not None]


def _view(a: mx.array | None, i: int) -> mx.array | None:
    """Entry i of a stacked array as a view sharing its memory (`a[i]` would copy it)."""
    return None if a is None else a[i:i + 1].reshape(a.shape[1:])


class StackedLinear:
    """Per-step linears stored stacked: weight [S, out, in] (quantized: packed [S, out, in·b/32]
    with scales/biases [S, out, in/group]). `step(k)` gives step k's layer, whose arrays are views
    of the stacked buffers (a range slice + reshape shares memory in MLX, whereas `w[k]` would copy
    the step's matrix); the views are made and evaluated once, here, so steps never copy weights."""

    __slots__ = ("weight", "scales", "biases", "bits", "group_size", "_steps")

    def __init__(self, weight: mx.array, scales: mx.array | None = None,
                 biases: mx.array | None = None, bits: int = 0, group_size: int = 0):
        self.weight, self.scales, self.biases = weight, scales, biases
        self.bits, self.group_size = bits, group_size

        self._steps = [Linear(_view(weight, i), _view(scales, i), _view(biases, i), bits, group_size)
                       for i in range(int(weight.shape[0]))]
        mx.eval([lin.arrays() for lin in self._steps])

    @property
    def num_steps(self) -> int:
        return int(self.weight.shape[0])

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def step(self, k: int) -> Linear:
        return self._steps[k]

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.weight, self.scales, self.biases) if a is not None]


def gated_ffn(x: mx.array, linear_in: Linear, linear_out: Linear) -> mx.array:
    """SiLU-gated feed-forward: `linear_in` rows [0, h) are the gate, [h, 2h) the linear branch."""
    y = linear_in(x)
    h = y.shape[-1] // 2
    gate, up = y[..., :h], y[..., h:]
    return linear_out(nn_silu(gate) * up)


def nn_silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def split_heads(qkv: mx.array, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """[B, T, 3d] fused projection -> q, k, v as [B, H, T, hd] (rows: Q block, K block, V block;
    head h owns rows h·hd .. h·hd+hd−1 of each block)."""
    B, T, three_d = qkv.shape
    d = three_d // 3
    hd = d // num_heads
    if T == 1:  # the time axis can move for free: one reshape and three slices (all views)
        x = qkv.reshape(B, 3 * num_heads, 1, hd)
        return x[:, :num_heads], x[:, num_heads: 2 * num_heads], x[:, 2 * num_heads:]
    x = qkv.reshape(B, T, 3, num_heads, hd)
    # `x[:, :, i]` is a view; `x[i]` after moving the axis first would be a gather kernel
    # (engine/mxops.py).
    return tuple(x[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def merge_heads(x: mx.array) -> mx.array:
    """[B, H, T, hd] -> [B, T, H·hd]."""
    B, H, T, hd = x.shape
    if T == 1:
        return x.reshape(B, 1, H * hd)
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hd)


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


class Embedding:
    """A lookup table [rows, dim] (optionally affine-quantized). Id −1 gives an exact zero
    vector, also when quantized (MODEL.md §3.2, §13.6)."""

    __slots__ = ("weight", "scales", "biases", "bits", "group_size")

    def __init__(self, weight: mx.array, scales: mx.array | None = None,
                 biases: mx.array | None = None, bits: int = 0, group_size: int = 0):
        self.weight, self.scales, self.biases = weight, scales, biases
        self.bits, self.group_size = bits, group_size

    def unstacked(self) -> list["Embedding"]:
        """For a stacked table [S, rows, dim]: one Embedding per table, each a view."""
        out = [Embedding(_view(self.weight, i), _view(self.scales, i), _view(self.biases, i),
                         self.bits, self.group_size) for i in range(int(self.weight.shape[0]))]
        mx.eval([e.arrays() for e in out])
        return out

    def flat_rows(self, idx: mx.array) -> mx.array:
        """For a stacked table [S, rows, dim]: rows of the tables laid end to end (id
        s · rows + r is row r of table s), one gather."""
        def flat(a):
            return None if a is None else a.reshape(-1, a.shape[-1])

        return Embedding(flat(self.weight), flat(self.scales), flat(self.biases), self.bits,
                         self.group_size).rows(idx)

    def rows(self, idx: mx.array) -> mx.array:
        """Lookup of non-negative ids (no −1 handling)."""
        if self.scales is None:
            return self.weight[idx]
        return mx.dequantize(self.weight[idx], self.scales[idx], self.biases[idx],
                             group_size=self.group_size, bits=self.bits)

    def __call__(self, idx: mx.array) -> mx.array:
        """Lookup with −1 → zeros. `idx` is an int array of any shape; returns [..., dim]."""
        zero = idx == -1
        y = self.rows(mx.maximum(idx, 0))
        return mx.where(zero[..., None], mx.zeros((), dtype=y.dtype), y)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.weight, self.scales, self.biases) if a is not None]
