"""Mimi's memory options: the transformers' weight matrices stored in bfloat16
(`transformer_weights="bfloat16"`, for quantized models) with float32 activations and arithmetic,
and the default float32 parity mode left exactly as it was.

Measured on the tiny codec (tests/fixtures/personaplex-tiny, its input.wav, 96 frames) against
float32: the pre-quantizer latent moves by 0.52 % of its peak; audio decoded from the same codes
by 0.10 % RMS (6.3e-4 at most, peak 0.65); after 40 streamed frames the key/value rings by 0.62 %
(encoder) and 0.22 % (decoder) of their peaks; 95-96 % of the codes are unchanged (a latent near
the boundary between two centroids may pick the other). The bounds below leave 3-5x margin.
"""

from __future__ import annotations

import gc
import json
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.config import load_model_config, parse_mimi_config
from engine.mimi import Mimi, random_mimi_weights

TINY = Path(__file__).parent / "fixtures" / "personaplex-tiny"
TINY_MIMI = TINY / "tokenizer-e351c8d8-checkpoint125.safetensors"
FRAME = 1920
MATRICES = ("in_proj", "out_proj", "linear1", "linear2")
VECTORS = ("norm1_w", "norm1_b", "norm2_w", "norm2_b", "scale1", "scale2")


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_model_config(TINY).mimi


@pytest.fixture(scope="module")
def codecs(tiny_cfg):
    return {kind: Mimi.load(TINY_MIMI, tiny_cfg, transformer_weights=kind)
            for kind in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def user_pcm():
    with wave.open(str(TINY / "input.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    return np.pad(pcm, (0, -len(pcm) % FRAME))


def _layers(mimi: Mimi):
    return mimi.encoder_transformer.layers + mimi.decoder_transformer.layers


def test_bf16_option_holds_the_matrices_in_bf16(codecs):
    for L in _layers(codecs["bfloat16"]):
        assert all(getattr(L, m).dtype == mx.bfloat16 for m in MATRICES)
        assert all(getattr(L, v).dtype == mx.float32 for v in VECTORS)  # tiny: kept float32
    for tr in (codecs["bfloat16"].encoder_transformer, codecs["bfloat16"].decoder_transformer):
        assert all(a.dtype == mx.float32 for a in tr.state_arrays())  # activations stay float32


def test_default_holds_the_checkpoint_float32_values_unrounded(tiny_cfg):
    """The default is float32, the checkpoint's values exactly (the parity mode), and gives the
    same bits as asking for float32."""
    from engine.mimi.weights import read_mimi_checkpoint
    w = read_mimi_checkpoint(TINY_MIMI)
    default = Mimi.load(TINY_MIMI, tiny_cfg)
    for i, L in enumerate(default.encoder_transformer.layers):
        assert all(getattr(L, m).dtype == mx.float32 for m in MATRICES)
        stored = np.asarray(w[f"encoder_transformer.transformer.layers.{i}.linear1.weight"])
        rows = np.array(L.linear1)
        assert np.array_equal(rows if L.out_in else rows.T, stored)
    explicit = Mimi.load(TINY_MIMI, tiny_cfg, transformer_weights="float32")
    pcm = np.random.default_rng(0).standard_normal(4 * FRAME).astype(np.float32) * 0.1
    codes = np.array(default.encode(pcm))
    assert np.array_equal(codes, np.array(explicit.encode(pcm)))
    assert np.array_equal(np.array(default.decode(codes)), np.array(explicit.decode(codes)))


def test_unknown_weight_type_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="float16"):
        Mimi.load(TINY_MIMI, tiny_cfg, transformer_weights="float16")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_bf16_latent_and_audio_stay_close_to_float32(codecs, user_pcm):
    f32, b16 = codecs["float32"], codecs["bfloat16"]
    latent = np.array(f32.encode_latent(user_pcm))
    assert _rel(np.array(b16.encode_latent(user_pcm)), latent) < 2e-2
    codes = np.array(f32.encode(user_pcm))
    assert (np.array(b16.encode(user_pcm)) == codes).mean() > 0.8
    pcm32, pcm16 = np.array(f32.decode(codes)), np.array(b16.decode(codes))
    assert np.sqrt(np.mean((pcm16 - pcm32) ** 2) / np.mean(pcm32 ** 2)) < 5e-3
    assert np.abs(pcm16 - pcm32).max() < 3e-3


def test_bf16_streamed_frames_and_rings_stay_close_to_float32(codecs, user_pcm):
    """Streamed (compiled) frames: encode then decode 40 frames each way, the rings compared."""
    f32, b16 = codecs["float32"], codecs["bfloat16"]
    frames = [user_pcm[j * FRAME:(j + 1) * FRAME] for j in range(40)]
    codes = np.array(f32.encode(np.concatenate(frames)))
    for m in (f32, b16):
        m.reset()
    same = 0
    for j, pcm in enumerate(frames):
        a, b = np.array(f32.encode_step(pcm)), np.array(b16.encode_step(pcm))
        same += int((a == b).sum())
        got, want = np.array(b16.decode_step(codes[:, j])), np.array(f32.decode_step(codes[:, j]))
        assert np.abs(got - want).max() < 3e-3, f"frame {j}"
    assert same > 0.8 * codes.size
    for side in ("encoder_transformer", "decoder_transformer"):
        for a, b in zip(getattr(b16, side).state_arrays(), getattr(f32, side).state_arrays()):
            assert _rel(np.array(a), np.array(b)) < 2e-2, side
    for m in (f32, b16):
        m.reset()


def _moderate_cfg(d: int = 256, layers: int = 4):
    """The tiny Mimi widened to d (SEANet latent, quantizer projections, transformers)."""
    raw = json.loads((TINY / "config.json").read_text())["mimi"]
    raw["seanet"]["dimension"] = d
    raw["quantizer"].update(input_dimension=d, output_dimension=d)
    raw["transformer"].update(d_model=d, num_heads=4, num_layers=layers, dim_feedforward=4 * d,
                              input_dimension=d, output_dimensions=[d])
    return parse_mimi_config(raw)


def _active_bytes_held(weights, cfg, kind: str) -> tuple[int, int]:
    """MLX memory a codec holds once built, and after streaming compiled frames each way."""
    gc.collect()
    before = mx.get_active_memory()
    mimi = Mimi.from_weights(weights, cfg, transformer_weights=kind)
    gc.collect()
    built = mx.get_active_memory() - before
    mimi.reset()
    silence, codes = np.zeros(cfg.frame_size, np.float32), np.zeros(8, np.int64)
    for _ in range(4):  # the first frame runs eagerly, then compiled ones
        mx.eval(mimi.encode_step(silence), mimi.decode_step(codes), mimi.encoder_state_arrays())
    gc.collect()
    streaming = mx.get_active_memory() - before
    del mimi
    gc.collect()
    return built, streaming


def test_bf16_weights_free_half_the_matrices_bytes():
    """On a moderately sized random Mimi (2 × 4 layers, d 256: 6.3 M matrix weights, 25 MB in
    float32), the bf16 codec holds 2 bytes a matrix weight less, built and while streaming: no
    float32 copy of the weights stays alive (the product's widening is transient)."""
    cfg = _moderate_cfg()
    weights = random_mimi_weights(cfg, seed=0)
    n = sum(v.size for k, v in weights.items()
            if "_transformer.transformer.layers." in k and v.ndim == 2)
    assert n == 2 * 4 * 12 * 256 * 256
    f32 = _active_bytes_held(weights, cfg, "float32")
    b16 = _active_bytes_held(weights, cfg, "bfloat16")
    for a, b in zip(f32, b16):
        assert a - b == pytest.approx(2 * n, rel=0.02), (f32, b16)
