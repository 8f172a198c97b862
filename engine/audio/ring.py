"""Lock-free single-producer / single-consumer sample rings (AUDIO.md §5).

A preallocated float32 array plus two monotonically increasing integer counters. The producer owns
`write_count`, the consumer owns `read_count`, and each counter is published (one attribute store,
atomic under the GIL) only after its copy. A device callback does one read or one write: at most two
slice copies. No locks, no allocation on the callback path (`read_into` / `write`).
"""

from __future__ import annotations

import numpy as np


class SpscRing:
    """One direction of audio between exactly one producer thread and one consumer thread."""

    __slots__ = ("capacity", "_buf", "write_count", "read_count")

    def __init__(self, capacity: int, dtype=np.float32):
        if capacity <= 0:
            raise ValueError("ring capacity must be positive")
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, dtype=dtype)
        self.write_count = 0  # total samples ever written (producer-owned)
        self.read_count = 0  # total samples ever read or skipped (consumer-owned)

    # -- either side -------------------------------------------------------------------------------
    def available(self) -> int:
        """Samples written and not yet consumed."""
        return self.write_count - self.read_count

    def space(self) -> int:
        """Samples the producer may still write without overwriting unread data."""
        return self.capacity - (self.write_count - self.read_count)

    # -- producer ----------------------------------------------------------------------------------
    def write(self, data: np.ndarray) -> int:
        """Copies as much of `data` as fits; returns how many samples were written (the rest is
        dropped: the caller counts it). Never blocks."""
        w = self.write_count
        n = min(len(data), self.capacity - (w - self.read_count))
        if n <= 0:
            return 0
        cap = self.capacity
        start = w % cap
        first = min(n, cap - start)
        self._buf[start : start + first] = data[:first]
        if n > first:
            self._buf[: n - first] = data[first:n]
        self.write_count = w + n  # publish after the copy
        return n

    def write_zeros(self, n: int) -> int:
        w = self.write_count
        n = min(int(n), self.capacity - (w - self.read_count))
        if n <= 0:
            return 0
        cap = self.capacity
        start = w % cap
        first = min(n, cap - start)
        self._buf[start : start + first] = 0
        if n > first:
            self._buf[: n - first] = 0
        self.write_count = w + n
        return n

    # -- consumer ----------------------------------------------------------------------------------
    def peek_into(self, out: np.ndarray, n: int | None = None) -> int:
        """Copies up to `n` (default len(out)) unread samples into `out` without consuming them."""
        r = self.read_count
        avail = self.write_count - r
        n = len(out) if n is None else min(int(n), len(out))
        n = min(n, avail)
        if n <= 0:
            return 0
        cap = self.capacity
        start = r % cap
        first = min(n, cap - start)
        out[:first] = self._buf[start : start + first]
        if n > first:
            out[first:n] = self._buf[: n - first]
        return n

    def read_into(self, out: np.ndarray, n: int | None = None) -> int:
        """Moves up to `n` (default len(out)) samples into `out`; returns how many."""
        k = self.peek_into(out, n)
        if k:
            self.read_count += k
        return k

    def read(self, n: int | None = None) -> np.ndarray:
        """Allocating read of up to `n` samples (all available by default); engine side only."""
        avail = self.available()
        n = avail if n is None else min(int(n), avail)
        out = np.empty(max(n, 0), dtype=self._buf.dtype)
        self.read_into(out, n)
        return out

    def skip(self, n: int) -> int:
        """Discards up to `n` unread samples; returns how many."""
        n = min(int(n), self.available())
        if n > 0:
            self.read_count += n
            return n
        return 0

    def skip_to(self, count: int) -> int:
        """Advances the read counter to `count` (clamped to what was written); returns samples skipped."""
        target = min(int(count), self.write_count)
        n = target - self.read_count
        if n > 0:
            self.read_count = target
            return n
        return 0
