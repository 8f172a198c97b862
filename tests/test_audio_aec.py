"""Echo handling (AUDIO.md §8, §14.1): AEC3 adapter on the synthetic echo path, the mic gate,
headphones mode and the fallback when pywebrtc-audio is missing."""

import builtins

import numpy as np
import pytest

from engine.audio import signals as S
from engine.audio.aec import EchoMode, HeadphonesMode, MicGate, create_echo_canceller, erle_db

R = 24000
F = 1920


def _scene(delay_ms=40.0, gain_db=-6.0, tanh=0.0):
    far = S.speech_like(12.4, seed=3, f0=110, level_dbfs=-18, pause_every_s=1.6)
    near = np.zeros_like(far)
    ns = S.speech_like(4.2, seed=7, f0=210, level_dbfs=-24)
    near[8 * R : 8 * R + len(ns)] = ns
    echo = S.echo_path(far, delay_ms=delay_ms, gain_db=gain_db, tanh_drive=tanh)
    noise = S.brown_noise(12.4, -65, seed=5)
    return far, near, echo, noise


def _run(aec, mic, ref):
    out = np.zeros_like(mic)
    for i in range(0, len(mic) - F + 1, F):
        out[i : i + F] = aec.process(mic[i : i + F], ref[i : i + F])
    return out


@pytest.mark.parametrize("delay_ms,tanh", [(40.0, 0.0), (150.0, 0.0), (40.0, 2.0)])
def test_webrtc_aec_erle_above_30_db_and_keeps_near_end(delay_ms, tanh):
    pytest.importorskip("pywebrtc_audio", reason="pywebrtc-audio is not installed (a dependency of parley: reinstall it)")
    far, near, echo, noise = _scene(delay_ms, tanh=tanh)
    mic = echo + near + noise
    aec = create_echo_canceller("aec", R)
    assert aec.mode is EchoMode.AEC and aec.fallback_reason is None
    clean = _run(aec, mic, far)
    far_only = slice(2 * R, 8 * R)  # after 2 s of convergence, before the near end talks
    erle = erle_db(mic[far_only], clean[far_only])
    assert erle > 30.0, erle
    dt = slice(8 * R + R // 2, 8 * R + int(4.2 * R))
    near_loss = 10 * np.log10(np.sum(near[dt] ** 2) / np.sum(clean[dt] ** 2))
    assert near_loss < 6.0, near_loss
    assert aec.speech_probability is not None and len(aec.sub_probabilities) == 8


def test_headphones_mode_is_bit_exact_pass_through():
    far, near, echo, noise = _scene()
    mic = (echo + near)[: 5 * F]
    hp = create_echo_canceller("headphones", R)
    assert isinstance(hp, HeadphonesMode)
    out = _run(hp, mic, far[: 5 * F])
    np.testing.assert_array_equal(out, mic)


def test_mic_gate_ducks_while_far_end_plays():
    far = S.sine(2.0, 300.0, 0.3)
    far[R:] = 0.0  # far end stops after 1 s
    mic = S.sine(2.0, 1000.0, 0.1)
    gate = MicGate(R)
    out = _run(gate, mic, far)
    ducked = erle_db(mic[int(0.2 * R) : int(0.9 * R)], out[int(0.2 * R) : int(0.9 * R)])
    assert 24.0 < ducked < 26.0
    released = erle_db(mic[int(1.5 * R) :], out[int(1.5 * R) :])
    assert abs(released) < 0.1


def test_aec_falls_back_to_gate_without_pywebrtc(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("pywebrtc_audio"):
            raise ImportError("no module")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    aec = create_echo_canceller("aec", R)
    assert aec.mode is EchoMode.GATE
    assert "pywebrtc-audio" in aec.fallback_reason


def test_echo_mode_parsing_and_cycle():
    assert EchoMode.parse("off") is EchoMode.HEADPHONES
    assert EchoMode.parse("AEC") is EchoMode.AEC
    assert EchoMode.AEC.next() is EchoMode.HEADPHONES and EchoMode.GATE.next() is EchoMode.AEC
    with pytest.raises(ValueError):
        EchoMode.parse("loud")
