"""`SimulatedBackend`: the two device callbacks driven by a simulated clock (AUDIO.md §3).

No threads and no audio server: a test calls `advance(seconds)` and the backend fires input and
output callbacks at their simulated times (10 ms blocks by default), plus an engine tick every
`tick_ms` through `tick_hook` (the session installs it in simulated mode). Everything is therefore
deterministic. It can inject:

* stalls: callbacks missing for a while, then delivered late in a burst (`deliver_late=True`, what
  PortAudio does after a scheduling hiccup) or lost;
* PortAudio status flags (xruns) on chosen callbacks;
* clock drift between the input and output devices (ppm);
* device loss (callbacks stop; the simulated watchdog fires after `watchdog_s`), optionally
  followed by a recovery (reopen, `generation` bumps);
* an acoustic echo path: what played comes back into the mic after `echo_delay_ms` at
  `echo_gain_db`, so echo cancellation can be tested end to end.

With `autorun=True`, `start()` runs the clock on a thread at wall-clock pace (times `speed`), for
tests of the threaded session against a "device" without PortAudio.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .base import AudioBackend, BackendState, InputCallback, OutputCallback


@dataclass
class _Stall:
    start: float
    end: float
    direction: str  # "input", "output" or "both"
    deliver_late: bool


class SimulatedBackend(AudioBackend):
    name = "simulated"

    def __init__(
        self,
        input_signal: np.ndarray | Callable[[int, int], np.ndarray] | None = None,
        input_rate: int = 24000,
        output_rate: int = 24000,
        block_ms: float = 10.0,
        input_drift_ppm: float = 0.0,
        output_drift_ppm: float = 0.0,
        input_latency_s: float = 0.01,
        output_latency_s: float = 0.02,
        tick_ms: float = 5.0,
        watchdog_s: float = 0.5,
        echo_gain_db: float | None = None,
        echo_delay_ms: float = 30.0,
        loop_input: bool = False,
        detects_silent_mic: bool = True,
        autorun: bool = False,
        speed: float = 1.0,
        record_played: bool = True,
    ):
        super().__init__()
        self._signal = input_signal
        self.input_rate = int(input_rate)
        self.output_rate = int(output_rate)
        self.in_block = max(1, int(round(self.input_rate * block_ms / 1000.0)))
        self.out_block = max(1, int(round(self.output_rate * block_ms / 1000.0)))
        self.blocksize = self.in_block
        self.in_period = self.in_block / self.input_rate * (1.0 - input_drift_ppm * 1e-6)
        self.out_period = self.out_block / self.output_rate * (1.0 - output_drift_ppm * 1e-6)
        self.input_latency_s = input_latency_s
        self.output_latency_s = output_latency_s
        self.tick_s = tick_ms / 1000.0
        self.watchdog_s = watchdog_s
        self.echo_gain = None if echo_gain_db is None else 10 ** (echo_gain_db / 20.0)
        self.echo_delay_s = echo_delay_ms / 1000.0
        self.loop_input = loop_input
        self.detects_silent_mic = detects_silent_mic
        self.autorun = autorun
        self.speed = speed
        self.record_played = record_played
        self.input_device_name = "simulated mic"
        self.output_device_name = "simulated speaker"
        self.tick_hook: Callable[[], None] | None = None
        self.now = 0.0
        self._stalls: list[_Stall] = []
        self._flag_plan: list[tuple[float, int, str]] = []  # (time, flags, direction)
        self._loss_at: float | None = None
        self._recover_after: float | None = None
        self._lost = False
        self._last_cb = 0.0
        self._in_index = 0  # input samples delivered (device clock)
        self._out_index = 0
        self._queue: list[tuple[float, int, str, int]] = []  # (time, seq, kind, late)
        self._seq = 0
        self._in_k = 0
        self._out_k = 0
        self._base_in: float | None = None
        self._base_out: float | None = None
        # room timeline for the echo path, at the input rate, indexed by absolute sample time
        self._room_len = self.input_rate * 8
        self._room = np.zeros(self._room_len, dtype=np.float32)
        self._played: list[np.ndarray] = []
        self._played_t: list[float] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.callbacks_in = 0
        self.callbacks_out = 0
        self.late_callbacks = 0
        self.lost_callbacks = 0

    # ------------------------------------------------------------------ injection API
    def inject_stall(self, at_s: float, duration_s: float, direction: str = "both", deliver_late: bool = True) -> None:
        """No callbacks in [at_s, at_s + duration_s). Late delivery fires them in a burst at the end."""
        self._stalls.append(_Stall(at_s, at_s + duration_s, direction, deliver_late))

    def inject_flags(self, at_s: float, flags: int, direction: str = "output") -> None:
        """The first `direction` callback at or after `at_s` reports PortAudio `flags`."""
        self._flag_plan.append((at_s, flags, direction))

    def inject_device_loss(self, at_s: float, recover_after_s: float | None = None) -> None:
        """Callbacks stop at `at_s`; with `recover_after_s` the device comes back that much later."""
        self._loss_at = at_s
        self._recover_after = recover_after_s

    # ------------------------------------------------------------------ lifecycle
    def start(self, on_input: InputCallback, on_output: OutputCallback, wake: Callable[[], None] | None = None) -> None:
        self._on_input, self._on_output, self._wake = on_input, on_output, wake
        self._lost = False
        self.generation += 1
        self._last_cb = self.now
        self._queue.clear()
        self._base_in = self._base_out = None
        self._in_k = self._out_k = 0
        self._schedule("in", self.now + self.in_period)
        self._schedule("out", self.now + self.out_period)
        self._schedule("tick", self.now + self.tick_s)
        self._set_state(BackendState.RUNNING, "")
        if self.autorun and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._autorun, name="parley-sim-clock", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None
        self._queue.clear()
        self._set_state(BackendState.CLOSED, "")

    def clock(self) -> float:
        return self.now

    def _autorun(self) -> None:
        t0 = time.monotonic()
        sim0 = self.now
        while not self._stop.is_set():
            target = sim0 + (time.monotonic() - t0) * self.speed
            if target > self.now:
                self.advance(target - self.now)
            time.sleep(0.002)

    # ------------------------------------------------------------------ simulation
    def _schedule(self, kind: str, t: float) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, kind, 0))

    def advance(self, seconds: float) -> None:
        """Runs the simulated clock forward, firing callbacks and engine ticks in time order."""
        with self._lock:
            end = self.now + seconds
            while self._queue and self._queue[0][0] <= end + 1e-12:
                t, _, kind, late = heapq.heappop(self._queue)
                self.now = max(self.now, t)
                if kind == "tick":
                    self._watchdog()
                    self._schedule("tick", t + self.tick_s)
                    if self.tick_hook is not None:
                        self.tick_hook()
                elif kind == "recover":
                    self._recover()
                else:
                    self._fire(kind, t, bool(late))
            self.now = max(self.now, end)

    def run_until(self, predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> bool:
        end = self.now + timeout_s
        while self.now < end:
            if predicate():
                return True
            self.advance(step_s)
        return predicate()

    def _fire(self, kind: str, t: float, late: bool) -> None:
        if self._lost or self.state is not BackendState.RUNNING:
            return  # this stream is gone (a reopen starts new callback chains)
        if not late:
            # the next callback of this stream, on its own (possibly drifting) clock
            self._schedule_next(kind, t)
            if self._loss_at is not None and t >= self._loss_at:
                self._lost = True
                self._queue = [e for e in self._queue if e[2] not in ("in", "out")]
                heapq.heapify(self._queue)
                if self._recover_after is not None:
                    self._schedule("recover", self._loss_at + self._recover_after)
                return
            stall = self._stall_at(t, "input" if kind == "in" else "output")
            if stall is not None:
                if stall.deliver_late:
                    self.late_callbacks += 1
                    self._seq += 1
                    heapq.heappush(self._queue, (stall.end, self._seq, kind, 1))
                else:
                    self.lost_callbacks += 1
                    if kind == "in":
                        self._in_index += self.in_block  # those samples were never captured
                return
        flags = self._take_flags(t, "input" if kind == "in" else "output")
        self._last_cb = self.now
        if kind == "in":
            self._do_input(flags)
            self.callbacks_in += 1
            if self.tick_hook is not None:
                self.tick_hook()
        else:
            self._do_output(flags)
            self.callbacks_out += 1

    def _schedule_next(self, kind: str, t: float) -> None:
        period = self.in_period if kind == "in" else self.out_period
        attr = "_in_k" if kind == "in" else "_out_k"
        k = getattr(self, attr) + 1
        setattr(self, attr, k)
        base = getattr(self, "_base_" + kind, None)
        if base is None:
            base = t - period
            setattr(self, "_base_" + kind, base)
        self._seq += 1
        heapq.heappush(self._queue, (base + (k + 1) * period, self._seq, kind, 0))

    def _stall_at(self, t: float, direction: str) -> _Stall | None:
        for s in self._stalls:
            if s.start <= t < s.end and (s.direction == "both" or s.direction == direction):
                return s
        return None

    def _take_flags(self, t: float, direction: str) -> int:
        flags = 0
        keep = []
        for at, f, d in self._flag_plan:
            if at <= t and d == direction:
                flags |= f
            else:
                keep.append((at, f, d))
        self._flag_plan = keep
        return flags

    def _signal_block(self, start: int, n: int) -> np.ndarray:
        sig = self._signal
        if sig is None:
            return np.zeros(n, dtype=np.float32)
        if callable(sig):
            return np.asarray(sig(start, n), dtype=np.float32)
        L = len(sig)
        if self.loop_input and L:
            idx = (np.arange(start, start + n) % L)
            return np.asarray(sig[idx], dtype=np.float32)
        out = np.zeros(n, dtype=np.float32)
        if start < L:
            m = min(n, L - start)
            out[:m] = sig[start : start + m]
        return out

    def _do_input(self, flags: int) -> None:
        n = self.in_block
        block = self._signal_block(self._in_index, n)
        adc_time = self.now - self.input_latency_s - n / self.input_rate
        if self.echo_gain is not None:
            # the room at the ADC times of this block, `echo_delay` earlier
            t0 = adc_time - self.echo_delay_s
            idx0 = int(round(t0 * self.input_rate))
            idx = np.arange(idx0, idx0 + n) % self._room_len
            block = block + self.echo_gain * self._room[idx]
            self._room[idx] = 0.0  # consumed (keeps the circular timeline clean)
        self._in_index += n
        if self._on_input is not None:
            self._on_input(block.astype(np.float32, copy=False), adc_time, flags)

    def _do_output(self, flags: int) -> None:
        n = self.out_block
        buf = np.zeros(n, dtype=np.float32)
        dac_time = self.now + self.output_latency_s
        if self._on_output is not None:
            self._on_output(buf, dac_time, flags)
        if self.echo_gain is not None:
            # place the played samples on the room timeline at their DAC times (nearest sample)
            ratio = self.input_rate / self.output_rate
            pos = int(round(dac_time * self.input_rate))
            m = int(round(n * ratio))
            src = buf if m == n else buf[np.minimum((np.arange(m) / ratio).astype(int), n - 1)]
            idx = np.arange(pos, pos + m) % self._room_len
            self._room[idx] += src
        if self.record_played:
            self._played.append(buf.copy())
            self._played_t.append(dac_time)
        self._out_index += n

    def _watchdog(self) -> None:
        if self.state is BackendState.RUNNING and self._lost and self.now - self._last_cb >= self.watchdog_s:
            self.watchdog_fires += 1
            self._set_state(BackendState.LOST, "audio device lost (no callbacks for 500 ms); reopening")

    def _recover(self) -> None:
        self._lost = False
        self._loss_at = None
        self.restarts += 1
        self.generation += 1
        self._last_cb = self.now
        # fresh streams: new callback grids from now
        for kind in ("in", "out"):
            setattr(self, "_base_" + kind, None)
            setattr(self, "_in_k" if kind == "in" else "_out_k", 0)
        self._queue = [e for e in self._queue if e[2] not in ("in", "out")]
        heapq.heapify(self._queue)
        self._schedule("in", self.now + self.in_period)
        self._schedule("out", self.now + self.out_period)
        self._set_state(BackendState.RUNNING, "audio device reopened")

    # ------------------------------------------------------------------ results for tests
    def played_audio(self) -> np.ndarray:
        """Everything the output callbacks produced, concatenated (output rate)."""
        if not self._played:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._played)

    def played_blocks(self) -> list[tuple[float, np.ndarray]]:
        """(DAC time of the first sample, block) for every output callback."""
        return list(zip(self._played_t, self._played))

    def stats(self) -> dict:
        d = super().stats()
        d.update(
            callbacks_in=self.callbacks_in,
            callbacks_out=self.callbacks_out,
            late_callbacks=self.late_callbacks,
            lost_callbacks=self.lost_callbacks,
        )
        return d
