"""Where `FrameModel` calls run.

* `ModelThread`: the model on its own thread; every MLX call (start, step, reset, memory queries)
  happens on that one thread. The engine hands it frames through a small locked deque and gets
  results back through another; a `wake` callback tells the engine a result is ready.
* `InlineRunner`: the same interface for the simulated clock. A job runs synchronously when the
  simulated model becomes free, and its result becomes visible only when the simulated time has
  advanced by the time the step reports (`timings_ms["total"]`) or the prefill returned (seconds).
  So stalls and slow models are reproduced deterministically, with real model computation.

Both keep the interrupt window: `interrupt(n)` makes the next `n` steps run with
`force_agent_silence=True`, and tags every result with the interrupt count at the moment its step
began, so the engine can silence outputs of steps that started before the interrupt.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..frames import FrameResult
from .telemetry import mlx_memory_mb


@dataclass
class InFrame:
    index: int  # input frame counter (every frame the engine produced)
    pcm: np.ndarray  # what the model hears: 1920 float32 samples at 24 kHz
    t_adc: float | None  # device time of the frame's first sample, when known
    epoch: int  # the prompt epoch it belongs to
    synthetic: bool = False  # a silent frame made up while the device was lost
    t_submit: float = 0.0
    mic: np.ndarray | None = None  # the raw mic frame (for listeners and recordings)
    clean: np.ndarray | None = None  # after echo handling


@dataclass
class Done:
    kind: str  # "step", "start" or "error"
    frame: InFrame | None = None
    result: FrameResult | None = None
    forced: bool = False
    forced_ordinal: int = 0  # 1 for the first forced step after an interrupt, 2 for the next...
    interrupt_seq: int = 0
    epoch: int = 0
    seconds: float = 0.0  # prefill seconds (start)
    wall_ms: float = 0.0  # measured wall time of the call
    persona: Any = None
    reason: str = ""
    error: str = ""
    extra: dict = field(default_factory=dict)


def is_factory(model: Any) -> bool:
    """A zero-argument callable that builds the model (run on the model thread) rather than a
    FrameModel instance."""
    return callable(model) and not hasattr(model, "step")


class _RunnerBase:
    def __init__(self, model, wake: Callable[[], None] | None = None):
        self._factory = model if is_factory(model) else None
        self.model = None if self._factory is not None else model
        self._wake = wake
        self._lock = threading.Lock()
        self.pending: deque[InFrame] = deque()
        self._ctl: deque[tuple] = deque()
        self.done: deque[Done] = deque()
        self._force_remaining = 0
        self._forced_done = 0
        self.interrupt_seq = 0
        self.epoch = 0  # epoch of the most recently requested prefill
        self.steps = 0
        self.failed = False
        self.busy: str | None = None
        self.mlx_memory: tuple[float, float, float] | None = None
        self._mem_t = 0.0
        self._reset_peak = False
        # model attributes to set on the model thread before its next job (e.g. profile_stages)
        self._settings: dict[str, Any] = {}
        self.unsupported_settings: set[str] = set()  # names the model turned out not to have

    # -- engine side --------------------------------------------------------------------------------
    def submit(self, frame: InFrame) -> None:
        with self._lock:
            self.pending.append(frame)

    def request_start(self, persona: Any, reason: str) -> tuple[int, list[InFrame]]:
        """Queues reset + prefill of `persona`; drops frames not yet started. Returns (epoch, dropped)."""
        with self._lock:
            dropped = list(self.pending)
            self.pending.clear()
            # only the newest prefill matters: a queued one that has not started is replaced
            self._ctl = deque(c for c in self._ctl if c[0] != "start")
            self.epoch += 1
            self._ctl.append(("start", persona, reason, self.epoch))
            self._force_remaining = 0
            return self.epoch, dropped

    def interrupt(self, frames: int) -> None:
        with self._lock:
            self._force_remaining = max(self._force_remaining, int(frames))
            self._forced_done = 0
            self.interrupt_seq += 1

    def trim_pending(self, max_backlog: int, keep: int) -> list[InFrame]:
        """Input catch-up: more than `max_backlog` frames waiting -> drop the oldest, keep `keep`."""
        with self._lock:
            if len(self.pending) <= max_backlog:
                return []
            dropped = []
            while len(self.pending) > keep:
                dropped.append(self.pending.popleft())
            return dropped

    def pending_count(self) -> int:
        return len(self.pending)

    def reset_peak_memory(self) -> None:
        self._reset_peak = True

    def set_model_attr(self, name: str, value: Any) -> None:
        """Sets `model.<name> = value` on the model thread, between two jobs (or once a factory
        has built the model). A model without that attribute is left alone (and `name` is added
        to `unsupported_settings`)."""
        with self._lock:
            self._settings[name] = value

    @property
    def force_remaining(self) -> int:
        return self._force_remaining

    # -- model side ---------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return (bool(self._ctl) or (bool(self.pending) and not self.failed)
                or (bool(self._settings) and self.model is not None))

    def _apply_settings(self) -> None:
        """Model side: applies the attributes queued by `set_model_attr`."""
        model = self.model
        if model is None or not self._settings:
            return
        with self._lock:
            settings, self._settings = self._settings, {}
        for name, value in settings.items():
            if not hasattr(model, name):
                self.unsupported_settings.add(name)
                continue
            try:
                setattr(model, name, value)
            except Exception:  # noqa: BLE001 - a read-only attribute: leave the model as it is
                self.unsupported_settings.add(name)

    def _exec_next(self) -> Done | None:
        self._apply_settings()
        with self._lock:
            if self._ctl:
                cmd = self._ctl.popleft()
                frame = None
            elif self.pending and not self.failed:
                cmd = None
                frame = self.pending.popleft()
                forced = self._force_remaining > 0
                ordinal = 0
                if forced:
                    self._force_remaining -= 1
                    self._forced_done += 1
                    ordinal = self._forced_done
                iseq = self.interrupt_seq
            else:
                return None
        if cmd is not None:
            _, persona, reason, epoch = cmd
            self.busy = "start"
            t0 = time.perf_counter()
            try:
                secs = self.model.start(persona)
            except Exception as e:  # noqa: BLE001
                self.failed = True
                self.busy = None
                return Done("error", epoch=epoch, error=_describe(e, "the persona prefill failed"), reason=reason, persona=persona)
            wall = time.perf_counter() - t0
            self.failed = False
            self.busy = None
            self._sample_memory(force=True)
            return Done(
                "start", epoch=epoch, seconds=float(secs) if secs is not None else wall,
                wall_ms=wall * 1000, persona=persona, reason=reason,
            )
        self.busy = "step"
        t0 = time.perf_counter()
        try:
            if hasattr(self.model, "after_step"):  # its next-frame work waits for after_step
                res = self.model.step(frame.pcm, force_agent_silence=forced, defer_next=True)
            else:
                res = self.model.step(frame.pcm, force_agent_silence=forced)
        except Exception as e:  # noqa: BLE001
            self.failed = True
            self.busy = None
            return Done("error", frame=frame, epoch=frame.epoch, error=_describe(e, "the model step failed"))
        wall = (time.perf_counter() - t0) * 1000
        self.busy = None
        self.steps += 1
        self._sample_memory()
        return Done(
            "step", frame=frame, result=res, forced=forced, forced_ordinal=ordinal, interrupt_seq=iseq,
            epoch=frame.epoch, wall_ms=wall,
        )

    def _after(self, d: Done) -> Done | None:
        """Model side, once a step's result is handed over: the model's work for the next frame
        (DuplexEngine.after_step: the next temporal step, issued after the output is on its way
        rather than before). Returns an error Done if that failed."""
        after = getattr(self.model, "after_step", None)
        if d.kind != "step" or after is None or self.failed:
            return None
        try:
            after()
        except Exception as e:  # noqa: BLE001
            self.failed = True
            return Done("error", epoch=d.epoch, error=_describe(e, "the model step failed"))
        return None

    def _sample_memory(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._reset_peak:
            self._reset_peak = False
            import sys

            mx = sys.modules.get("mlx.core")
            if mx is not None:
                try:
                    (getattr(mx, "reset_peak_memory", None) or mx.metal.reset_peak_memory)()
                except Exception:  # noqa: BLE001
                    pass
            force = True
        if force or now - self._mem_t >= 1.0:
            self._mem_t = now
            m = mlx_memory_mb()
            if m is not None:
                self.mlx_memory = m


def _describe(e: BaseException, what: str) -> str:
    """A failure as the session shows it: a ParleyError's own sentence (it says what is wrong
    and how to fix it); anything else, what failed, the message and where."""
    from engine.errors import ParleyError
    if isinstance(e, ParleyError) and str(e).strip():
        return str(e).strip()
    msg = str(e).strip() or type(e).__name__
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{what}: {msg}{where}"


class ModelThread(_RunnerBase):
    """The model on a dedicated daemon thread."""

    def __init__(self, model, wake: Callable[[], None] | None = None, name: str = "parley-model"):
        super().__init__(model, wake)
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def submit(self, frame: InFrame) -> None:
        super().submit(frame)
        self._notify()

    def request_start(self, persona: Any, reason: str):
        r = super().request_start(persona, reason)
        self._notify()
        return r

    def set_model_attr(self, name: str, value: Any) -> None:
        super().set_model_attr(name, value)
        self._notify()

    def poll(self, now: float) -> list[Done]:
        out = []
        while self.done:
            out.append(self.done.popleft())
        return out

    def _loop(self) -> None:
        if self._factory is not None:
            # build the model here, so that every MLX array it owns belongs to this thread
            try:
                self.model = self._factory()
            except Exception as e:  # noqa: BLE001
                self.failed = True
                self.done.append(Done("error", error=_describe(e, "loading the model failed")))
                if self._wake is not None:
                    self._wake()
                return
        while True:
            with self._cv:
                while not self._stop and not self._has_work():
                    self._cv.wait(0.1)
                if self._stop:
                    self._release_model()
                    return
            d = self._exec_next()
            if d is not None:
                self.done.append(d)
                if self._wake is not None:
                    self._wake()
                err = self._after(d)
                if err is not None:
                    self.done.append(err)
                    if self._wake is not None:
                        self._wake()


    def _release_model(self) -> None:
        """Frees a model this thread built, on this thread: MLX arrays destroyed later at
        interpreter shutdown, after their thread is gone, can abort the process."""
        if self._factory is None or self.model is None:
            return
        import gc

        self.model = None
        gc.collect()
        try:
            import mlx.core as mx

            mx.synchronize()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


class InlineRunner(_RunnerBase):
    """Runs jobs on the caller's thread with simulated durations (see module docstring)."""

    def __init__(self, model, step_ms: float | Callable[[Done], float] | None = None):
        super().__init__(model, None)
        if self._factory is not None:
            self.model = self._factory()
        self._step_ms = step_ms
        self._cur: Done | None = None
        self._cur_err: Done | None = None
        self._cur_done_at = 0.0
        self._free_at = 0.0

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> bool:
        return True

    def submit(self, frame: InFrame) -> None:
        super().submit(frame)

    def _duration(self, d: Done) -> float:
        if d.kind == "start":
            return max(0.0, d.seconds)
        if d.kind == "error":
            return 0.0
        if callable(self._step_ms):
            return self._step_ms(d) / 1000.0
        if self._step_ms is not None:
            return float(self._step_ms) / 1000.0
        t = d.result.timings_ms.get("total") if d.result is not None and d.result.timings_ms else None
        return (t if t is not None else d.wall_ms) / 1000.0

    def poll(self, now: float) -> list[Done]:
        out: list[Done] = []
        while True:
            if self._cur is not None:
                if self._cur_done_at <= now + 1e-9:
                    out.append(self._cur)
                    if self._cur_err is not None:
                        out.append(self._cur_err)
                        self._cur_err = None
                    self._free_at = self._cur_done_at
                    self._cur = None
                else:
                    break
            if not self._has_work():
                break
            # the model picks the next job as soon as it is free and the job exists
            head_t = self.pending[0].t_submit if (not self._ctl and self.pending) else now
            start_t = max(self._free_at, min(head_t, now))
            d = self._exec_next()
            if d is None:
                break
            self._cur_err = self._after(d)  # delivered right after the step, as on a thread
            self._cur = d
            self._cur_done_at = start_t + self._duration(d)
        return out
