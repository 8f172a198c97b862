"""`FileBackend`: WAV in, WAV out, for headless runs and tests.

* `realtime=True`: a thread delivers the input in 10 ms blocks at wall-clock pace and pulls the
  output at the same pace, like a sound card whose mic plays the file and whose speaker is recorded.
  The output WAV is exactly what "played", from the start until the input (plus `tail_s` of
  silence, so the last model frames come out) has been consumed; it contains the session's real
  latency. Stamps are on a virtual clock (seconds since start).
* `realtime=False` ("as fast as possible"): lock-step. One 80 ms frame of input is delivered, then
  the backend waits until the session has produced that frame's output. Nothing is dropped, padded
  or trimmed, so the output is one model frame per input frame, trimmed to the input's length
  (the offline semantics of MODEL.md §8.3).

Input: any format soundfile reads; channels are averaged; other rates are converted to 24 kHz with
libsamplerate. Without `input_wav`, `duration_s` of silence (or `input_signal`) is used; `loop`
repeats the input until `duration_s`.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import AudioError
from .base import AudioBackend, BackendState, InputCallback, OutputCallback

RATE = 24000
FRAME = 1920


def read_wav_24k(path: str | Path) -> np.ndarray:
    """Reads an audio file as mono float32 at 24 kHz. Raises AudioError with a clear sentence
    (engine/audiofile.py's reader: missing, empty, unreadable, silent-free or non-finite files)."""
    from engine.audiofile import read_audio

    return read_audio(path, RATE, mono="mix")


def write_wav(path: str | Path, data: np.ndarray, rate: int = RATE) -> None:
    import soundfile as sf

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(p), np.clip(np.asarray(data, dtype=np.float32), -1.0, 1.0), rate, subtype="PCM_16")


class FileBackend(AudioBackend):
    name = "file"
    detects_silent_mic = False
    default_echo_mode = "headphones"  # a file has no acoustic echo; keeps the model input bit-exact

    def __init__(
        self,
        input_wav: str | Path | None = None,
        output_wav: str | Path | None = None,
        realtime: bool = True,
        block: int = 240,
        loop: bool = False,
        duration_s: float | None = None,
        tail_s: float = 0.5,
        input_signal: np.ndarray | None = None,
        stall_timeout_s: float = 120.0,
        keep_output: bool | None = None,
    ):
        super().__init__()
        self.input_wav = input_wav
        self.output_wav = output_wav
        self.realtime = bool(realtime)
        self.block = int(block)
        self.loop = loop
        self.duration_s = duration_s
        self.tail_s = tail_s if realtime else 0.0
        self._signal = input_signal
        self.stall_timeout_s = stall_timeout_s
        self.input_rate = self.output_rate = RATE
        self.blocksize = self.block
        self.input_device_name = str(input_wav) if input_wav else "silence"
        self.output_device_name = str(output_wav) if output_wav else "(discarded)"
        # keep what played in memory (needed for output_wav; off for long soaks without output)
        self.keep_output = (output_wav is not None) if keep_output is None else keep_output
        self.output_event: threading.Event | None = None  # set by the session in lock-step mode
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._t0 = time.monotonic()
        self._out_chunks: list[np.ndarray] = []
        self.input_samples = 0
        self.blocks_done = 0
        self.late_resets = 0
        self.output: np.ndarray | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, on_input: InputCallback, on_output: OutputCallback, wake: Callable[[], None] | None = None) -> None:
        self._on_input, self._on_output, self._wake = on_input, on_output, wake
        try:
            x = self._load()
        except AudioError as e:
            self._set_state(BackendState.ERROR, str(e))
            self._done.set()
            return
        self._x = x
        self.input_samples = self._total
        self._stop.clear()
        self._done.clear()
        self._out_chunks = []
        self.generation += 1
        self._set_state(BackendState.RUNNING, "")
        target = self._run_realtime if self.realtime else self._run_lockstep
        self._thread = threading.Thread(target=self._guard(target), name="parley-file-audio", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None
        if self.state is BackendState.RUNNING:
            self._finish(self.state)
            self._set_state(BackendState.CLOSED, "stopped before the end of the input")

    def wait_finished(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def _load(self) -> np.ndarray:
        if self._signal is not None:
            x = np.asarray(self._signal, dtype=np.float32).reshape(-1)
        elif self.input_wav is not None:
            x = read_wav_24k(self.input_wav)
        else:
            x = np.zeros(int(round((self.duration_s or 0.0) * RATE)), dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._total = len(x)
        if self.duration_s is not None:
            n = int(round(self.duration_s * RATE))
            if self.loop and len(x):
                self._total = n  # repeated on the fly (no 30-minute arrays in memory)
            else:
                x = x[:n] if len(x) >= n else np.concatenate([x, np.zeros(n - len(x), np.float32)])
                self._total = n
        return x

    def _fill(self, buf: np.ndarray, start: int) -> None:
        """Input samples [start, start + len(buf)) (looped when asked), zeros past the end."""
        x = self._x
        n = len(buf)
        buf[:] = 0.0
        end = min(start + n, self._total)
        if end <= start or len(x) == 0:
            return
        if not self.loop or self.duration_s is None:
            m = min(end, len(x)) - start
            if m > 0:
                buf[:m] = x[start : start + m]
            return
        idx = np.arange(start, end) % len(x)
        buf[: end - start] = x[idx]

    def _guard(self, fn):
        def run():
            try:
                fn()
            except Exception as e:  # never let the thread die silently
                self._set_state(BackendState.ERROR, f"file audio failed: {e}")
                self._done.set()

        return run

    # -- real-time pace ---------------------------------------------------------------------------
    def _run_realtime(self) -> None:
        B = self.block
        total = self._total + int(round(self.tail_s * RATE))
        nblocks = math.ceil(total / B)
        buf = np.zeros(B, dtype=np.float32)
        outbuf = np.zeros(B, dtype=np.float32)
        self._t0 = t0 = time.monotonic()
        k = 0
        while k < nblocks and not self._stop.is_set():
            due = t0 + (k + 1) * B / RATE
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.5:  # the thread was starved for half a second: resync, like a device
                self.late_resets += 1
                t0 = now - (k + 1) * B / RATE
                self._t0 = t0
            self._fill(buf, k * B)
            self._on_input(buf, k * B / RATE, 0)
            outbuf[:] = 0.0
            self._on_output(outbuf, (k + 1) * B / RATE, 0)
            if self.keep_output:
                self._out_chunks.append(outbuf.copy())
            k += 1
            self.blocks_done = k
        self._finish(BackendState.FINISHED if not self._stop.is_set() else BackendState.CLOSED)

    # -- lock-step ("as fast as possible") --------------------------------------------------------
    def _run_lockstep(self) -> None:
        nframes = math.ceil(self._total / FRAME)
        B = self.block
        per = FRAME // B if FRAME % B == 0 else 1
        step = B if FRAME % B == 0 else FRAME
        frame = np.zeros(FRAME, dtype=np.float32)
        out = np.zeros(FRAME, dtype=np.float32)
        ev = self.output_event
        self._t0 = time.monotonic()
        for f in range(nframes):
            if self._stop.is_set():
                break
            s = f * FRAME
            self._fill(frame, s)
            for j in range(per):
                self._on_input(frame[j * step : (j + 1) * step], (s + j * step) / RATE, 0)
            if self._wake is not None:
                self._wake()
            got = 0
            waited_since = time.monotonic()
            while got < FRAME and not self._stop.is_set():
                if ev is not None:
                    ev.clear()
                k = self._on_output(out[got:], (s + got) / RATE, 0)
                got += int(k or 0)
                if got >= FRAME:
                    break
                if k:
                    waited_since = time.monotonic()
                elif time.monotonic() - waited_since > self.stall_timeout_s:
                    self._out_chunks.append(out[:got].copy())
                    self._finish(BackendState.ERROR, f"the session produced no output for {self.stall_timeout_s:.0f} s")
                    return
                if ev is not None:
                    ev.wait(0.05)
                else:
                    time.sleep(0.0005)
            if self.keep_output:
                self._out_chunks.append(out[:got].copy())
            self.blocks_done = (f + 1) * per
        self._finish(BackendState.FINISHED if not self._stop.is_set() else BackendState.CLOSED)

    def _finish(self, state: BackendState, message: str = "") -> None:
        if self._done.is_set():
            return
        out = np.concatenate(self._out_chunks) if self._out_chunks else np.zeros(0, np.float32)
        self._out_chunks = []
        if not self.realtime and self.keep_output:
            n = self.input_samples
            out = out[:n] if len(out) >= n else np.concatenate([out, np.zeros(n - len(out), np.float32)])
        self.output = out
        if self.output_wav is not None:
            try:
                write_wav(self.output_wav, out)
            except Exception as e:
                state, message = BackendState.ERROR, f"cannot write {self.output_wav} ({e})"
        if state is BackendState.FINISHED and not message:
            message = "end of input"
        self._set_state(state, message)
        self._done.set()

    def stats(self) -> dict:
        d = super().stats()
        d.update(blocks=self.blocks_done, late_resets=self.late_resets, input_s=round(self.input_samples / RATE, 3))
        return d
