"""The 8-bit KV ring (engine/lm/kv_ring.py, bits=8): its quantizer, the attention over it on MLX
operations, the batched prefill's agreement with stepping, the engine's setting, and on CUDA the
kernels' agreement with the MLX operations.

The quantizer is checked against a NumPy implementation of the rule written here from its
definition (bytes = round((x - low) / scale), scale = (max - min) / 255, low = min).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.lm.kv_ring import KVRing, dequantize_rows, quantize_rows
from tests.test_fused import cuda


def _np_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = x.astype(np.float32)
    low = x.min(-1, keepdims=True)
    scale = np.maximum((x.max(-1, keepdims=True) - low) / np.float32(255), np.float32(1e-30))
    q = np.clip(np.rint((x - low) / scale), 0, 255).astype(np.uint8)
    return q, scale[..., 0], low[..., 0]


def _np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_rows_quantize_to_bytes_and_a_scale_and_low_each():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 32)).astype(np.float32) * 3
    x[0, 0, 0] = 1.25  # a constant row: all zeros, dequantized exactly
    q, params = quantize_rows(mx.array(x))
    assert q.dtype == mx.uint8 and q.shape == x.shape
    assert params.dtype == mx.float32 and params.shape == x.shape[:-1] + (2,)
    nq, ns, nl = _np_quantize(x)
    assert np.abs(np.array(q).astype(int) - nq.astype(int)).max() <= 1  # ties may round apart
    np.testing.assert_allclose(np.array(params[..., 0]), ns, rtol=1e-6)
    np.testing.assert_array_equal(np.array(params[..., 1]), nl)
    back = np.array(dequantize_rows(q, params, mx.float32))
    step = ns[..., None]
    assert np.all(np.abs(back - x) <= 0.5 * step * (1 + 1e-4) + 1e-6)  # within half a step
    assert np.array_equal(back[0, 0, 0], x[0, 0, 0])
    # The extremes are kept: min and max of each row come back (to float rounding).
    np.testing.assert_allclose(back.max(-1), x.max(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back.min(-1), x.min(-1), rtol=0, atol=0)


def test_an_8_bit_ring_takes_about_half_the_bytes():
    full = KVRing(4, 8, 128, context=300, dtype=mx.bfloat16)
    small = KVRing(4, 8, 128, context=300, dtype=mx.bfloat16, bits=8)
    assert small.quantized and not full.quantized
    assert small.nbytes() == 4 * 2 * 8 * small.slots * (128 + 8)
    assert small.nbytes() / full.nbytes() == pytest.approx((128 + 8) / 256)
    with pytest.raises(ValueError, match="bits"):
        KVRing(1, 1, 4, context=8, bits=4)


@pytest.mark.parametrize("rule,hd", [("nvidia", 16), ("kyutai", 16), ("nvidia", 32)])
def test_a_step_attends_over_the_dequantized_ring_with_its_own_key_quantized(rule, hd):
    """Stepping positions one at a time through three ring wraps: each step's output equals
    NumPy's attention over the rows NumPy quantized, the new one included, in the slots the
    window rule shows (head size 32: through MLX's quantized products, 16: a dequantized copy)."""
    L, H, ctx = 2, 2, 6
    kv = KVRing(L, H, hd, context=ctx, dtype=mx.float32, rule=rule, bits=8)
    rng = np.random.default_rng(1)
    stored = {}  # (layer, position) -> dequantized (k, v) rows [H, hd]
    for pos in range(3 * ctx + 2):
        for layer in range(L):
            q, k, v = (rng.standard_normal((1, H, 1, hd)).astype(np.float32) for _ in range(3))
            out = np.array(kv.attend_step(layer, mx.array(q), mx.array(k), mx.array(v), 0.25))
            kq, ks, kl = _np_quantize(k[0, :, 0])
            vq, vs, vl = _np_quantize(v[0, :, 0])
            stored[layer, pos] = (kq * ks[:, None] + kl[:, None], vq * vs[:, None] + vl[:, None])
            first = max(0, pos - kv.slots + 1)
            K = np.stack([stored[layer, p][0] for p in range(first, pos + 1)], axis=1)
            V = np.stack([stored[layer, p][1] for p in range(first, pos + 1)], axis=1)
            want = _np_attention(q[0], K, V, 0.25)
            np.testing.assert_allclose(out[0], want, rtol=2e-3, atol=2e-3)
        kv.advance(1)


@pytest.mark.parametrize("start,T", [(3, 13), (5, 6)])
def test_a_chunk_leaves_the_ring_and_outputs_of_stepping_one_position_at_a_time(start, T):
    """(3, 13): more than a ring, the chunk's last positions wrap whole; (5, 6): the written
    positions straddle the ring's end (two writes)."""
    L, H, hd, ctx = 1, 2, 16, 8
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((1, H, T, hd)).astype(np.float32)) for _ in range(3))
    chunked = KVRing(L, H, hd, context=ctx, bits=8)
    chunked.end = start  # a ring already holding positions 0..start-1
    stepped = KVRing(L, H, hd, context=ctx, bits=8)
    stepped.end = start
    assert start + T > chunked.slots
    old = [rng.integers(0, 256, chunked.keys[0].shape, np.uint8) for _ in range(2)]
    old += [np.abs(rng.standard_normal(chunked.key_params[0].shape)).astype(np.float32)
            for _ in range(2)]
    for ring in (chunked, stepped):
        ring.keys[0], ring.values[0], ring.key_params[0], ring.value_params[0] = (
            mx.array(a) for a in old)
    out_chunk = chunked.attend_chunk(0, q, k, v, 0.25, "step")
    chunked.advance(T)
    outs = []
    for t in range(T):
        outs.append(stepped.attend_step(0, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.25))
        stepped.advance(1)
    np.testing.assert_allclose(np.array(out_chunk), np.array(mx.concatenate(outs, axis=2)),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked.arrays(), stepped.arrays()):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def engine_voice(tiny_dir) -> str:
    from engine.voices import ensure_voices_unpacked, list_voices
    ensure_voices_unpacked(tiny_dir)
    return list(list_voices(tiny_dir))[0]


def test_quantized_weights_bring_an_8_bit_ring_and_bf16_mimi_matrices_unless_told(tiny_dir):
    from engine.duplex import DuplexEngine, resolve_kv_bits
    assert resolve_kv_bits("auto", 4) == 8 and resolve_kv_bits("auto", None) is None
    assert resolve_kv_bits(16, 4) is None and resolve_kv_bits(8, None) == 8
    with pytest.raises(ValueError, match="kv_bits"):
        resolve_kv_bits(4, 4)
    plain = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32")
    assert not plain.gen.kv.quantized and plain.mimi.transformer_weights == "float32"
    lean = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", quantize=8, group_size=32)
    assert lean.gen.kv.quantized and lean.mimi.transformer_weights == "bfloat16"
    assert lean.mimi.encoder_transformer.layers[0].in_proj.dtype == mx.bfloat16
    kept = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", quantize=8, group_size=32,
                             kv_bits=16, mimi_weights="float32")
    assert not kept.gen.kv.quantized and kept.mimi.transformer_weights == "float32"
    small = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", kv_bits=8)
    assert small.gen.kv.quantized and small.gen.kv.keys[0].dtype == mx.uint8


def test_an_8_bit_ring_keeps_the_tiny_models_hidden_states_close(tiny_dir):
    """The same prompt and frames through the tiny model with a float32 ring and an 8-bit one:
    the temporal transformer's outputs stay within a few percent (greedy, so the tokens may part
    once the hidden states do; the check is on the first frames' states)."""
    from engine.duplex import DuplexEngine
    from engine.personas import Persona
    persona = Persona(name="t", prompt="hello there", voice=engine_voice(tiny_dir))
    rng = np.random.default_rng(3)
    pcm = [(0.05 * rng.standard_normal(1920)).astype(np.float32) for _ in range(6)]
    states = []
    for bits in (None, 8):
        engine = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", greedy=True,
                                   kv_bits=bits)
        engine.start(persona)
        hs = []
        for frame in pcm:
            engine.step(frame)
            hs.append(engine.gen.last_hidden.reshape(-1).copy())
        states.append(np.stack(hs))
    err = np.abs(states[0] - states[1]).max() / np.abs(states[0]).max()
    assert 0 < err < 0.05


@cuda
@pytest.mark.parametrize("kernel", ["1", "0"])
def test_on_cuda_the_kernels_over_an_8_bit_ring_match_the_mlx_operations(tiny_dir, monkeypatch,
                                                                         kernel):
    """The temporal step kernel (PARLEY_TEMPORAL_KERNEL=1) and the fused step's ring attention
    (=0) over an 8-bit ring, against MLX operations (PARLEY_FUSED=0) over the same ring: hidden
    states and rings through a prompt and frames past a ring wrap."""
    from engine.duplex import DuplexEngine
    from engine.personas import Persona
    persona = Persona(name="t", prompt="hello there", voice=engine_voice(tiny_dir))
    rng = np.random.default_rng(4)
    pcm = [(0.05 * rng.standard_normal(1920)).astype(np.float32) for _ in range(12)]
    runs = []
    for fused_on in ("1", "0"):
        monkeypatch.setenv("PARLEY_FUSED", fused_on)
        monkeypatch.setenv("PARLEY_TEMPORAL_KERNEL", kernel)
        engine = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", greedy=True, kv_bits=8)
        engine.start(persona)
        kv = engine.gen.kv
        kv.end = max(kv.end, kv.slots - 5)  # the frames fill the ring and go on past its end
        hs = []
        for frame in pcm:
            engine.step(frame)
            hs.append(engine.gen.last_hidden.reshape(-1).copy())
        runs.append((np.stack(hs), [np.array(a) for a in engine.gen.kv.arrays()]))
    (h1, r1), (h0, r0) = runs
    np.testing.assert_allclose(h1, h0, rtol=1e-3, atol=1e-3)
    for a, b in zip(r1, r0):
        if a.dtype == np.uint8:
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_memory_estimate_follows_the_lean_defaults():
    """parley doctor's estimate for the 7B against the sizes measured for session 9
    (docs/benchmarks.md: LM 4.325 / 8.169 GB after loading, Mimi 0.233 GB, 8-bit ring 0.835 GB;
    bf16 ring 1.573 GB, bf16 tables +0.66 GB at 4 bits): within 3%."""
    from engine import system
    from engine.config import parse_model_config
    cfg = parse_model_config({})
    measured = {4: 4.325 + 0.233 + 0.835, 8: 8.169 + 0.233 + 0.835}
    for bits, gb in measured.items():
        assert system.estimate_model_bytes(cfg.lm, cfg.mimi, bits) / 1e9 == pytest.approx(gb, rel=0.03)
    wide = system.estimate_model_bytes(cfg.lm, cfg.mimi, 4, kv_bits=16, quantize_tables=False)
    assert wide / 1e9 == pytest.approx(measured[4] + (1.573 - 0.835) + 0.66, rel=0.03)
