"""SEANet encoder and decoder (moshi `SEANetEncoder` / `SEANetDecoder`), streaming, channels-last.

Layer order and checkpoint indices come from `weights.encoder_layout` / `weights.decoder_layout`
(MODEL.md §10.1-§10.2). ELU before every strided conv, transposed conv and final conv; residual
blocks are ELU → conv(k, dilation) → ELU → conv(1) plus an identity skip. Every conv is causal with
its own streaming state, and each keeps the time length per stride, so the skip and block branches
always line up.
"""

from __future__ import annotations

import mlx.core as mx

from engine.config import MimiConfig
from engine.mimi.conv import StreamingConv1d, StreamingConvTranspose1d, elu
from engine.mimi.weights import decoder_layout, encoder_layout


class _ResBlock:
    def __init__(self, w: dict, prefix: str, dilation: int):
        self.conv1 = StreamingConv1d(w[f"{prefix}.block.1.conv.conv.weight"],
                                     w[f"{prefix}.block.1.conv.conv.bias"], dilation=dilation)
        self.conv2 = StreamingConv1d(w[f"{prefix}.block.3.conv.conv.weight"],
                                     w[f"{prefix}.block.3.conv.conv.bias"])

    def reset(self) -> None:
        self.conv1.reset()
        self.conv2.reset()

    def stateful(self) -> list:
        return [self.conv1, self.conv2]

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.conv2(elu(self.conv1(elu(x))))


class _Seanet:
    def __init__(self, w: dict, side: str, layout: list[dict]):
        self.layers = []  # (elu_before, module)
        for L in layout:
            base = f"{side}.model.{L['idx']}"
            if L["kind"] == "conv":
                mod = StreamingConv1d(w[f"{base}.conv.conv.weight"], w[f"{base}.conv.conv.bias"],
                                      stride=L.get("stride", 1))
            elif L["kind"] == "convtr":
                mod = StreamingConvTranspose1d(w[f"{base}.convtr.convtr.weight"],
                                               w[f"{base}.convtr.convtr.bias"], stride=L["stride"])
            else:
                mod = _ResBlock(w, base, L["dilation"])
            self.layers.append((L.get("elu_before", False), mod))

    def reset(self) -> None:
        for _, mod in self.layers:
            mod.reset()

    def stateful(self) -> list:
        """Every convolution below, each with get_state()/set_state()."""
        out = []
        for _, mod in self.layers:
            out.extend(mod.stateful() if isinstance(mod, _ResBlock) else [mod])
        return out

    def __call__(self, x: mx.array) -> mx.array:
        for elu_before, mod in self.layers:
            x = mod(elu(x) if elu_before else x)
        return x


class SeanetEncoder(_Seanet):
    """pcm [1, T, 1] -> latent [1, T / hop, dimension]."""

    def __init__(self, w: dict, cfg: MimiConfig):
        super().__init__(w, "encoder", encoder_layout(cfg))


class SeanetDecoder(_Seanet):
    """latent [1, T, dimension] -> pcm [1, T · hop, 1]."""

    def __init__(self, w: dict, cfg: MimiConfig):
        super().__init__(w, "decoder", decoder_layout(cfg))
