"""The callback side of the audio layer: rings, stamps and counters (AUDIO.md §3, §5, §6, §13).

`RingIO.on_input` / `RingIO.on_output` are what a backend calls from its device callbacks. They copy
into or out of lock-free SPSC rings, stamp ring positions with device times, apply the output
fades, and count — nothing else: no locks, no logging, no allocation beyond numpy views.

Rings (device rate, 2 s by default):
* `in_ring`  — mic samples, produced by `on_input`, consumed by the engine thread;
* `out_ring` — agent samples, produced by the engine thread, consumed by `on_output`;
* `played`   — exactly what `on_output` handed to the device, starvation zeros and fades included,
  produced by `on_output`, consumed by the engine as the echo canceller's reference.

The output side has two non-sample controls, both lock-free:
* `request_flush()` (any thread; a counter bump): the next output callback fades out over
  `fade_samples` and drops everything queued — an interrupt takes effect within one device block;
* idle vs starved: before the first frame and after a flush, an empty ring is *idle* (zeros, not
  counted); once new audio was queued, running dry is *starvation* (zeros with fades, counted).
"""

from __future__ import annotations

import threading

import numpy as np

from .ring import SpscRing

# PortAudio's callback flag bits (paInputUnderflow ... paPrimingOutput), same order as sounddevice.
FLAG_NAMES = ("input_underflow", "input_overflow", "output_underflow", "output_overflow", "priming_output")


class RingIO:
    def __init__(self, capacity: int = 96000, fade_samples: int = 72, lockstep: bool = False):
        self.in_ring = SpscRing(capacity)
        self.out_ring = SpscRing(capacity)
        self.played = SpscRing(capacity)
        self.lockstep = lockstep
        self.set_fade(fade_samples)
        # -- written by the input callback only
        self.in_callbacks = 0
        self.in_samples = 0
        self.in_ring_full_drops = 0  # samples (should never happen)
        self.in_stamp: tuple[int, float] = (0, 0.0)  # (in_ring index of the block's first sample, ADC time)
        # -- written by the output callback only
        self.out_callbacks = 0
        self.out_samples = 0
        self.out_starved_callbacks = 0
        self.out_starved_samples = 0
        self.starve_events = 0  # transitions into starvation
        self.out_idle_samples = 0  # zeros played while idle (start-up, after a flush)
        self.flushed_samples = 0
        self.played_full_drops = 0
        # after each output callback: (out_ring read index after it, played index of its first
        # sample, DAC time of its first sample, block length). The next sample taken from out_ring
        # reaches the DAC at dac + (block + (index - read_after)) / rate.
        self.out_stamp: tuple[int, int, float, int] = (0, 0, 0.0, 0)
        self._idle_mark = 0  # out_ring.write_count when the ring last went idle
        self._starved = False
        self._need_fade_in = True
        self._flush_seen = 0
        # -- flags: one slot per PortAudio flag, incremented by whichever callback saw it
        self.flag_counts = [0, 0, 0, 0, 0]
        # -- written by control threads (under _ctl_lock), read by the output callback
        self._flush_req = 0
        self._ctl_lock = threading.Lock()
        # lockstep (file backend "as fast as possible"): set by the engine after each output write
        self.output_event = threading.Event()

    def set_fade(self, samples: int) -> None:
        """Fade length for starvation edges and flushes (2-5 ms at the output rate). One tuple
        store, so a callback never sees a half-updated fade."""
        n = max(1, int(samples))
        fin = np.linspace(0.0, 1.0, n + 2, dtype=np.float32)[1:-1]
        self._fades = (n, fin, fin[::-1].copy())

    @property
    def fade_samples(self) -> int:
        return self._fades[0]

    # ------------------------------------------------------------------ callbacks (device threads)
    def on_input(self, data: np.ndarray, adc_time: float, flags: int = 0) -> None:
        self.in_callbacks += 1
        if flags:
            self._count_flags(flags)
        ring = self.in_ring
        self.in_stamp = (ring.write_count, adc_time)
        n = ring.write(data)
        self.in_samples += len(data)
        if n < len(data):
            self.in_ring_full_drops += len(data) - n

    def on_output(self, out: np.ndarray, dac_time: float, flags: int = 0) -> int:
        """Fills `out` (1-D float32, device rate). Returns the number of queued samples used."""
        self.out_callbacks += 1
        if flags:
            self._count_flags(flags)
        ring = self.out_ring
        n = len(out)
        p0 = self.played.write_count
        if self.lockstep:
            k = ring.read_into(out, n)
            self.out_samples += k
            if k:
                self._to_played(out[:k])
            self.out_stamp = (ring.read_count, p0, dac_time, k)
            return k
        nf, fade_in, fade_out = self._fades
        if self._flush_req != self._flush_seen:
            self._flush_seen = self._flush_req
            k = ring.read_into(out, min(n, nf))
            if k:
                out[:k] *= fade_out[nf - k :]
            out[k:] = 0.0
            self.flushed_samples += ring.skip(ring.available())
            self._idle_mark = ring.write_count
            self._starved = False
            self._need_fade_in = True
            self.out_samples += n
            self._to_played(out)
            self.out_stamp = (ring.read_count, p0, dac_time, n)
            return k
        avail = ring.available()
        if avail >= n:
            ring.read_into(out, n)
            k = n
        else:
            k = ring.read_into(out, avail) if avail > 0 else 0
            out[k:] = 0.0
            if ring.write_count == self._idle_mark:
                self.out_idle_samples += n - k
            else:
                # ran dry while playing: fade out what we have, count it
                if k:
                    f = min(k, nf)
                    out[k - f : k] *= fade_out[nf - f :]
                if not self._starved:
                    self.starve_events += 1
                    self._starved = True
                self.out_starved_callbacks += 1
                self.out_starved_samples += n - k
        if k and self._need_fade_in:
            f = min(k, nf)
            out[:f] *= fade_in[:f]
            self._need_fade_in = False
        if k == n:
            self._starved = False
        elif k < n:
            self._need_fade_in = True
        self.out_samples += n
        self._to_played(out)
        self.out_stamp = (ring.read_count, p0, dac_time, n)
        return k

    def _to_played(self, data: np.ndarray) -> None:
        m = self.played.write(data)
        if m < len(data):
            self.played_full_drops += len(data) - m

    def _count_flags(self, flags: int) -> None:
        fc = self.flag_counts
        if flags & 1:
            fc[0] += 1
        if flags & 2:
            fc[1] += 1
        if flags & 4:
            fc[2] += 1
        if flags & 8:
            fc[3] += 1
        if flags & 16:
            fc[4] += 1

    # ------------------------------------------------------------------ controls (any thread)
    def request_flush(self) -> None:
        """Drop all queued output at the next output callback (with a short fade-out)."""
        with self._ctl_lock:
            self._flush_req += 1

    @property
    def flush_pending(self) -> bool:
        return self._flush_req != self._flush_seen

    def flags_dict(self) -> dict[str, int]:
        return dict(zip(FLAG_NAMES, self.flag_counts))
