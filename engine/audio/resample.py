"""Streaming sample-rate conversion with libsamplerate (AUDIO.md §4.3).

Used only when a device refuses 24 kHz. `sinc_medium` in both directions: ~2 ms added latency and
sample-smooth output (soxr's internal buffering made the live output queue bursty, so it is only for
offline use). `set_drift_ppm` nudges the ratio slightly for clock-drift correction (§6.3).
"""

from __future__ import annotations

import numpy as np

DEFAULT_CONVERTER = "sinc_medium"


class StreamResampler:
    """Converts a continuous mono float32 stream from `in_rate` to `out_rate` chunk by chunk.

    Streaming output equals the one-shot conversion of the concatenated input (up to float
    rounding), whatever the chunking."""

    def __init__(self, in_rate: int, out_rate: int, converter: str = DEFAULT_CONVERTER):
        import samplerate  # imported lazily: only needed when a device refuses 24 kHz

        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.converter = converter
        self.nominal_ratio = self.out_rate / self.in_rate
        self._drift_ppm = 0.0
        self._rs = samplerate.Resampler(converter, channels=1)
        self.samples_in = 0
        self.samples_out = 0

    @property
    def ratio(self) -> float:
        return self.nominal_ratio * (1.0 + self._drift_ppm * 1e-6)

    @property
    def drift_ppm(self) -> float:
        return self._drift_ppm

    def set_drift_ppm(self, ppm: float) -> None:
        """Positive ppm produces slightly more output samples per input sample."""
        self._drift_ppm = float(ppm)

    def process(self, data: np.ndarray, end_of_input: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(data, dtype=np.float32)
        self.samples_in += len(x)
        if len(x) == 0 and not end_of_input:
            return np.zeros(0, dtype=np.float32)
        y = self._rs.process(x, self.ratio, end_of_input)
        y = np.asarray(y, dtype=np.float32).reshape(-1)
        self.samples_out += len(y)
        return y

    def reset(self) -> None:
        self._rs.reset()
        self.samples_in = 0
        self.samples_out = 0


class PassThrough:
    """Same interface when no conversion is needed (the device runs at 24 kHz)."""

    def __init__(self, rate: int):
        self.in_rate = self.out_rate = int(rate)
        self.nominal_ratio = 1.0
        self.samples_in = 0
        self.samples_out = 0

    ratio = 1.0
    drift_ppm = 0.0

    def set_drift_ppm(self, ppm: float) -> None:  # no resampler to nudge: drift is padded/trimmed
        pass

    def process(self, data: np.ndarray, end_of_input: bool = False) -> np.ndarray:
        x = np.asarray(data, dtype=np.float32)
        self.samples_in += len(x)
        self.samples_out += len(x)
        return x

    def reset(self) -> None:
        self.samples_in = self.samples_out = 0


def make_resampler(in_rate: int, out_rate: int, converter: str = DEFAULT_CONVERTER):
    """A StreamResampler, or a PassThrough when the rates match."""
    if int(in_rate) == int(out_rate):
        return PassThrough(in_rate)
    return StreamResampler(in_rate, out_rate, converter)
