"""Level meters with ballistics (AUDIO.md §10).

Conventions (label them in the UI):
* RMS dBFS = 10·log10(mean(x²)) of float samples: a full-scale sine reads −3.01 dBFS, a full-scale
  square 0 dBFS (no AES17 +3 dB).
* Sample peak dBFS = 20·log10(max|x|).

Ballistics, evaluated per 10 ms sub-block:
* VU-like RMS: one-pole on the mean square, τ = 65 ms (99 % in 300 ms);
* digital sample peak: instant attack, 11.8 dB/s release (20 dB in 1.7 s);
* peak hold: 1.5 s, then falls at the release rate; sticky clip indicator at ≥ −0.1 dBFS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FLOOR_DB = -120.0


def rms_dbfs(x: np.ndarray) -> float:
    """Plain RMS level of a block in dBFS (floor −120)."""
    if len(x) == 0:
        return FLOOR_DB
    x = np.asarray(x, dtype=np.float32)
    ms = float(np.dot(x, x)) / len(x)
    return 10.0 * math.log10(ms) if ms > 1e-12 else FLOOR_DB


def peak_dbfs(x: np.ndarray) -> float:
    if len(x) == 0:
        return FLOOR_DB
    p = float(np.max(np.abs(x)))
    return 20.0 * math.log10(p) if p > 1e-6 else FLOOR_DB


def db_to_ms(db: float) -> float:
    return 10.0 ** (db / 10.0)


@dataclass(frozen=True)
class LevelReading:
    """One meter's published values (all dBFS, floor −120)."""

    rms_dbfs: float = FLOOR_DB  # VU-like ballistic RMS
    peak_dbfs: float = FLOOR_DB  # sample peak with instant attack and 11.8 dB/s release
    hold_dbfs: float = FLOOR_DB  # peak hold (1.5 s, then release)
    block_rms_dbfs: float = FLOOR_DB  # raw RMS of the last 10 ms sub-block (no ballistics)
    clip_count: int = 0  # sub-blocks whose peak reached −0.1 dBFS
    clipped: bool = False  # sticky until reset


SILENT = LevelReading()


class LevelMeter:
    """Feed any number of samples; the meter runs its ballistics per 10 ms sub-block and carries
    partial sub-blocks over to the next call."""

    def __init__(
        self,
        sample_rate: int = 24000,
        sub_block_ms: float = 10.0,
        tau_ms: float = 65.0,
        release_db_per_s: float = 11.8,
        hold_s: float = 1.5,
        clip_dbfs: float = -0.1,
    ):
        self.sample_rate = int(sample_rate)
        self.sub = max(1, int(round(sample_rate * sub_block_ms / 1000.0)))
        dt = self.sub / self.sample_rate
        self._a = 1.0 - math.exp(-dt / (tau_ms / 1000.0))
        self._release = release_db_per_s * dt
        self._hold_blocks = int(round(hold_s / dt))
        self._clip_db = clip_dbfs
        self._pending = np.zeros(self.sub, dtype=np.float32)
        self._npending = 0
        self.reset()

    def reset(self) -> None:
        self._ms = 0.0
        self._peak = FLOOR_DB
        self._hold = FLOOR_DB
        self._hold_left = 0
        self._last_rms = FLOOR_DB
        self.clip_count = 0
        self.clipped = False
        self.blocks = 0

    def reset_peaks(self) -> None:
        """Clears the hold value and the sticky clip indicator (the UI's `r`)."""
        self._hold = self._peak
        self._hold_left = 0
        self.clip_count = 0
        self.clipped = False

    def process(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        i = 0
        n = len(x)
        sub = self.sub
        if self._npending:
            take = min(sub - self._npending, n)
            self._pending[self._npending : self._npending + take] = x[:take]
            self._npending += take
            i = take
            if self._npending == sub:
                self._block(self._pending)
                self._npending = 0
        while n - i >= sub:
            self._block(x[i : i + sub])
            i += sub
        if i < n:
            rest = n - i
            self._pending[:rest] = x[i:]
            self._npending = rest

    def _block(self, b: np.ndarray) -> None:
        m = float(np.dot(b, b)) / len(b)
        p = float(np.max(np.abs(b)))
        self._ms += self._a * (m - self._ms)
        self._last_rms = 10.0 * math.log10(m) if m > 1e-12 else FLOOR_DB
        p_db = 20.0 * math.log10(p) if p > 1e-6 else FLOOR_DB
        # peak: instant attack, constant-rate release
        self._peak = p_db if p_db >= self._peak else max(p_db, self._peak - self._release)
        # hold: keep the highest recent peak for hold_s, then fall at the release rate
        if p_db >= self._hold:
            self._hold = p_db
            self._hold_left = self._hold_blocks
        elif self._hold_left > 0:
            self._hold_left -= 1
        else:
            self._hold = max(self._peak, self._hold - self._release)
        if p_db >= self._clip_db:
            self.clip_count += 1
            self.clipped = True
        self.blocks += 1

    @property
    def rms_dbfs(self) -> float:
        return 10.0 * math.log10(self._ms) if self._ms > 1e-12 else FLOOR_DB

    @property
    def peak_dbfs(self) -> float:
        return self._peak

    @property
    def hold_dbfs(self) -> float:
        return self._hold

    def reading(self) -> LevelReading:
        return LevelReading(
            rms_dbfs=round(self.rms_dbfs, 2),
            peak_dbfs=round(self._peak, 2),
            hold_dbfs=round(self._hold, 2),
            block_rms_dbfs=round(self._last_rms, 2),
            clip_count=self.clip_count,
            clipped=self.clipped,
        )
