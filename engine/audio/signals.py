"""Deterministic generated signals for tests, benchmarks and diagnostics (AUDIO.md §12.1): sines,
click trains, brown noise, a speech-like babble (voiced harmonics with syllable envelopes) and a
synthetic echo path (bulk delay + exponential room tail + optional loudspeaker distortion)."""

from __future__ import annotations

import numpy as np

RATE = 24000


def sine(seconds: float, freq: float = 440.0, amplitude: float = 1.0, rate: int = RATE, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def click_train(seconds: float, period_s: float = 0.5, amplitude: float = 0.8, rate: int = RATE, width: int = 24) -> np.ndarray:
    x = np.zeros(int(round(seconds * rate)), dtype=np.float32)
    step = int(round(period_s * rate))
    for start in range(0, len(x), step):
        x[start : start + width] = amplitude
    return x


def brown_noise(seconds: float, level_dbfs: float = -45.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    w = rng.standard_normal(n)
    b = np.cumsum(w)
    # remove the random walk's drift with a gentle leak (one-pole high-pass at ~20 Hz)
    b = b - np.convolve(b, np.ones(1200) / 1200, mode="same")
    b = b / (np.sqrt(np.mean(b**2)) + 1e-12)
    return (b * 10 ** (level_dbfs / 20)).astype(np.float32)


def speech_like(
    seconds: float,
    rate: int = RATE,
    seed: int = 0,
    f0: float = 120.0,
    level_dbfs: float = -20.0,
    syllables_per_s: float = 4.0,
    pause_every_s: float = 0.0,
) -> np.ndarray:
    """Voiced babble: a glottal-like harmonic series with a wandering pitch, three moving formants
    and 4 Hz syllable envelopes; optional pauses. RMS over the voiced parts ≈ `level_dbfs`."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    # pitch contour
    knots = max(2, int(seconds * 3) + 2)
    contour = np.interp(t, np.linspace(0, seconds, knots), f0 * (1 + 0.15 * rng.standard_normal(knots)))
    phase = 2 * np.pi * np.cumsum(contour) / rate
    x = np.zeros(n)
    formants = np.interp(
        t[:, None] if False else t,
        np.linspace(0, seconds, knots),
        rng.uniform(400, 900, knots),
    )
    for h in range(1, 30):
        fh = h * contour
        # formant weighting: a few resonances that move with the "vowel"
        w = (
            np.exp(-(((fh - formants) / 180.0) ** 2))
            + 0.6 * np.exp(-(((fh - 2.4 * formants) / 250.0) ** 2))
            + 0.3 * np.exp(-(((fh - 4.0 * formants) / 350.0) ** 2))
            + 0.02
        )
        w = np.where(fh < rate / 2 - 500, w, 0.0)
        x += w * np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h**0.5
    # syllable envelope
    env_rate = syllables_per_s
    env = 0.5 - 0.5 * np.cos(2 * np.pi * env_rate * t + rng.uniform(0, 2 * np.pi))
    env = env**0.7
    if pause_every_s > 0:
        gate = ((t % pause_every_s) < pause_every_s * 0.65).astype(float)
        # soften gate edges (20 ms)
        k = int(0.02 * rate)
        gate = np.convolve(gate, np.ones(k) / k, mode="same")
        env = env * gate
    x = x * env
    # a little aspiration noise
    x += 0.05 * rng.standard_normal(n) * env
    voiced = env > 0.2
    rms = np.sqrt(np.mean(x[voiced] ** 2)) if voiced.any() else 1.0
    return (x / (rms + 1e-12) * 10 ** (level_dbfs / 20)).astype(np.float32)


def echo_path(
    far: np.ndarray,
    delay_ms: float = 40.0,
    tail_ms: float = 300.0,
    gain_db: float = -6.0,
    rate: int = RATE,
    seed: int = 1,
    tanh_drive: float = 0.0,
    drr_db: float = 10.0,
) -> np.ndarray:
    """The far end as the mic hears it: optional tanh loudspeaker distortion, a bulk delay, a direct
    path and an exponentially decaying random room tail (`tail_ms` to −60 dB) `drr_db` below it,
    normalised to `gain_db` overall."""
    rng = np.random.default_rng(seed)
    x = np.asarray(far, dtype=np.float64)
    if tanh_drive > 0:
        x = np.tanh(tanh_drive * x) / np.tanh(tanh_drive)
    d = int(round(delay_ms * rate / 1000))
    L = int(round(tail_ms * rate / 1000))
    h = rng.standard_normal(L) * np.exp(-np.arange(L) / (L / 6.9))  # −60 dB at the end of the tail
    h[0] = 0.0
    h *= 10 ** (-drr_db / 20) / np.sqrt(np.sum(h**2))
    h[0] = 1.0  # the direct path
    h = h / np.sqrt(np.sum(h**2)) * 10 ** (gain_db / 20)
    y = np.convolve(x, h)[: len(x)]
    out = np.zeros(len(x))
    out[d:] = y[: len(x) - d]
    return out.astype(np.float32)
