"""Voice activity for the "you are speaking" light (AUDIO.md §11).

The default detector is the `speech_probability` that the WebRTC audio processor computes during the
AEC call (free). `EnergyVad` is the numpy fallback: speech-band energy (150 Hz - 4 kHz, so rumble and fan noise
count little), an adaptive noise floor, a +9 dB margin and a 240 ms hangover, decided per 10 ms
sub-block. Run either on the AEC-cleaned mic, or the model's own
voice lights it up. `VadSmoother` is the UI smoothing: on after 2 speech frames, off after 4.
"""

from __future__ import annotations

import math

import numpy as np


class EnergyVad:
    """Energy detector with an adaptive noise floor. `process(frame)` returns the fraction of
    10 ms sub-blocks judged speech (a pseudo-probability in [0, 1])."""

    def __init__(
        self,
        sample_rate: int = 24000,
        sub_block_ms: float = 10.0,
        margin_db: float = 9.0,
        hangover_ms: float = 240.0,
        floor_rise_db_per_s: float = 1.0,
        floor_fall: float = 0.2,
        min_floor_dbfs: float = -85.0,
        min_speech_dbfs: float = -60.0,
        band_hz: tuple[float, float] = (150.0, 4000.0),
    ):
        self.sub = max(1, int(round(sample_rate * sub_block_ms / 1000.0)))
        freqs = np.fft.rfftfreq(self.sub, 1.0 / sample_rate)
        self._band = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
        self._win = np.hanning(self.sub).astype(np.float32)
        # scale so that a full-band white signal reads about its plain mean square
        self._scale = 2.0 / (np.sum(self._win**2) * 1.0)
        dt = self.sub / sample_rate
        self.margin_db = margin_db
        self._hang_blocks = int(round(hangover_ms / 1000.0 / dt))
        self._rise = floor_rise_db_per_s * dt
        self._fall = floor_fall
        self._min_floor = min_floor_dbfs
        self._min_speech = min_speech_dbfs
        self.reset()

    def reset(self) -> None:
        self.floor_dbfs: float | None = None
        self._hang = 0
        self.speech_probability = 0.0

    def process(self, frame: np.ndarray) -> float:
        x = np.asarray(frame, dtype=np.float32)
        nb = len(x) // self.sub
        if nb == 0:
            return self.speech_probability
        blocks = x[: nb * self.sub].reshape(nb, self.sub)
        spec = np.fft.rfft(blocks * self._win, axis=1)
        ms = (np.abs(spec[:, self._band]) ** 2).sum(axis=1) * self._scale / self.sub
        speech = 0
        for m in ms:
            e = 10.0 * math.log10(float(m)) if m > 1e-12 else -120.0
            if self.floor_dbfs is None:
                self.floor_dbfs = max(e, self._min_floor)
            is_speech = e > self.floor_dbfs + self.margin_db and e > self._min_speech
            if e < self.floor_dbfs:
                self.floor_dbfs += self._fall * (e - self.floor_dbfs)
            else:
                self.floor_dbfs += self._rise
            self.floor_dbfs = max(self.floor_dbfs, self._min_floor)
            if is_speech:
                self._hang = self._hang_blocks
                speech += 1
            elif self._hang > 0:
                self._hang -= 1
                speech += 1
        self.speech_probability = speech / nb
        return self.speech_probability


class VadSmoother:
    """Debounces per-frame decisions: on after `on_frames` consecutive speech frames, off after
    `off_frames` consecutive non-speech frames."""

    def __init__(self, on_frames: int = 2, off_frames: int = 4, threshold: float = 0.5):
        self.on_frames = on_frames
        self.off_frames = off_frames
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.active = False
        self._run = 0

    def update(self, probability: float) -> bool:
        speech = probability >= self.threshold
        if speech != self.active:
            self._run += 1
            if self._run >= (self.on_frames if speech else self.off_frames):
                self.active = speech
                self._run = 0
        else:
            self._run = 0
        return self.active
