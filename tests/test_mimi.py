"""Mimi in MLX against NVIDIA's reference run on the tiny PersonaPlex model, plus self-consistency
(streaming == whole clip, reset, the attention ring past its window) and checkpoint validation.

No torch and no network: the reference outputs are committed in tests/fixtures/personaplex-tiny/.
"""

from __future__ import annotations

import dataclasses
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine.config import default_mimi_config, load_model_config, parse_mimi_config
from engine.errors import CheckpointError
from engine.mimi import Mimi, expected_mimi_shapes, random_mimi_weights
from engine.mimi.weights import speech_like

TINY = Path(__file__).parent / "fixtures" / "personaplex-tiny"
TINY_MIMI = TINY / "tokenizer-e351c8d8-checkpoint125.safetensors"
FRAME = 1920


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_model_config(TINY).mimi


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    return Mimi.load(TINY_MIMI, tiny_cfg, num_codebooks=8)


@pytest.fixture(scope="module")
def reference():
    return np.load(TINY / "reference" / "tokens.npz")


@pytest.fixture(scope="module")
def user_pcm(reference):
    with wave.open(str(TINY / "input.wav")) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    frames = reference["user_codes"].shape[0]
    assert -(-len(pcm) // FRAME) == frames
    return np.pad(pcm, (0, frames * FRAME - len(pcm)))  # last frame zero-padded


def _stream_encode(mimi, pcm):
    mimi.reset()
    out = []
    for j in range(len(pcm) // FRAME):
        codes = mimi.encode_step(pcm[j * FRAME:(j + 1) * FRAME])
        mx.eval(codes)
        out.append(np.array(codes))
    return np.stack(out)  # [F, K]


def _stream_decode(mimi, codes):  # codes [F, K]
    mimi.reset()
    out = []
    for frame in codes:
        pcm = mimi.decode_step(frame)
        mx.eval(pcm)
        out.append(np.array(pcm))
    return np.stack(out)  # [F, FRAME]


# -- NVIDIA's reference run ----------------------------------------------------------------------


def test_tiny_streaming_codes_match_reference(tiny, reference, user_pcm):
    codes = _stream_encode(tiny, user_pcm)
    expected = reference["user_codes"]
    assert codes.shape == expected.shape == (96, 8)
    assert codes.dtype == np.int32
    mismatch = np.argwhere(codes != expected)
    assert mismatch.size == 0, f"first mismatches (frame, codebook): {mismatch[:5].tolist()}"


def test_tiny_streaming_decode_matches_reference(tiny, reference):
    agent = reference["out_tokens"][:, 1:9]
    pcm = _stream_decode(tiny, agent)
    err = np.abs(pcm - reference["pcm_frames"]).max()
    assert err < 1e-5, err  # observed 2.7e-7


def test_tiny_uses_first_8_of_16_stored_levels(tiny):
    assert tiny.n_q_stored == 16 and tiny.num_codebooks == 8


# -- streaming == whole clip, reset ---------------------------------------------------------------


def test_whole_clip_equals_streaming(tiny, reference, user_pcm):
    streamed = _stream_encode(tiny, user_pcm)
    clip = np.array(tiny.encode(user_pcm))
    assert clip.shape == (8, 96)
    assert np.array_equal(clip.T, streamed)
    agent = reference["out_tokens"][:, 1:9]
    decoded = np.array(tiny.decode(agent.T))
    assert decoded.shape == (96 * FRAME,)
    assert np.abs(decoded - _stream_decode(tiny, agent).reshape(-1)).max() < 1e-6
    latent = np.array(tiny.encode_latent(user_pcm))
    assert latent.shape == (96, 32)


def test_whole_clip_pads_the_last_frame_with_zeros(tiny, user_pcm):
    n = 5 * FRAME + 700
    padded = np.concatenate([user_pcm[:n], np.zeros(6 * FRAME - n, np.float32)])
    assert np.array_equal(np.array(tiny.encode(user_pcm[:n])), np.array(tiny.encode(padded)))


def test_whole_clip_calls_leave_streaming_state_alone(tiny, user_pcm):
    tiny.reset()
    first = [np.array(tiny.encode_step(user_pcm[j * FRAME:(j + 1) * FRAME])) for j in range(3)]
    tiny.reset()
    a = [np.array(tiny.encode_step(user_pcm[j * FRAME:(j + 1) * FRAME])) for j in range(2)]
    tiny.encode(user_pcm[: 10 * FRAME])  # must not disturb the stream
    tiny.decode(np.zeros((8, 4), np.int32))
    a.append(np.array(tiny.encode_step(user_pcm[2 * FRAME:3 * FRAME])))
    assert all(np.array_equal(x, y) for x, y in zip(first, a))


def test_reset_restores_fresh_state(tiny, user_pcm, reference):
    first = _stream_encode(tiny, user_pcm[: 8 * FRAME])
    # keep streaming on other audio, then reset: the same audio must give the same codes
    for j in range(5):
        mx.eval(tiny.encode_step(user_pcm[(40 + j) * FRAME:(41 + j) * FRAME]))
    assert np.array_equal(_stream_encode(tiny, user_pcm[: 8 * FRAME]), first)
    # without a reset the state carries over and (here) changes the output
    tiny.reset()
    for j in range(5):
        mx.eval(tiny.encode_step(user_pcm[(40 + j) * FRAME:(41 + j) * FRAME]))
    carried = np.stack([np.array(tiny.encode_step(user_pcm[j * FRAME:(j + 1) * FRAME]))
                        for j in range(8)])
    assert not np.array_equal(carried, first)
    # decoder reset
    agent = reference["out_tokens"][:6, 1:9]
    d1 = _stream_decode(tiny, agent)
    d2 = _stream_decode(tiny, agent)
    assert np.array_equal(d1, d2)


def test_step_inputs_are_validated(tiny):
    with pytest.raises(ValueError):
        tiny.encode_step(np.zeros(FRAME - 1, np.float32))
    with pytest.raises(ValueError):
        tiny.decode_step(np.full(8, 64))  # out of range for a 64-entry codebook
    tiny.reset()
    assert np.array(tiny.encode_step(mx.zeros((FRAME,)))).shape == (8,)
    assert np.array(tiny.decode_step(mx.zeros((8,), dtype=mx.int32))).shape == (FRAME,)


# -- the attention window past its end (self-consistency; the reference check is in
#    test_mimi_reference.py) -------------------------------------------------------------------


def _small_context_cfg(context: int):
    base = load_model_config(TINY).mimi
    return dataclasses.replace(
        base, transformer=dataclasses.replace(base.transformer, context=context))


def test_ring_past_window_streaming_equals_chunked():
    """A context-10 Mimi over 40 frames (80 positions, the ring wraps 8 times): streaming frame by
    frame equals the whole-clip path, which runs many frames per call with a different key layout
    (blocks of up to 256 positions concatenated onto the ring)."""
    cfg = _small_context_cfg(10)
    pcm = speech_like(40 * FRAME, seed=3)
    w = random_mimi_weights(cfg, seed=5, n_q_stored=16, fit_pcm=pcm)
    mimi = Mimi.from_weights(w, cfg, 8)
    streamed = _stream_encode(mimi, pcm)
    assert len({tuple(c) for c in streamed}) > 20  # the codes vary
    assert np.array_equal(np.array(mimi.encode(pcm)).T, streamed)
    tr = mimi.encoder_transformer
    assert tr.ring_k[0].shape[1] == 10  # fixed ring, never grows
    pcm_stream = _stream_decode(mimi, streamed)
    assert np.abs(np.array(mimi.decode(streamed.T)) - pcm_stream.reshape(-1)).max() < 1e-6
    assert mimi.decoder_transformer.ring_k[0].shape[1] == 10


@pytest.mark.parametrize("context", [10, 9])
def test_compiled_streaming_frames_equal_eager_frames(context):
    """Streaming frames run as compiled functions (after the first) give the eager frames' codes
    and audio, through ring wraps; with an odd context some frames' keys straddle the ring's end,
    and those frames fall back to the eager path."""
    cfg = _small_context_cfg(context)
    pcm = speech_like(24 * FRAME, seed=7)
    w = random_mimi_weights(cfg, seed=8, n_q_stored=16, fit_pcm=pcm)
    compiled, eager = Mimi.from_weights(w, cfg, 8), Mimi.from_weights(w, cfg, 8)
    eager.compile = False
    codes = _stream_encode(compiled, pcm)
    assert np.array_equal(codes, _stream_encode(eager, pcm))
    assert len({tuple(c) for c in codes}) > 10
    audio = _stream_decode(compiled, codes)
    assert np.abs(audio - _stream_decode(eager, codes)).max() < 1e-6
    assert set(compiled._step_fns) == {"encode", "decode"} and not eager._step_fns


def test_window_rule_changes_output_past_the_window():
    """Sanity: with context 10 the window matters (a context-1000 model gives other codes after
    the first 5 frames, identical ones before)."""
    pcm = speech_like(12 * FRAME, seed=4)
    cfg10 = _small_context_cfg(10)
    w = random_mimi_weights(cfg10, seed=6, n_q_stored=16, fit_pcm=pcm)
    short = _stream_encode(Mimi.from_weights(w, cfg10, 8), pcm)
    long = _stream_encode(Mimi.from_weights(w, _small_context_cfg(1000), 8), pcm)
    assert np.array_equal(short[:4], long[:4])
    assert not np.array_equal(short, long)


# -- checkpoint naming and validation ---------------------------------------------------------


def test_expected_shapes_counts():
    full = expected_mimi_shapes(default_mimi_config(), 32)
    assert len(full) == 318
    assert full["encoder.model.12.conv.conv.weight"] == (1024, 512, 16)
    assert full["decoder.model.2.convtr.convtr.weight"] == (1024, 512, 16)
    assert full["upsample.convtr.convtr.convtr.weight"] == (512, 1, 4)
    assert full["encoder_transformer.transformer.layers.7.self_attn.in_proj_weight"] == (1536, 512)
    assert full["quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"] == (2048, 256)
    tiny = expected_mimi_shapes(load_model_config(TINY).mimi, 16)
    stored = load_file(str(TINY_MIMI))
    assert len(tiny) == 150
    assert {k: tuple(v.shape) for k, v in stored.items()} == tiny


def test_random_weights_use_the_real_naming(tiny_cfg):
    w = random_mimi_weights(tiny_cfg, seed=0, n_q_stored=16)
    assert {k: v.shape for k, v in w.items()} == expected_mimi_shapes(tiny_cfg, 16)
    assert all(v.dtype == np.float32 for v in w.values())
    again = random_mimi_weights(tiny_cfg, seed=0, n_q_stored=16)
    assert all(np.array_equal(w[k], again[k]) for k in w)


def _write(tmp_path, weights, name="mimi.safetensors"):
    path = tmp_path / name
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path))
    return path


def test_missing_tensor_is_named(tmp_path, tiny_cfg):
    w = load_file(str(TINY_MIMI))
    del w["decoder.model.5.convtr.convtr.weight"]
    with pytest.raises(CheckpointError, match=r"decoder\.model\.5\.convtr\.convtr\.weight"):
        Mimi.load(_write(tmp_path, w), tiny_cfg)


def test_unexpected_tensor_is_named(tmp_path, tiny_cfg):
    w = load_file(str(TINY_MIMI))
    w["encoder.model.99.conv.conv.weight"] = np.zeros((1, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder\.model\.99"):
        Mimi.load(_write(tmp_path, w), tiny_cfg)


def test_wrong_shape_is_named(tmp_path, tiny_cfg):
    w = load_file(str(TINY_MIMI))
    w["encoder_transformer.transformer.layers.1.linear1.weight"] = np.zeros((65, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"layers\.1\.linear1\.weight' has shape \[65, 32\]"):
        Mimi.load(_write(tmp_path, w), tiny_cfg)


def test_config_mismatch_is_reported(tiny_cfg):
    with pytest.raises(CheckpointError, match="configured Mimi"):
        Mimi.load(TINY_MIMI, default_mimi_config())


def test_not_a_safetensors_file(tmp_path, tiny_cfg):
    bad = tmp_path / "mimi.safetensors"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Mimi.load(bad, tiny_cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        Mimi.load(tmp_path / "absent.safetensors", tiny_cfg)


def test_too_many_codebooks(tiny_cfg):
    with pytest.raises(CheckpointError, match="stores 16 quantizer levels"):
        Mimi.load(TINY_MIMI, tiny_cfg, num_codebooks=17)


def test_stored_level_count_comes_from_the_file(tmp_path):
    cfg = parse_mimi_config({**_tiny_mimi_json(), "quantizer": {
        **_tiny_mimi_json()["quantizer"], "n_q": 32}})  # config says 32, file stores 16
    mimi = Mimi.load(TINY_MIMI, cfg)
    assert mimi.n_q_stored == 16
    w = random_mimi_weights(cfg, seed=1, n_q_stored=4)
    assert Mimi.load(_write(tmp_path, w), cfg, num_codebooks=4).n_q_stored == 4
    with pytest.raises(CheckpointError):
        Mimi.load(_write(tmp_path, w, "b.safetensors"), cfg, num_codebooks=8)


def _tiny_mimi_json():
    import json
    return json.loads((TINY / "config.json").read_text())["mimi"]


@pytest.mark.parametrize("window,steady", [("personaplex", [4, 5]), ("moshi", [5, 6])])
def test_visible_keys_per_query(window, steady):
    """Keys each query of a frame sees, frame after frame, with context 6 and 2 positions per
    frame: a plain causal mask at first, then context − 2 / context − 1 keys (NVIDIA's fork, which
    hides its ring's oldest slot from the call that fills it) or context − 1 / context keys
    (moshi 0.2.13). MODEL.md §13.3; tests/fixtures/reference/README.md."""
    from engine.mimi.transformer import MimiTransformer

    d = 8
    rng = np.random.default_rng(0)
    layer = {"self_attn.in_proj_weight": rng.standard_normal((3 * d, d)),
             "self_attn.out_proj.weight": rng.standard_normal((d, d)),
             "linear1.weight": rng.standard_normal((16, d)),
             "linear2.weight": rng.standard_normal((d, 16)),
             "norm1.weight": np.ones(d), "norm1.bias": np.zeros(d),
             "norm2.weight": np.ones(d), "norm2.bias": np.zeros(d),
             "layer_scale_1.scale": np.ones(d), "layer_scale_2.scale": np.ones(d)}
    tr = MimiTransformer([layer], d_model=d, num_heads=2, context=6, max_period=10000,
                         positions_per_frame=2, window=window)
    counts = []
    for _ in range(8):
        qpos = np.arange(tr.offset, tr.offset + 2)
        counts.append(np.isfinite(np.array(tr._mask(qpos))).sum(axis=1).tolist())
        mx.eval(tr(mx.zeros((2, d))))
    assert counts[:2] == [[1, 2], [3, 4]]
    assert counts[-1] == steady and counts[4] == steady
    assert tr.ring_k[0].shape == (2, 6, 4)
