"""BS.1770-4 loudness: must equal pyloudnorm (what the reference uses) bit for bit.

pyloudnorm and scipy are test-only dependencies; the comparisons skip when they are missing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.loudness import integrated_loudness, k_weight, normalize_loudness

FIXTURE = Path(__file__).parent / "fixtures" / "personaplex-tiny"


def _signals(rate: int, seconds: float, dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    speechy = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t))
    speechy += 0.02 * rng.standard_normal(n)
    gated = speechy.copy()
    gated[n // 3 : 2 * n // 3] *= 1e-4  # a quiet middle section the relative gate removes
    return {
        "noise": (0.1 * rng.standard_normal(n)).astype(dtype),
        "speechy": speechy.astype(dtype),
        "gated": gated.astype(dtype),
    }


def _pyln():
    return pytest.importorskip("pyloudnorm")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rate", [24000, 44100])
def test_integrated_loudness_equals_pyloudnorm(rate, dtype):
    pyln = _pyln()
    meter = pyln.Meter(rate)
    for name, x in _signals(rate, 1.7, dtype).items():
        ours = integrated_loudness(x, rate)
        ref = meter.integrated_loudness(x)
        assert ours == ref, (name, ours, ref)


def test_k_weighting_equals_scipy_lfilter():
    pyln = _pyln()
    signal = pytest.importorskip("scipy.signal")
    x = _signals(24000, 0.5, np.float64)["noise"]
    meter = pyln.Meter(24000)
    ref = x
    for stage in meter._filters.values():
        ref = signal.lfilter(stage.b, stage.a, ref)
    np.testing.assert_array_equal(k_weight(x, 24000), ref)


def test_stereo_equals_pyloudnorm():
    pyln = _pyln()
    s = _signals(24000, 1.0, np.float32)
    x = np.stack([s["noise"], s["speechy"]], axis=1)
    assert integrated_loudness(x, 24000) == pyln.Meter(24000).integrated_loudness(x)


def test_voice_wav_normalisation_equals_reference_pipeline():
    """The reference: float32 samples -> pyloudnorm meter -> pyloudnorm.normalize.loudness."""
    pyln = _pyln()
    x, sr = sf.read(str(FIXTURE / "voices" / "TINY0.wav"), dtype="float32")
    assert sr == 24000 and x.dtype == np.float32
    ref_l = pyln.Meter(sr).integrated_loudness(x)
    assert integrated_loudness(x, sr) == ref_l
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pyln.normalize.loudness(x, ref_l, -24.0)
    ours = normalize_loudness(x, sr, -24.0)
    assert ours.dtype == ref.dtype
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours.astype(np.float32), ref.astype(np.float32))


def test_normalized_signal_measures_target():
    x = _signals(24000, 1.2, np.float64)["speechy"]
    for target in (-24.0, -16.0, -30.0):
        y = normalize_loudness(x, 24000, target)
        assert abs(integrated_loudness(y, 24000) - target) < 1e-9


def test_known_value_1khz_sine():
    # BS.1770: a 1 kHz full-scale sine reads -3.01 LUFS (K-weighting is ~0 dB at 1 kHz).
    rate = 48000
    t = np.arange(rate * 2) / rate
    x = np.sin(2 * np.pi * 1000 * t)
    assert abs(integrated_loudness(x, rate) - (-3.01)) < 0.05


def test_silence_and_too_short_are_returned_unchanged():
    silence = np.zeros(24000, np.float32)
    assert integrated_loudness(silence, 24000) == float("-inf")
    out = normalize_loudness(silence, 24000)
    np.testing.assert_array_equal(out, silence)
    assert np.isfinite(out).all()

    short = (0.1 * np.random.default_rng(0).standard_normal(9599)).astype(np.float32)  # < 400 ms
    assert integrated_loudness(short, 24000) == float("-inf")
    np.testing.assert_array_equal(normalize_loudness(short, 24000), short)

    very_quiet = np.full(24000, 1e-6, np.float32)  # every block below the -70 LUFS gate
    np.testing.assert_array_equal(normalize_loudness(very_quiet, 24000), very_quiet)


def test_bad_input_types():
    with pytest.raises(ValueError):
        integrated_loudness(np.zeros(24000, np.int16), 24000)
    with pytest.raises(ValueError):
        integrated_loudness(np.zeros((10, 10, 10)), 24000)
    # Integer input to normalize_loudness is converted, not refused.
    y = normalize_loudness((np.random.default_rng(0).standard_normal(24000) * 3000).astype(np.int16)
                           / 32768.0, 24000)
    assert y.dtype == np.float64
