"""Re-framing: arbitrary chunks in, exactly `frame_size` samples out (AUDIO.md §5).

The engine appends 24 kHz samples as they arrive and takes one 1920-sample model frame at a time,
so the output does not depend on how the device chunked the audio.
"""

from __future__ import annotations

import numpy as np


class Reframer:
    """A small FIFO that hands out fixed-size frames. `samples_out` counts every sample that left
    the FIFO as part of a frame (or was dropped), so frame `k` starts at sample `k * frame_size`
    of the stream when nothing was dropped."""

    def __init__(self, frame_size: int, capacity_frames: int = 16):
        self.frame_size = int(frame_size)
        self._buf = np.zeros(self.frame_size * max(2, capacity_frames), dtype=np.float32)
        self._len = 0
        self.samples_in = 0
        self.samples_out = 0

    def __len__(self) -> int:
        return self._len

    @property
    def frames_ready(self) -> int:
        return self._len // self.frame_size

    def push(self, data: np.ndarray) -> None:
        n = len(data)
        if n == 0:
            return
        need = self._len + n
        if need > len(self._buf):
            bigger = np.zeros(max(need, 2 * len(self._buf)), dtype=np.float32)
            bigger[: self._len] = self._buf[: self._len]
            self._buf = bigger
        self._buf[self._len : need] = data
        self._len = need
        self.samples_in += n

    def pop(self) -> np.ndarray | None:
        """The oldest complete frame (a new array), or None."""
        fs = self.frame_size
        if self._len < fs:
            return None
        frame = self._buf[:fs].copy()
        self._consume(fs)
        return frame

    def drop_frames(self, count: int) -> int:
        """Discards up to `count` complete frames from the front; returns how many."""
        k = min(int(count), self.frames_ready)
        if k > 0:
            self._consume(k * self.frame_size)
        return k

    def clear(self) -> None:
        self.samples_out += self._len
        self._len = 0

    def _consume(self, n: int) -> None:
        rest = self._len - n
        if rest > 0:
            self._buf[:rest] = self._buf[n : self._len]
        self._len = rest
        self.samples_out += n
