"""ITU-R BS.1770-4 integrated loudness and loudness normalisation, computed exactly as `pyloudnorm`.

The reference normalises WAV voice prompts to -24 LUFS with `pyloudnorm` (MODEL.md §7.3); this module
reproduces that computation operation for operation (no scipy needed) so a voice WAV yields the same
samples:

* K-weighting: two biquads designed with the RBJ cookbook formulas pyloudnorm uses (a high shelf of
  +4 dB at 1500 Hz with Q 1/sqrt(2), then a high pass at 38 Hz with Q 0.5) for the actual sample
  rate, applied in float64 in transposed direct form II (what `scipy.signal.lfilter` computes), the
  result of each stage stored back in the input's dtype (pyloudnorm writes into a copy of the
  input array, so float32 input is rounded to float32 after each stage);
* gating blocks of 400 ms with 75 % overlap, block count `round((T - 0.4) / 0.1) + 1` and bounds
  `int(0.4 * (j * 0.25) * rate)`..`int(0.4 * (j * 0.25 + 1) * rate)`, block power
  `(1 / (0.4 * rate)) * sum(y**2)` summed in the input's dtype;
* absolute gate -70 LUFS (`>=`), relative gate 10 LU below the absolutely-gated mean (`>` both);
* channel gains 1, 1, 1, 1.41, 1.41 for up to five channels given as [samples, channels].

Edge cases, which pyloudnorm does not handle: a signal shorter than one 400 ms block has no
loudness (`integrated_loudness` returns -inf instead of raising), and silence or a signal whose
blocks are all below -70 LUFS is -inf as well. `normalize_loudness` returns such input unchanged
(pyloudnorm would raise, or multiply by an infinite gain).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

BLOCK_SECONDS = 0.400
OVERLAP = 0.75
ABSOLUTE_GATE = -70.0
RELATIVE_GATE = -10.0
CHANNEL_GAINS = (1.0, 1.0, 1.0, 1.41, 1.41)


def _rbj_high_shelf(gain_db: float, q: float, fc: float, rate: float):
    a_lin = 10 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * (fc / rate)
    alpha = np.sin(w0) / (2.0 * q)
    cos_w0 = np.cos(w0)
    sq = 2 * np.sqrt(a_lin) * alpha
    b0 = a_lin * ((a_lin + 1) + (a_lin - 1) * cos_w0 + sq)
    b1 = -2 * a_lin * ((a_lin - 1) + (a_lin + 1) * cos_w0)
    b2 = a_lin * ((a_lin + 1) + (a_lin - 1) * cos_w0 - sq)
    a0 = (a_lin + 1) - (a_lin - 1) * cos_w0 + sq
    a1 = 2 * ((a_lin - 1) - (a_lin + 1) * cos_w0)
    a2 = (a_lin + 1) - (a_lin - 1) * cos_w0 - sq
    return np.array([b0, b1, b2]) / a0, np.array([a0, a1, a2]) / a0


def _rbj_high_pass(q: float, fc: float, rate: float):
    w0 = 2.0 * np.pi * (fc / rate)
    alpha = np.sin(w0) / (2.0 * q)
    cos_w0 = np.cos(w0)
    b0 = (1 + cos_w0) / 2
    b1 = -(1 + cos_w0)
    b2 = (1 + cos_w0) / 2
    a0 = 1 + alpha
    a1 = -2 * cos_w0
    a2 = 1 - alpha
    return np.array([b0, b1, b2]) / a0, np.array([a0, a1, a2]) / a0


def k_weighting_coefficients(rate: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two K-weighting stages (b, a) for `rate`, as pyloudnorm designs them."""
    return [
        _rbj_high_shelf(4.0, 1 / np.sqrt(2), 1500.0, rate),
        _rbj_high_pass(0.5, 38.0, rate),
    ]


def _biquad(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """scipy.signal.lfilter(b, a, x) for one biquad, bit for bit (float64, transposed DF-II).

    A plain loop over Python floats: about 0.2 µs per sample, and exact, which a vectorised
    block-recursive formulation would not be.
    """
    a0 = float(a[0])
    b0, b1, b2 = (float(v) / a0 for v in b)
    a1, a2 = float(a[1]) / a0, float(a[2]) / a0
    z0 = z1 = 0.0
    out = [0.0] * x.shape[0]
    for n, xn in enumerate(x.tolist()):
        yn = z0 + b0 * xn
        z0 = z1 + xn * b1 - yn * a1
        z1 = xn * b2 - yn * a2
        out[n] = yn
    return np.array(out, dtype=np.float64)


def k_weight(x: np.ndarray, rate: float) -> np.ndarray:
    """Apply the K-weighting to one channel; each stage's output is stored in x's dtype."""
    y = np.array(x, copy=True)
    for b, a in k_weighting_coefficients(rate):
        y[:] = _biquad(b, a, y)
    return y


def _as_channels(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError("loudness needs floating point audio")
    if data.ndim == 1:
        return data.reshape(-1, 1)
    if data.ndim != 2 or data.shape[1] > len(CHANNEL_GAINS):
        raise ValueError("loudness needs audio shaped [samples] or [samples, channels<=5]")
    return data


def integrated_loudness(data: np.ndarray, rate: float, block_size: float = BLOCK_SECONDS) -> float:
    """Gated integrated loudness in LUFS of `data` ([samples] or [samples, channels], float).

    Equal to `pyloudnorm.Meter(rate).integrated_loudness(data)` for every input pyloudnorm
    accepts; -inf for silence, for all-gated signals and for input shorter than one block.
    """
    x = _as_channels(data)
    num_samples, num_channels = x.shape
    if num_samples < block_size * rate:
        return float("-inf")

    filtered = np.array(x, copy=True)
    for ch in range(num_channels):
        filtered[:, ch] = k_weight(x[:, ch], rate)

    step = 1.0 - OVERLAP
    duration = num_samples / rate
    num_blocks = int(np.round(((duration - block_size) / (block_size * step)))) + 1
    z = np.zeros((num_channels, num_blocks))
    norm = 1.0 / (block_size * rate)
    for i in range(num_channels):
        column = filtered[:, i]
        for j in range(num_blocks):
            lo = int(block_size * (j * step) * rate)
            hi = int(block_size * (j * step + 1) * rate)
            z[i, j] = norm * np.sum(np.square(column[lo:hi]))

    gains = CHANNEL_GAINS[:num_channels]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", category=RuntimeWarning)
        block_lufs = [
            -0.691 + 10.0 * np.log10(np.sum([gains[i] * z[i, j] for i in range(num_channels)]))
            for j in range(num_blocks)
        ]
        above_abs = [j for j, lj in enumerate(block_lufs) if lj >= ABSOLUTE_GATE]
        z_avg = [np.mean([z[i, j] for j in above_abs]) for i in range(num_channels)]
        gamma_r = (-0.691 + 10.0 * np.log10(np.sum([gains[i] * z_avg[i]
                                                    for i in range(num_channels)]))
                   + RELATIVE_GATE)
        gated = [j for j, lj in enumerate(block_lufs) if lj > gamma_r and lj > ABSOLUTE_GATE]
        z_avg = np.nan_to_num(np.array([np.mean([z[i, j] for j in gated])
                                        for i in range(num_channels)]))
        lufs = -0.691 + 10.0 * np.log10(np.sum([gains[i] * z_avg[i] for i in range(num_channels)]))
    return float(lufs)


def normalize_loudness(x: np.ndarray, sr: float, target: float = -24.0) -> np.ndarray:
    """Scale `x` to `target` LUFS, as `pyloudnorm.normalize.loudness(x, meter(x), target)`.

    The gain is a float64 scalar, so the result is float64 (what numpy 2 gives the reference);
    callers that need float32 round once at the end. Input without a measurable loudness (shorter
    than 400 ms, silent, or entirely below the -70 LUFS gate) is returned unchanged. Peaks above
    1.0 after the gain are kept (not clipped), as in the reference.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    lufs = integrated_loudness(x, sr)
    if not math.isfinite(lufs):
        return x
    gain = np.power(10.0, np.float64(target - lufs) / 20.0)
    return gain * x
