"""Mimi, the 24 kHz <-> 12.5 Hz neural audio codec, in MLX (MODEL.md §10).

    mimi = Mimi.load(path, cfg, num_codebooks=8)
    mimi.reset()                       # fresh streaming state (encoder and decoder)
    codes = mimi.encode_step(pcm)      # float32 [frame_size] -> int32 [num_codebooks]
    pcm = mimi.decode_step(codes)      # [num_codebooks] -> float32 [frame_size]
    mimi.encode(clip) / mimi.decode(codes) / mimi.encode_latent(clip)   # whole clips

Laziness: `encode_step` and `decode_step` return *un-evaluated* MLX arrays, and the streaming state
they update is lazy too. Call `mx.eval` on the results once per frame (for example
`mx.eval(codes, pcm)` to fuse the encode and decode of a frame); the state is then evaluated as part
of the next frame. Do evaluate every frame: a caller that never evaluates builds an ever-growing
graph. `np.asarray(result)` also evaluates.

Attention window: past `context` transformer positions (10 s) the two PyTorch references differ by
one key; `window="personaplex"` (default, NVIDIA's fork) or `window="moshi"` (Kyutai's 0.2.13,
which made the golden fixtures) picks one. See engine/mimi/transformer.py.

Transformer weights: `transformer_weights="bfloat16"` stores the two transformers' weight
matrices in bf16 (half their ~0.2 GB at full size), for quantized models, already lossy;
activations and arithmetic stay float32. The default "float32" is the parity mode.

Whole-clip calls (`encode`, `decode`, `encode_latent`) start from a fresh state, leave the
streaming state untouched, evaluate as they go and return evaluated arrays. They run exactly the
streaming computation (the same convolution states and the same attention window, applied frame by
frame), in chunks of several frames for speed, so their codes equal the streamed ones.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.config import MimiConfig, default_mimi_config
from engine.errors import CheckpointError
from engine.mimi.conv import StreamingConv1d, StreamingConvTranspose1d
from engine.mimi.quantizer import SplitRVQ
from engine.mimi.seanet import SeanetDecoder, SeanetEncoder
from engine.mimi.transformer import MimiTransformer
from engine.mimi.weights import read_mimi_checkpoint, stored_levels, validate_mimi_weights
from engine.mxops import unbatch

# Frames per chunk in whole-clip calls (bounds memory; any value gives the same result).
CLIP_CHUNK_FRAMES = 16


def _transformer_params(w: dict, side: str, num_layers: int) -> list[dict]:
    out = []
    for i in range(num_layers):
        prefix = f"{side}_transformer.transformer.layers.{i}."
        out.append({k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)})
    return out


class Mimi:
    """Streaming Mimi codec, batch size 1, float32 throughout (the transformers' weight matrices
    optionally stored in bfloat16)."""

    def __init__(self, weights: dict[str, np.ndarray], cfg: MimiConfig, num_codebooks: int,
                 n_q_stored: int, window: str = "personaplex", compile: bool = True,
                 transformer_weights: str = "float32"):
        self.transformer_weights = transformer_weights
        if not 1 <= num_codebooks <= n_q_stored:
            raise CheckpointError(
                f"the Mimi checkpoint stores {n_q_stored} quantizer levels, so it cannot provide "
                f"{num_codebooks} codebooks.")
        self.cfg = cfg
        self.compile = compile  # streaming frames as compiled functions (see `_step`)
        self.encoder_resets = 0  # counts reset_encoder() calls (a worker thread watches it)
        self._step_fns: dict = {}
        self.num_codebooks = num_codebooks
        self.n_q_stored = n_q_stored
        self.frame_size = cfg.frame_size
        self.sample_rate = cfg.sample_rate
        self.cardinality = cfg.quantizer.bins
        t = cfg.transformer
        stride = cfg.downsample_stride
        self._positions_per_frame = cfg.frame_size // cfg.seanet.hop_length

        def transformer(side):
            return MimiTransformer(_transformer_params(weights, side, t.num_layers),
                                   d_model=t.d_model, num_heads=t.num_heads, context=t.context,
                                   max_period=t.max_period,
                                   positions_per_frame=self._positions_per_frame, window=window,
                                   weights=transformer_weights)

        self.encoder = SeanetEncoder(weights, cfg)
        self.encoder_transformer = transformer("encoder")
        self.downsample = StreamingConv1d(weights["downsample.conv.conv.conv.weight"], None,
                                          stride=stride, pad_mode="replicate")
        self.quantizer = SplitRVQ.from_weights(weights, n_q_stored, num_codebooks)
        self.upsample = StreamingConvTranspose1d(weights["upsample.convtr.convtr.convtr.weight"],
                                                 None, stride=stride, groups=t.d_model)
        self.decoder_transformer = transformer("decoder")
        self.decoder = SeanetDecoder(weights, cfg)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, cfg: MimiConfig | None = None, num_codebooks: int = 8,
             window: str = "personaplex", transformer_weights: str = "float32") -> "Mimi":
        """Loads a PyTorch-named safetensors checkpoint, validated against `cfg` (default: the
        built-in full-size Mimi). The stored level count is taken from the file.

        `window` picks the reference whose streaming attention window is reproduced once the
        transformers pass `context` positions (10 s): "personaplex" (NVIDIA's fork, the default)
        or "moshi" (Kyutai's moshi 0.2.13); see engine/mimi/transformer.py.

        `transformer_weights` is how the transformers' weight matrices are stored: "float32"
        (the default, parity with the reference) or "bfloat16" (half the memory, float32 math;
        for quantized models).
        """
        cfg = default_mimi_config() if cfg is None else cfg
        weights = read_mimi_checkpoint(path)
        return cls.from_weights(weights, cfg, num_codebooks, source=str(path), window=window,
                                transformer_weights=transformer_weights)

    @classmethod
    def from_weights(cls, weights: dict[str, np.ndarray], cfg: MimiConfig,
                     num_codebooks: int = 8, validate: bool = True,
                     source: str = "the Mimi checkpoint", window: str = "personaplex",
                     transformer_weights: str = "float32") -> "Mimi":
        """Builds from a PyTorch-named state dict of numpy arrays (`transformer_weights`: see
        `load`)."""
        if validate:
            n_q = validate_mimi_weights(weights, cfg, source)
        else:
            n_q = stored_levels(weights.keys())
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        return cls(weights, cfg, num_codebooks, n_q, window=window,
                   transformer_weights=transformer_weights)

    # -- state --------------------------------------------------------------------------------

    def _encoder_modules(self):
        return [self.encoder, self.encoder_transformer, self.downsample]

    def _decoder_modules(self):
        return [self.upsample, self.decoder_transformer, self.decoder]

    def reset_encoder(self) -> None:
        for m in self._encoder_modules():
            m.reset()
        self.encoder_resets += 1

    def encoder_state_arrays(self) -> list[mx.array]:
        """The encoder's streaming state (to evaluate it together with a frame's codes)."""
        return [a for m in self._leaves(self._encoder_modules()) for a in m.state_arrays()]

    def reset_decoder(self) -> None:
        for m in self._decoder_modules():
            m.reset()

    def reset(self) -> None:
        """Fresh streaming state for both directions (do it at every session start)."""
        self.reset_encoder()
        self.reset_decoder()

    @staticmethod
    def _leaves(modules) -> list:
        """Every stateful object below `modules` (convolutions, transformers)."""
        leaves = []
        for m in modules:
            leaves.extend(m.stateful() if isinstance(m, (SeanetEncoder, SeanetDecoder)) else [m])
        return leaves

    @classmethod
    def _snapshot(cls, modules) -> list:
        """The streaming state of every stateful object below `modules` (MLX arrays are
        immutable, so keeping references is enough)."""
        return [(m, m.get_state()) for m in cls._leaves(modules)]

    @staticmethod
    def _restore(snap) -> None:
        for m, state in snap:
            m.set_state(state)

    # -- streaming ----------------------------------------------------------------------------

    def _as_pcm(self, pcm, frames: int | None = None) -> mx.array:
        arr = pcm if isinstance(pcm, mx.array) else mx.array(np.asarray(pcm, dtype=np.float32))
        arr = arr.astype(mx.float32).reshape(-1)
        if frames is not None and arr.shape[0] != frames * self.frame_size:
            raise ValueError(f"expected {frames * self.frame_size} samples, got {arr.shape[0]}")
        return arr

    def _latent(self, pcm: mx.array) -> mx.array:
        """pcm [T] (T a multiple of the frame size) -> pre-quantizer latent [T / frame, D]."""
        x = self.encoder(pcm.reshape(1, -1, 1))
        x = self.encoder_transformer(unbatch(x))
        return unbatch(self.downsample(x[None]))

    def _synth(self, latent: mx.array) -> mx.array:
        """Quantized latent [F, D] -> pcm [F · frame]."""
        x = self.upsample(latent[None])
        x = self.decoder_transformer(unbatch(x))
        return self.decoder(x[None]).reshape(-1)

    def _codes(self, codes) -> mx.array:
        if isinstance(codes, mx.array):  # not range-checked: that would force an evaluation
            arr = codes.astype(mx.int32)
        else:
            host = np.asarray(codes)
            if host.size and (host.min() < 0 or host.max() >= self.cardinality):
                raise ValueError(f"codes must lie in [0, {self.cardinality})")
            arr = mx.array(host.astype(np.int32))
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or not 1 <= arr.shape[0] <= self.num_codebooks:
            raise ValueError(f"codes must have shape [<= {self.num_codebooks}, frames], "
                             f"got {tuple(arr.shape)}")
        return arr

    def encode_step(self, pcm) -> mx.array:
        """One frame of pcm (float32 [frame_size]) -> codes int32 [num_codebooks] (lazy)."""
        plan = self.encoder_transformer.plan(self._positions_per_frame)
        return self._step("encode", self._encoder_modules(), self._encode_frame,
                          self._as_pcm(pcm, 1), plan)

    def decode_step(self, codes) -> mx.array:
        """Codes [num_codebooks] of one frame -> pcm float32 [frame_size] (lazy)."""
        plan = self.decoder_transformer.plan(self._positions_per_frame)
        return self._step("decode", self._decoder_modules(), self._decode_frame,
                          self._codes(codes), plan)

    def _encode_frame(self, pcm: mx.array, plan) -> mx.array:
        x = self.encoder(pcm.reshape(1, -1, 1))
        x = self.encoder_transformer.apply(unbatch(x), plan)
        return self.quantizer.encode(unbatch(self.downsample(x[None])))[:, 0]

    def _decode_frame(self, codes: mx.array, plan) -> mx.array:
        x = self.upsample(self.quantizer.decode(codes)[None])
        x = self.decoder_transformer.apply(unbatch(x), plan)
        return self.decoder(x[None]).reshape(-1)

    def _step(self, name: str, modules, frame_fn, inp: mx.array, plan) -> mx.array:
        """One streaming frame through `frame_fn`, as one `mx.compile`d function of (input, the
        transformer's plan arrays, the state arrays) whenever the frame's graph does not depend
        on host-side state: a compiled frame fuses Mimi's elementwise work (ELU, GELU, RoPE,
        layer scales) and skips rebuilding ~1000 operations in Python, which is what a frame
        costs on a GPU. The first frame (replicate padding) and ring-wrapping frames run as is."""
        leaves = self._leaves(modules)
        if (not self.compile or plan.segments != ((0, self._positions_per_frame),)
                or any(getattr(m, "replicates_next", False) for m in leaves)):
            return frame_fn(inp, plan)
        fn = self._step_fns.get(name)
        if fn is None:
            def traced(inp, plan_arrays, states):
                for m, st in zip(leaves, states):
                    m.set_state_arrays(st)
                out = frame_fn(inp, plan.with_arrays(plan_arrays))
                return out, [m.state_arrays() for m in leaves]

            fn = self._step_fns[name] = mx.compile(traced)
        out, states = fn(inp, plan.arrays(), [m.state_arrays() for m in leaves])
        for m, st in zip(leaves, states):
            m.set_state_arrays(st)
        return out

    # -- whole clips --------------------------------------------------------------------------

    def _clip(self, modules, chunks, fn) -> mx.array:
        snap = self._snapshot(modules)
        for m in modules:
            m.reset()
        try:
            outs = []
            for chunk in chunks:
                out = fn(chunk)
                mx.eval(out)
                outs.append(out)
        finally:
            self._restore(snap)
        return outs

    def _pcm_chunks(self, pcm):
        arr = self._as_pcm(pcm)
        n = arr.shape[0]
        frames = max(1, -(-n // self.frame_size))
        if frames * self.frame_size != n:  # zero-pad the last frame, as the reference does
            arr = mx.concatenate([arr, mx.zeros((frames * self.frame_size - n,), mx.float32)])
        step = CLIP_CHUNK_FRAMES * self.frame_size
        return [arr[s: s + step] for s in range(0, frames * self.frame_size, step)]

    def encode_latent(self, pcm) -> mx.array:
        """Whole clip -> pre-quantizer latent float32 [F, D] (F = frames, last zero-padded)."""
        outs = self._clip(self._encoder_modules(), self._pcm_chunks(pcm), self._latent)
        return mx.concatenate(outs, axis=0)

    def encode(self, pcm) -> mx.array:
        """Whole clip -> codes int32 [num_codebooks, F], equal to streaming from a fresh state."""
        outs = self._clip(self._encoder_modules(), self._pcm_chunks(pcm),
                          lambda c: self.quantizer.encode(self._latent(c)))
        return mx.concatenate(outs, axis=1)

    def decode(self, codes) -> mx.array:
        """Codes [num_codebooks, F] -> pcm float32 [F · frame_size], equal to streaming."""
        arr = self._codes(codes)
        n = CLIP_CHUNK_FRAMES
        chunks = [arr[:, s: s + n] for s in range(0, arr.shape[1], n)]
        outs = self._clip(self._decoder_modules(), chunks,
                          lambda c: self._synth(self.quantizer.decode(c)))
        return mx.concatenate(outs, axis=0)
