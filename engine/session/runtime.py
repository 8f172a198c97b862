"""The real-time duplex session (AUDIO.md §3, §6, §7; MODEL.md §8).

```
 device callbacks ──> RingIO rings ──> engine thread ──> model thread (FrameModel, all MLX)
                                          ^    │                 │
                                          │    └── frames ───────┘
                                          └──────── results ─────┘
```

* The **engine thread** (paced by the mic clock) drains the input ring, converts to 24 kHz if the
  device runs at another rate, cuts exact 1920-sample frames, runs echo handling, meters and VAD,
  and hands each frame to the model. It takes results back, applies the controls, converts to the
  device rate and queues them for the output callback, with the policies below. It also publishes
  the telemetry snapshot and events.
* The **model thread** runs `FrameModel.start/step` — one step per input frame.

Policies (defaults from AUDIO.md §6.4):
* input catch-up: more than 3 frames waiting for the model -> drop the oldest, keep the newest one
  (`catchup_drop_frames`, `catchup_dropped_ms`);
* output start and re-priming: when the output queue is (nearly) empty as a frame arrives — at the
  start, after an underrun, after a flush — 20 ms of silence go first (`out_pad_ms`);
* output starvation: the callback plays zeros with short fades and counts it
  (`out_starved_callbacks`, `out_starved_ms`);
* latency trimming: queued output above 60 ms for 3 frames in a row is cut back to 20 ms from the
  start of the next frame, with a fade-in (`out_trimmed_ms`);
* clock drift: with a resampled output the ratio is nudged (±300 ppm at most) towards the slack
  target; at 24 kHz the pad/trim rules absorb it;
* device loss: while the backend is not running, silent frames are made up on the wall clock so
  the model's clock continues (`synth_frames`).

Controls (any thread): `set_mic_muted`, `set_speaker_muted`, `interrupt`, `switch_persona`,
`reset_conversation`, `set_paused`, `set_echo_mode`, `reset_stats`, `set_detailed_timing`,
`reopen_audio`.

Simulated mode (`threaded=False`, with `SimulatedBackend`): no threads; the backend's clock calls
the engine tick, and the model runs through `InlineRunner` with simulated step durations.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

from ..audio.aec import EchoMode, create_echo_canceller
from ..audio.backends.base import AudioBackend, BackendState
from ..audio.io import RingIO
from ..audio.meters import LevelMeter
from ..audio.reframe import Reframer
from ..audio.resample import PassThrough, make_resampler
from ..audio.vad import EnergyVad, VadSmoother
from ..frames import STAGES, FrameResult
from .recording import Recorder
from .runner import Done, InFrame, InlineRunner, ModelThread
from .telemetry import (
    AudioInfo,
    EventKind,
    EventStream,
    LatencyStats,
    MemoryStats,
    Rolling,
    SessionEvent,
    SessionState,
    Snapshot,
    StageStats,
    memory_pressure,
    process_rss_mb,
)

RATE = 24000
FRAME = 1920
FRAME_MS = 80.0

# counters that mean "the audio glitched" when they move
GLITCH_COUNTERS = (
    "in_ring_full_drops",
    "catchup_drop_frames",
    "out_starved_callbacks",
    "out_ring_full_drops",
    "input_overflow",
    "input_underflow",
    "output_underflow",
    "output_overflow",
    "watchdog_fires",
)


@dataclass
class SessionConfig:
    """Tunables. Defaults are AUDIO.md §6.4 (tune on the Mac)."""

    max_backlog_frames: int = 3  # input catch-up: more than this waiting -> drop the oldest
    keep_frames: int = 1  # ... down to this many (the newest)
    start_pad_ms: float = 20.0  # output start: first frame + 20 ms of silence
    slack_target_ms: float = 20.0
    trim_above_ms: float = 60.0
    trim_after_frames: int = 3
    pad_below_ms: float = 5.0  # re-prime when the queue is this close to empty as a frame arrives
    fade_ms: float = 3.0
    interrupt_frames: int = 6  # frames forced to PAD + SILENCE tokens after an interrupt (480 ms)
    # the model emits text/cb0 one step late, so the first forced step's audio still carries the
    # old speech: silence that many forced outputs too
    interrupt_mask_forced_frames: int = 1
    echo_mode: str | None = None  # None: the backend's default (aec for devices, headphones for files)
    aec_ref_lead_ms: float = 20.0  # the reference is taken from this much after the mic's ADC time
    aec_noise_suppression: bool = False
    silent_mic_s: float = 2.0
    speaking_threshold_dbfs: float = -45.0
    speaking_hold_frames: int = 3  # ~240 ms
    stats_window_frames: int = 125  # 10 s of frames for p50/p95
    text_history: int = 64
    transcript_chars: int = 600
    event_queue_size: int = 2048
    snapshot_interval_s: float = 0.02  # 50 snapshots/s (meters move every 10 ms of audio)
    ring_seconds: float = 2.0
    converter: str = "sinc_medium"
    drift_correction: bool = True
    synth_when_lost: bool = True
    engine_poll_s: float = 0.005
    behind_window_s: float = 2.0


@dataclass(frozen=True)
class FrameRecord:
    """What happened to one input frame (given to frame listeners on the engine thread)."""

    index: int
    mic: np.ndarray  # raw 24 kHz mic
    clean: np.ndarray  # after echo handling
    model_in: np.ndarray  # what the model heard (zeros when muted)
    result: FrameResult | None  # None when no step ran
    played: np.ndarray | None  # what was queued for the speaker (24 kHz), None if nothing
    forced: bool = False  # step ran with force_agent_silence
    masked: bool = False  # output silenced (interrupt / speaker muted / stale)
    dropped: str = ""  # "", "catchup", "paused", "prompting", "lost"
    t_adc: float | None = None
    latency_ms: float | None = None


class _RefBuffer:
    """24 kHz reference samples with absolute indices, for time-aligned AEC reference frames."""

    def __init__(self, capacity: int = RATE * 4):
        self._buf = np.zeros(capacity, np.float32)
        self.start = 0  # absolute index of _buf[0]
        self.len = 0

    @property
    def end(self) -> int:
        return self.start + self.len

    def push(self, x: np.ndarray) -> None:
        n = len(x)
        if n == 0:
            return
        cap = len(self._buf)
        if self.len + n > cap:  # keep the newest
            drop = self.len + n - cap
            if drop >= self.len:
                self.start += self.len
                self.len = 0
                if n > cap:
                    self.start += n - cap
                    x = x[-cap:]
                    n = cap
            else:
                self._buf[: self.len - drop] = self._buf[drop : self.len]
                self.start += drop
                self.len -= drop
        self._buf[self.len : self.len + n] = x
        self.len += n

    def take(self, j0: int, n: int) -> tuple[np.ndarray, int]:
        """Samples [j0, j0 + n) (zeros where unavailable); discards everything before j0 + n/2.
        Returns (samples, number of missing samples)."""
        out = np.zeros(n, np.float32)
        a, b = max(j0, self.start), min(j0 + n, self.end)
        if b > a:
            out[a - j0 : b - j0] = self._buf[a - self.start : b - self.start]
        missing = n - max(0, b - a)
        self.discard_before(j0 + n // 2)
        return out, missing

    def take_next(self, n: int) -> tuple[np.ndarray, int]:
        return self.take(self.start, n)

    def discard_before(self, j: int) -> None:
        k = min(max(0, j - self.start), self.len)
        if k:
            self._buf[: self.len - k] = self._buf[k : self.len]
            self.start += k
            self.len -= k


class Session:
    """A live full-duplex conversation between the sound devices (or a file, or a simulation) and
    a `FrameModel`. See the module docstring.

    `model` is a FrameModel, or a zero-argument callable returning one: the callable then runs on
    the model thread, so every MLX array the model creates belongs to that thread (MLX cannot
    evaluate, on another thread, lazy arrays built on the loading thread)."""

    def __init__(
        self,
        model,
        backend: AudioBackend,
        persona: Any = None,
        config: SessionConfig | None = None,
        *,
        threaded: bool = True,
        record_dir: str | Path | None = None,
        persona_name: str | None = None,
        sim_step_ms: float | Callable[[Done], float] | None = None,
    ):
        self._model_arg = model
        self.backend = backend
        self.cfg = config or SessionConfig()
        self.persona = persona
        self.persona_name = persona_name if persona_name is not None else _persona_label(persona)
        self.threaded = threaded
        self.realtime = bool(getattr(backend, "realtime", True))
        self.events = EventStream(self.cfg.event_queue_size)
        self._snapshot = Snapshot()
        self._seq = 0
        self._cmds: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._frame_listeners: list[Callable[[FrameRecord], None]] = []
        self._started = False
        self._stopped = False
        self._t_start = time.monotonic()
        self.recorder = Recorder(record_dir) if record_dir is not None else None
        self.record_dir = Path(record_dir) if record_dir is not None else None

        cap = int(self.cfg.ring_seconds * 48000)
        self.io = RingIO(capacity=cap, fade_samples=max(1, int(self.cfg.fade_ms * RATE / 1000)), lockstep=not self.realtime)
        if threaded:
            self._runner = ModelThread(model, wake=self._wake.set)
            self._now = time.monotonic
        else:
            self._runner = InlineRunner(model, step_ms=sim_step_ms)
            self._now = backend.clock

        # controls (plain attributes: atomic under the GIL)
        self._mic_muted = False
        self._speaker_muted = False
        self._paused = False
        self._prompting = False
        self._error: str | None = None
        self._detailed_timing = False  # requested: per-stage barriers on every frame (TUI.md §2.2)

        # echo handling
        mode = self.cfg.echo_mode or getattr(backend, "default_echo_mode", EchoMode.AEC)
        self._echo_mode = EchoMode.parse(mode)
        self._aec = create_echo_canceller(self._echo_mode, RATE, 0, self.cfg.aec_noise_suppression)
        self._aec_warning = self._aec.fallback_reason

        # engine state
        self._gen_seen = -1
        self._backend_state_seen: BackendState | None = None
        self._watchdog_seen = 0
        self._mic_rs = PassThrough(RATE)
        self._out_rs = PassThrough(RATE)
        self._ref_rs = PassThrough(RATE)
        self._in_rate = RATE
        self._out_rate = RATE
        self._mic_fifo = Reframer(FRAME)
        self._mic_map = (0, 0, RATE)  # (device index base, 24k index base, device rate)
        self._ref = _RefBuffer()
        self._ref_map = (0, 0, RATE)
        self._ref_j = 0  # 24 kHz samples pushed into the reference buffer
        self._ref_next: int | None = None  # where the next reference frame starts
        self._ref_off = 0
        self._in_index = 0
        self._epoch = 0
        self._frames_done = 0
        self._frames_since_prompt = 0
        self._last_prompt_s: float | None = None
        self._last_frame_t: float | None = None
        self._zero_run = 0
        self._mic_silent = False
        self._trim_run = 0
        self._slack_ema: float | None = None
        self._first_write = True

        # meters / VAD
        self._mic_meter = LevelMeter(RATE)
        self._clean_meter = LevelMeter(RATE)
        self._spk_meter = LevelMeter(RATE)
        self._model_meter = LevelMeter(RATE)
        self._evad = EnergyVad(RATE)
        self._vad = VadSmoother()
        self._vad_p = 0.0
        self._erle: deque[tuple[float, float]] = deque(maxlen=13)  # (mic energy, clean energy) per frame with far end
        self._recent_out_db: deque[float] = deque(maxlen=self.cfg.speaking_hold_frames)
        self._recent_text: deque[bool] = deque(maxlen=self.cfg.speaking_hold_frames)

        # statistics
        W = self.cfg.stats_window_frames
        self._stage = {s: Rolling(W) for s in STAGES}
        self._over_budget = 0
        self._lat = Rolling(W)
        self._slack = Rolling(W)
        self._frame_times: deque[float] = deque(maxlen=64)
        self._text_times: deque[float] = deque(maxlen=256)
        self._pieces: deque[str] = deque(maxlen=self.cfg.text_history)
        self._transcript = ""
        self._drop_times: deque[float] = deque(maxlen=64)
        self._live_since: float | None = None
        self._stats_key: tuple = (-1, -1)
        self._stats_cache: tuple = (MappingProxyType({}), LatencyStats())
        self.counters: dict[str, float] = {
            "frames_in": 0,
            "model_frames": 0,
            "catchup_drop_frames": 0,
            "catchup_dropped_ms": 0.0,
            "prompt_dropped_frames": 0,
            "paused_frames": 0,
            "synth_frames": 0,
            "out_trimmed_ms": 0.0,
            "out_pad_ms": 0.0,
            "out_ring_full_drops": 0,
            "aec_ref_missing_ms": 0.0,
            "aec_ref_resyncs": 0,
            "interrupts": 0,
            "forced_frames": 0,
            "masked_frames": 0,
            "persona_switches": 0,
            "resets": 0,
            "device_reopens": 0,
            "text_tokens": 0,
        }
        self._glitch_seen: dict[str, float] = {}
        self._glitch_until = 0.0
        self._mem = MemoryStats()
        self._mem_t = -1e9
        self._publish_t = -1e9
        self._state = SessionState.STOPPED
        self._message = ""
        self._warnings: deque[str] = deque(maxlen=8)
        self._engine_thread: threading.Thread | None = None
        self._stop_evt = threading.Event()

    # ==================================================================== lifecycle
    def start(self, wait_ready: bool = False, timeout: float = 60.0) -> "Session":
        """Opens the audio, queues the persona prefill and starts the threads. Never raises for
        audio problems: see `snapshot.state` / `snapshot.message`."""
        if self._started:
            return self
        self._started = True
        self._t_start = time.monotonic()
        self._set_state(SessionState.STARTING, "opening audio")
        if self.threaded:
            self._runner.start()
        else:
            self.backend.tick_hook = self.tick  # type: ignore[attr-defined]
        if not self.realtime and hasattr(self.backend, "output_event"):
            self.backend.output_event = self.io.output_event  # lock-step file backend
        self._begin_prompt(self.persona, "start")
        self.backend.start(self.io.on_input, self.io.on_output, self._wake.set)
        self._check_backend()
        if self.cfg.echo_mode is None and self._echo_mode is EchoMode.AEC and _looks_like_headphones(self.backend.output_device_name):
            # AUDIO.md §8.1: headphones need no echo cancellation (the user can still switch)
            self._echo_mode = EchoMode.HEADPHONES
            self._aec = create_echo_canceller(EchoMode.HEADPHONES, RATE)
            self._aec_warning = None
            self._emit(EventKind.CONTROL, control="echo_mode", value="headphones", reason=f"output device '{self.backend.output_device_name}'")
        if self._aec_warning:
            self._warn("aec_fallback", self._aec_warning)
        self._emit(EventKind.STARTED, backend=self.backend.name, echo_mode=self._echo_mode.value)
        if self.threaded:
            self._engine_thread = threading.Thread(target=self._engine_loop, name="parley-engine", daemon=True)
            self._engine_thread.start()
        self._publish(force=True)
        if wait_ready and self.threaded:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Waits until the first prefill finished (or failed)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._prompting or self._error:
                return not self._error
            time.sleep(0.01)
        return False

    def stop(self, timeout: float = 5.0) -> Snapshot:
        """Stops everything; returns promptly even if a device hangs. Returns the final snapshot."""
        if self._stopped:
            return self._snapshot
        self._stopped = True
        self._stop_evt.set()
        self._wake.set()
        if self._engine_thread is not None:
            self._engine_thread.join(timeout)
        self.backend.stop()
        self._runner.stop(timeout)
        if not self.threaded:
            self.tick()
        self._set_state(SessionState.STOPPED, "")
        self._emit(EventKind.STOPPED, frames=self._frames_done)
        self._publish(force=True)
        if self.recorder is not None:
            self.recorder.close()
        return self._snapshot

    close = stop

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def model(self):
        """The FrameModel (None until a factory has built it on the model thread)."""
        return self._runner.model

    @property
    def error(self) -> str | None:
        """The sentence of the failure that stopped the model (a prefill or a step), if any; kept
        after `stop()`, whose snapshot says STOPPED."""
        return self._error

    @property
    def snapshot(self) -> Snapshot:
        """The latest telemetry (immutable; safe to read from any thread)."""
        return self._snapshot

    @property
    def state(self) -> SessionState:
        return self._snapshot.state

    def add_frame_listener(self, fn: Callable[[FrameRecord], None]) -> None:
        """`fn(FrameRecord)` is called on the engine thread for every input frame once its fate is
        known. Keep it cheap."""
        self._frame_listeners.append(fn)

    # ==================================================================== controls (thread-safe)
    @property
    def mic_muted(self) -> bool:
        return self._mic_muted

    @property
    def speaker_muted(self) -> bool:
        return self._speaker_muted

    @property
    def paused(self) -> bool:
        return self._paused

    def set_mic_muted(self, muted: bool) -> None:
        """The model hears digital silence while muted (it still gets a frame every step)."""
        muted = bool(muted)
        if muted != self._mic_muted:
            self._mic_muted = muted
            self._control("mute_mic", muted)

    def toggle_mic_muted(self) -> bool:
        self.set_mic_muted(not self._mic_muted)
        return self._mic_muted

    def set_speaker_muted(self, muted: bool) -> None:
        """Nothing is played while muted; the model keeps running and talking."""
        muted = bool(muted)
        if muted != self._speaker_muted:
            self._speaker_muted = muted
            if muted:
                self.io.request_flush()
            self._control("mute_speaker", muted)

    def toggle_speaker_muted(self) -> bool:
        self.set_speaker_muted(not self._speaker_muted)
        return self._speaker_muted

    def interrupt(self, frames: int | None = None) -> None:
        """Cuts the agent off: queued output is dropped at the next output callback (within one
        device block), outputs of steps already running are silenced, and the next `frames` steps
        run with `force_agent_silence=True` (text PAD, audio SILENCE tokens)."""
        n = self.cfg.interrupt_frames if frames is None else int(frames)
        self.io.request_flush()
        self._runner.interrupt(n)
        self._control("interrupt", n, counter="interrupts")

    def switch_persona(self, persona: Any, name: str | None = None) -> None:
        """Reset + prefill of `persona` on the model thread while audio keeps flowing (silence is
        played meanwhile); `snapshot.last_prompt_s` gives the time it took."""
        label = name if name is not None else _persona_label(persona)

        def cmd():
            self.persona = persona
            self.persona_name = label
            self.counters["persona_switches"] += 1
            self._begin_prompt(persona, "switch")

        self._cmds.append(cmd)
        self._wake.set()

    def reset_conversation(self) -> None:
        """A new conversation with the same persona (reset + prefill)."""

        def cmd():
            self.counters["resets"] += 1
            self._begin_prompt(self.persona, "reset")

        self._cmds.append(cmd)
        self._wake.set()

    def set_paused(self, paused: bool) -> None:
        """No model steps while paused; silence is played."""
        paused = bool(paused)
        if paused != self._paused:
            self._paused = paused
            if paused:
                self.io.request_flush()
            self._control("pause", paused)

    def toggle_paused(self) -> bool:
        self.set_paused(not self._paused)
        return self._paused

    def set_echo_mode(self, mode: EchoMode | str) -> None:
        """aec / headphones / gate (AUDIO.md §8.1)."""
        new = EchoMode.parse(mode)

        def cmd():
            self._echo_mode = new
            self._aec = create_echo_canceller(new, RATE, 0, self.cfg.aec_noise_suppression)
            self._erle.clear()
            if self._aec.fallback_reason:
                self._warn("aec_fallback", self._aec.fallback_reason)
            self._emit(EventKind.CONTROL, control="echo_mode", value=self._aec.mode.value)

        self._cmds.append(cmd)
        self._wake.set()

    def cycle_echo_mode(self) -> EchoMode:
        nxt = self._echo_mode.next()
        self.set_echo_mode(nxt)
        return nxt

    @property
    def echo_mode(self) -> EchoMode:
        return self._echo_mode

    def reset_stats(self) -> None:
        """Clears p50/p95 windows, meter peaks and the MLX peak memory."""

        def cmd():
            for r in self._stage.values():
                r.clear()
            self._lat.clear()
            self._slack.clear()
            self._over_budget = 0
            self._stats_key = (-1, -1)
            for m in (self._mic_meter, self._clean_meter, self._spk_meter, self._model_meter):
                m.reset_peaks()
            self._runner.reset_peak_memory()

        self._cmds.append(cmd)
        self._wake.set()

    @property
    def detailed_timing(self) -> bool:
        """Whether detailed per-stage timing was asked for (`snapshot.detailed_timing` says
        whether the model actually runs with it)."""
        return self._detailed_timing

    def set_detailed_timing(self, on: bool) -> None:
        """Detailed per-stage timing on/off (TUI.md §2.2, key `t`): the model's `profile_stages`
        (evaluation barriers between the stages of every frame, which cost throughput) is set on
        the model thread between two steps. Off, a model samples the split on one frame in
        `stage_sample_every`. A model without `profile_stages` is left alone."""
        on = bool(on)
        self._detailed_timing = on

        def cmd():
            self._runner.set_model_attr("profile_stages", on)
            self._emit(EventKind.CONTROL, control="detailed_timing", value=on)

        self._cmds.append(cmd)
        self._wake.set()

    def reopen_audio(self) -> None:
        """Closes and reopens the devices on a helper thread (after a silent-mic warning)."""
        threading.Thread(target=self.backend.restart, name="parley-audio-reopen", daemon=True).start()

    def _control(self, name: str, value: Any, counter: str | None = None) -> None:
        def cmd():
            if counter is not None:
                self.counters[counter] += 1
            self._emit(EventKind.CONTROL, control=name, value=value)

        self._cmds.append(cmd)
        self._wake.set()

    # ==================================================================== engine
    def _engine_loop(self) -> None:
        poll = self.cfg.engine_poll_s
        while not self._stop_evt.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the engine thread must not die silently
                self._fail(f"the audio engine failed: {e}")
            self._wake.wait(poll)
            self._wake.clear()

    def tick(self) -> None:
        """One engine iteration (called by the engine thread, or by the simulated clock)."""
        now = self._now()
        while self._cmds:
            self._cmds.popleft()()
        self._check_backend()
        self._drain_played()
        self._drain_input(now)
        self._maybe_synthesize(now)
        for d in self._runner.poll(now):
            self._on_done(d)
        self._periodic(now)

    # -------------------------------------------------------------------- backend state
    def _check_backend(self) -> None:
        b = self.backend
        if b.generation != self._gen_seen and b.input_rate and b.output_rate:
            first = self._gen_seen < 0
            self._gen_seen = b.generation
            self._setup_rates(b.input_rate, b.output_rate)
            if not first:
                self.counters["device_reopens"] += 1
                self.io.request_flush()  # stale output from before the loss
        if b.watchdog_fires != self._watchdog_seen:
            self._watchdog_seen = b.watchdog_fires
            self._emit(EventKind.WATCHDOG, fires=b.watchdog_fires, message=b.message)
        if b.state is not self._backend_state_seen:
            prev = self._backend_state_seen
            self._backend_state_seen = b.state
            self._emit(EventKind.AUDIO, state=b.state.value, previous=prev.value if prev else None, message=b.message, generation=b.generation)
            if b.state is BackendState.RUNNING:
                self._last_frame_t = None

    def _setup_rates(self, in_rate: int, out_rate: int) -> None:
        conv = self.cfg.converter
        self._in_rate, self._out_rate = int(in_rate), int(out_rate)
        self._mic_rs = make_resampler(in_rate, RATE, conv)
        self._out_rs = make_resampler(RATE, out_rate, conv)
        self._ref_rs = make_resampler(out_rate, RATE, conv)
        self._mic_map = (self.io.in_ring.read_count, self._mic_fifo.samples_in, in_rate)
        self._ref_map = (self.io.played.read_count, self._ref_j, out_rate)
        self._ref_next = None
        self.io.set_fade(int(self.cfg.fade_ms * out_rate / 1000))

    # -------------------------------------------------------------------- input side
    def _drain_played(self) -> None:
        ring = self.io.played
        if ring.available() == 0:
            return
        chunk = ring.read()
        x = self._ref_rs.process(chunk)
        self._ref.push(x)
        self._ref_j += len(x)
        self._spk_meter.process(x)

    def _drain_input(self, now: float) -> None:
        ring = self.io.in_ring
        avail = ring.available()
        if avail == 0:
            return
        chunk = ring.read(avail)
        if self.backend.detects_silent_mic:
            self._check_silent(chunk)
        x = self._mic_rs.process(chunk)
        if len(x):
            self._mic_meter.process(x)
            self._mic_fifo.push(x)
        while self._mic_fifo.frames_ready:
            j = self._mic_fifo.samples_out
            frame = self._mic_fifo.pop()
            self._on_mic_frame(frame, self._adc_time(j), now)
            self._last_frame_t = now

    def _adc_time(self, j: int) -> float | None:
        idx, t = self.io.in_stamp
        if t == 0.0 and idx == 0:
            return None
        p_base, j_base, rate = self._mic_map
        p = p_base + (j - j_base) * rate / RATE
        return t + (p - idx) / rate

    def _check_silent(self, chunk: np.ndarray) -> None:
        if chunk.any():
            self._zero_run = 0
            if self._mic_silent:
                self._mic_silent = False
                self._emit(EventKind.WARNING, code="silent_mic_cleared", message="the microphone delivers sound again")
            return
        self._zero_run += len(chunk)
        if not self._mic_silent and self._zero_run >= self.cfg.silent_mic_s * max(1, self._in_rate):
            self._mic_silent = True
            self._warn(
                "silent_mic",
                f"the microphone has delivered exact digital silence for {self.cfg.silent_mic_s:.0f} s: "
                "check the microphone permission (macOS: System Settings > Privacy & Security > Microphone "
                "for your terminal) or the input device",
            )

    def _maybe_synthesize(self, now: float) -> None:
        """Keeps the model's clock running with silent frames while the device is not delivering."""
        if not (self.cfg.synth_when_lost and self.realtime and self._started):
            return
        if self.backend.state is not BackendState.LOST:
            return  # only a lost device (being reopened) is bridged; a missing one is just a state
        if self._last_frame_t is None:
            self._last_frame_t = now
            return
        k = 0
        while now - self._last_frame_t >= FRAME_MS / 1000.0 and k < 4:
            self._last_frame_t += FRAME_MS / 1000.0
            self.counters["synth_frames"] += 1
            self._on_mic_frame(np.zeros(FRAME, np.float32), None, now, synthetic=True)
            k += 1
        if now - self._last_frame_t > 0.5:
            self._last_frame_t = now

    def _ref_for(self, t_adc: float | None) -> np.ndarray:
        """The echo reference for a mic frame: what played, at 24 kHz, from the DAC time equal to
        the frame's ADC time plus a small lead (so the echo always comes after its reference).
        The read position advances by exactly one frame per frame and re-syncs to the stamps only
        when it is off by more than 5 ms for 3 frames (or after a device change)."""
        _, p_idx, dac_t, _ = self.io.out_stamp
        target = None
        if t_adc is not None and not (dac_t == 0.0 and p_idx == 0):
            p_base, j_base, rate = self._ref_map
            p0 = p_idx + (t_adc + self.cfg.aec_ref_lead_ms / 1000.0 - dac_t) * rate
            target = int(round(j_base + (p0 - p_base) * RATE / rate))
            target = min(target, self._ref.end - FRAME)  # never ask for what has not played yet
        j0 = self._ref_next
        if j0 is None:
            j0 = target if target is not None else self._ref.start
            self._ref_off = 0
        elif target is not None and abs(target - j0) > RATE * 0.005:
            self._ref_off += 1
            if self._ref_off >= 3 or abs(target - j0) > RATE * 0.1:
                j0 = target
                self._ref_off = 0
                self.counters["aec_ref_resyncs"] += 1
        else:
            self._ref_off = 0
        self._ref_next = j0 + FRAME
        ref, missing = self._ref.take(j0, FRAME)
        if missing and self.backend.state is BackendState.RUNNING and not self._first_write:
            self.counters["aec_ref_missing_ms"] += missing / RATE * 1000
        return ref

    def _on_mic_frame(self, frame: np.ndarray, t_adc: float | None, now: float, synthetic: bool = False) -> None:
        index = self._in_index
        self._in_index += 1
        self.counters["frames_in"] += 1
        ref = self._ref_for(t_adc)
        clean = self._aec.process(frame, ref)
        self._clean_meter.process(clean)
        p = self._aec.speech_probability
        if p is None:
            p = self._evad.process(clean)
        self._vad_p = float(p)
        self._vad.update(self._vad_p)
        ref_e = float(np.dot(ref, ref))
        if ref_e > FRAME * 1e-5:  # far end above about -50 dBFS
            self._erle.append((float(np.dot(frame, frame)), float(np.dot(clean, clean))))
        model_in = np.zeros(FRAME, np.float32) if self._mic_muted else clean
        if self.recorder is not None:
            self.recorder.mic(index, frame)

        drop = ""
        if self._error:
            drop = "error"
        elif self._paused:
            drop = "paused"
            self.counters["paused_frames"] += 1
        elif self._prompting and self.realtime:
            drop = "prompting"
            self.counters["prompt_dropped_frames"] += 1
        if drop:
            # real time: nothing is queued (the output was flushed when this began), so the
            # callback plays "idle" zeros, not counted as starvation, until the next model frame
            # re-primes it. Lock-step: one output frame per input frame, so a silent one.
            if not self.realtime:
                self._write_output(np.zeros(FRAME, np.float32), None, now)
            if self.recorder is not None:
                self.recorder.model(index, None)
            self._notify_frame(FrameRecord(index, frame, clean, model_in, None, None, dropped=drop, t_adc=t_adc))
            return

        f = InFrame(index, model_in, t_adc, self._epoch, synthetic=synthetic, t_submit=now, mic=frame, clean=clean)
        self._runner.submit(f)
        if self.realtime:
            dropped = self._runner.trim_pending(self.cfg.max_backlog_frames, self.cfg.keep_frames)
            if dropped:
                self.counters["catchup_drop_frames"] += len(dropped)
                self.counters["catchup_dropped_ms"] += len(dropped) * FRAME_MS
                self._drop_times.append(now)
                for g in dropped:
                    if self.recorder is not None:
                        self.recorder.model(g.index, None)
                    self._notify_frame(
                        FrameRecord(g.index, g.mic, g.clean, g.pcm, None, None, dropped="catchup", t_adc=g.t_adc)
                    )

    # -------------------------------------------------------------------- model results
    def _begin_prompt(self, persona: Any, reason: str) -> None:
        self.io.request_flush()
        self._prompting = True
        epoch, dropped = self._runner.request_start(persona, reason)
        self._epoch = epoch
        for g in dropped:
            self.counters["prompt_dropped_frames"] += 1
            if self.recorder is not None:
                self.recorder.model(g.index, None)
        self._emit(EventKind.CONTROL, control="prompt", value=reason, persona=_persona_label(persona))

    def _on_done(self, d: Done) -> None:
        if d.kind == "error":
            self._fail(d.error)
            return
        if d.kind == "start":
            if d.epoch == self._epoch:
                self._prompting = False
                self._error = None
            self._last_prompt_s = d.seconds
            self._frames_since_prompt = 0
            self._emit(EventKind.PROMPTED, persona=_persona_label(d.persona), seconds=round(d.seconds, 4), wall_ms=round(d.wall_ms, 1), reason=d.reason)
            return
        now = self._now()
        f = d.frame
        res = d.result
        stale = d.epoch != self._epoch
        masked = (
            stale
            or d.interrupt_seq != self._runner.interrupt_seq
            or (d.forced and d.forced_ordinal <= self.cfg.interrupt_mask_forced_frames)
        )
        self._frames_done += 1
        self.counters["model_frames"] += 1
        if d.forced:
            self.counters["forced_frames"] += 1
        self._frames_since_prompt += 1
        if self._live_since is None:
            self._live_since = now - FRAME_MS / 1000.0
        self._frame_times.append(now)
        if getattr(res, "notice", None):
            self._warn("engine_notice", res.notice)
        # timings
        tm = dict(res.timings_ms or {})
        if "total" not in tm:
            tm["total"] = d.wall_ms
        for k, v in tm.items():
            r = self._stage.get(k)
            if r is not None:
                r.add(v)
        if tm["total"] > FRAME_MS:
            self._over_budget += 1
        # output level and text
        pcm = np.asarray(res.pcm, dtype=np.float32)
        if len(pcm) != FRAME:
            pcm = pcm[:FRAME] if len(pcm) > FRAME else np.concatenate([pcm, np.zeros(FRAME - len(pcm), np.float32)])
        self._model_meter.process(pcm)
        ms = float(np.dot(pcm, pcm)) / FRAME
        self._recent_out_db.append(10 * math.log10(ms) if ms > 1e-12 else -120.0)
        has_text = bool(res.text) and not stale
        self._recent_text.append(has_text)
        if has_text:
            self.counters["text_tokens"] += 1
            self._text_times.append(now)
            self._pieces.append(res.text)
            self._transcript = (self._transcript + res.text)[-self.cfg.transcript_chars :]
            self._emit(EventKind.TEXT, piece=res.text, text_id=int(res.text_id))
        play_masked = masked or self._speaker_muted or self._paused
        if masked:
            self.counters["masked_frames"] += 1
        played = np.zeros(FRAME, np.float32) if play_masked else pcm
        latency = None
        if self.realtime and (stale or self._paused or self._error or self._prompting):
            played = None  # the output was flushed for a prefill / pause: leave it idle
        else:
            latency = self._write_output(played, f.t_adc, now)
        if self.recorder is not None:
            self.recorder.model(f.index, None if stale else pcm)
        if self._frame_listeners:
            self._notify_frame(
                FrameRecord(
                    f.index, f.mic if f.mic is not None else f.pcm, f.clean if f.clean is not None else f.pcm, f.pcm, res, played,
                    forced=d.forced, masked=play_masked, t_adc=f.t_adc, latency_ms=latency,
                )
            )

    # -------------------------------------------------------------------- output side
    def _write_output(self, pcm24: np.ndarray, t_adc: float | None, now: float) -> float | None:
        """Queues one 24 kHz frame for the speaker with the start/pad/trim policies; returns the
        estimated mouth-to-ear latency (ms) of this frame when stamps are available."""
        dev = self._out_rs.process(pcm24)
        ring = self.io.out_ring
        rate = self._out_rate
        if not self.realtime:
            n = ring.write(dev)
            if n < len(dev):
                self.counters["out_ring_full_drops"] += len(dev) - n
            self.io.output_event.set()
            return None
        if self.backend.state is not BackendState.RUNNING:
            return None  # no callbacks are consuming: don't fill the ring with stale audio
        slack = ring.available()
        slack_ms = slack / rate * 1000.0
        self._slack.add(slack_ms)
        cfg = self.cfg
        pad = cut = 0
        if self.io.flush_pending:
            slack_ms = 0.0
        if slack_ms < cfg.pad_below_ms:
            target = cfg.start_pad_ms if self._first_write else cfg.slack_target_ms
            pad = int(round((target - slack_ms) * rate / 1000.0))
            self._trim_run = 0
        elif slack_ms > cfg.trim_above_ms:
            self._trim_run += 1
            if self._trim_run >= cfg.trim_after_frames:
                fade = self.io.fade_samples
                cut = int((slack_ms - cfg.slack_target_ms) * rate / 1000.0)
                cut = max(0, min(cut, len(dev) - fade))
                self._trim_run = 0
        else:
            self._trim_run = 0
        # drift: nudge a resampled output towards the target
        if cfg.drift_correction and not isinstance(self._out_rs, PassThrough):
            ema = slack_ms if self._slack_ema is None else self._slack_ema + 0.02 * (slack_ms - self._slack_ema)
            self._slack_ema = ema
            ppm = max(-300.0, min(300.0, (cfg.slack_target_ms - ema) / cfg.slack_target_ms * 150.0))
            self._out_rs.set_drift_ppm(ppm)
        if cut > 0:
            dev = dev[cut:].copy()
            f = min(self.io.fade_samples, len(dev))
            dev[:f] *= np.linspace(0.0, 1.0, f + 2, dtype=np.float32)[1:-1]
            self.counters["out_trimmed_ms"] += cut / rate * 1000.0
        if pad > 0:
            if not self._first_write:
                self.counters["out_pad_ms"] += pad / rate * 1000.0
            ring.write_zeros(pad)
        self._first_write = False
        w = ring.write_count
        n = ring.write(dev)
        if n < len(dev):
            self.counters["out_ring_full_drops"] += len(dev) - n
        if t_adc is None:
            return None
        r_after, _, dac_t, nblk = self.io.out_stamp
        if dac_t == 0.0 and nblk == 0:
            return None
        t_dac = dac_t + (nblk + (w - cut) - r_after) / rate
        lat = (t_dac - t_adc) * 1000.0
        self._lat.add(lat)
        return lat

    # -------------------------------------------------------------------- errors, events, state
    def _fail(self, message: str) -> None:
        if self._error == message:
            return
        self._error = message
        self.io.request_flush()
        self._prompting = False
        self._emit(EventKind.ERROR, message=message)

    def _warn(self, code: str, message: str) -> None:
        self._warnings.append(message)
        self._emit(EventKind.WARNING, code=code, message=message)

    def _emit(self, kind: str, **data: Any) -> None:
        ev = SessionEvent(kind, time.time(), self._frames_done, MappingProxyType(data))
        self.events.put(ev)
        if self.recorder is not None:
            self.recorder.event(ev.to_json())

    def _notify_frame(self, rec: FrameRecord) -> None:
        for fn in self._frame_listeners:
            try:
                fn(rec)
            except Exception:  # noqa: BLE001
                pass

    def _set_state(self, st: SessionState, message: str) -> None:
        if st is not self._state:
            prev = self._state
            self._state = st
            self._message = message
            self._emit(EventKind.STATE, state=st.value, previous=prev.value, message=message)
        else:
            self._message = message

    def _compute_state(self) -> tuple[SessionState, str]:
        b = self.backend
        if self._stopped:
            return SessionState.STOPPED, ""
        if self._error:
            return SessionState.ERROR, self._error
        if b.state is BackendState.ERROR:
            return SessionState.ERROR, b.message
        if b.state in (BackendState.NO_PORTAUDIO, BackendState.NO_DEVICE, BackendState.REFUSED):
            return SessionState.NO_AUDIO_DEVICE, b.message
        if b.state is BackendState.LOST:
            return SessionState.DEVICE_LOST, b.message
        if b.state is BackendState.FINISHED and self._runner.pending_count() == 0 and not self._runner.busy:
            return SessionState.FINISHED, b.message
        if self._prompting:
            return SessionState.PROMPTING, "prefilling the persona"
        if self._paused:
            return SessionState.PAUSED, ""
        if self._mic_muted:
            return SessionState.MUTED, ""
        if self._speaking():
            return SessionState.SPEAKING, ""
        if b.state is BackendState.OPENING:
            return SessionState.STARTING, b.message
        return SessionState.LISTENING, ""

    def _speaking(self) -> bool:
        thr = self.cfg.speaking_threshold_dbfs
        return any(v > thr for v in self._recent_out_db) or any(self._recent_text)

    # -------------------------------------------------------------------- periodic work
    def _periodic(self, now: float) -> None:
        st, msg = self._compute_state()
        changed = st is not self._state or msg != self._message
        self._set_state(st, msg)
        # memory, once a second (MLX figures come from the model thread)
        wall = time.monotonic()
        if wall - self._mem_t >= 1.0:
            self._mem_t = wall
            rss, peak = process_rss_mb()
            mlx = self._runner.mlx_memory
            self._mem = MemoryStats(
                mlx_active_mb=round(mlx[0], 1) if mlx else None,
                mlx_peak_mb=round(mlx[1], 1) if mlx else None,
                mlx_cache_mb=round(mlx[2], 1) if mlx else None,
                rss_mb=round(rss, 1) if rss is not None else None,
                rss_peak_mb=round(peak, 1) if peak is not None else None,
                pressure=memory_pressure(),
            )
        if changed or now - self._publish_t >= self.cfg.snapshot_interval_s:
            self._publish(now=now)  # state changes are published at once

    def all_counters(self) -> dict[str, float]:
        io = self.io
        out_rate = max(1, self._out_rate)
        c = dict(self.counters)
        c.update(
            in_callbacks=io.in_callbacks,
            out_callbacks=io.out_callbacks,
            in_ring_full_drops=io.in_ring_full_drops,
            out_starved_callbacks=io.out_starved_callbacks,
            out_starved_ms=round(io.out_starved_samples / out_rate * 1000.0, 1),
            out_flushed_ms=round(io.flushed_samples / out_rate * 1000.0, 1),
            played_full_drops=io.played_full_drops,
            watchdog_fires=self.backend.watchdog_fires,
            device_restarts=self.backend.restarts,
            events_dropped=self.events.dropped,
            pending_frames=self._runner.pending_count(),
            in_ring_level=io.in_ring.available(),
            out_ring_level=io.out_ring.available(),
            slack_ms_p50=round(self._slack.percentiles(50)[0], 1) if len(self._slack) else 0.0,
            slack_ms_min=round(min(self._slack._d), 1) if len(self._slack) else 0.0,
            slack_ms_max=round(self._slack.max(), 1) if len(self._slack) else 0.0,
            drift_ppm=round(getattr(self._out_rs, "drift_ppm", 0.0), 1),
        )
        c.update(io.flags_dict())
        if self.recorder is not None:
            c["recorder_dropped"] = self.recorder.dropped
        for k in ("out_trimmed_ms", "out_pad_ms", "catchup_dropped_ms", "aec_ref_missing_ms"):
            c[k] = round(c[k], 1)
        return c

    def _publish(self, force: bool = False, now: float | None = None) -> None:
        now = self._now() if now is None else now
        self._publish_t = now
        wall = time.monotonic()
        counters = self.all_counters()
        # glitch: any glitch counter moved in the last second
        for name in GLITCH_COUNTERS:
            v = counters.get(name, 0)
            seen = self._glitch_seen.get(name)
            if seen is not None and v > seen:
                self._glitch_until = now + 1.0
                self._emit(EventKind.GLITCH, counter=name, delta=v - seen, total=v)
            self._glitch_seen[name] = v
        key = (self._stage["total"].count, self._lat.count)
        if key != self._stats_key:  # percentiles only change when a frame came out
            self._stats_key = key
            timings = {}
            for k, r in self._stage.items():
                if r.count == 0:
                    continue
                p50, p95 = r.percentiles(50, 95)
                timings[k] = StageStats(
                    last=round(r.last or 0.0, 2), p50=round(p50, 2), p95=round(p95, 2), max=round(r.max(), 2),
                    session_max=round(r.session_max, 2), over_budget=self._over_budget if k == "total" else 0, count=r.count,
                )
            lat = LatencyStats()
            if self._lat.count:
                p50, p95 = self._lat.percentiles(50, 95)
                lat = LatencyStats(round(self._lat.last or 0.0, 1), round(p50, 1), round(p95, 1), round(self._lat.max(), 1), self._lat.count)
            self._stats_cache = (MappingProxyType(timings), lat)
        timings, lat = self._stats_cache
        tot = timings.get("total")
        rtf50 = tot.p50 / FRAME_MS if tot else 0.0
        rtf95 = tot.p95 / FRAME_MS if tot else 0.0
        fps = _rate(self._frame_times, now, 2.0, self._live_since)
        tps = _rate(self._text_times, now, 10.0, self._live_since)
        recent_drop = bool(self._drop_times) and now - self._drop_times[-1] <= self.cfg.behind_window_s
        erle = None
        if len(self._erle) >= 3:
            em = sum(a for a, _ in self._erle)
            ec = sum(b for _, b in self._erle)
            if em > 0:
                erle = round(10 * math.log10(em / max(ec, 1e-20)), 1)
        b = self.backend
        audio = AudioInfo(
            backend=b.name, state=b.state.value, message=b.message,
            input_device=b.input_device_name, output_device=b.output_device_name,
            input_rate=b.input_rate, output_rate=b.output_rate, blocksize=b.blocksize,
            portaudio_version=getattr(b, "portaudio_version", ""), resampled=self._in_rate != RATE or self._out_rate != RATE,
            echo_mode=self._aec.mode.value, echo_description=self._aec.describe(),
        )
        model = self.model
        self._seq += 1
        self._snapshot = Snapshot(
            seq=self._seq,
            time=wall,
            uptime_s=round(wall - self._t_start, 3),
            state=self._state,
            message=self._message,
            activity="SPEAKING" if self._speaking() else "LISTENING",
            overlap=self._speaking() and self._vad.active,
            mic_muted=self._mic_muted,
            speaker_muted=self._speaker_muted,
            paused=self._paused,
            prompting=self._prompting,
            behind=recent_drop or rtf95 > 1.0,
            mic_silent=self._mic_silent,
            glitch=now < self._glitch_until,
            persona=self.persona_name,
            frame_index=self._frames_done,
            frames_since_prompt=self._frames_since_prompt,
            context_frames=_context_frames(model),
            detailed_timing=_flag(model, "profile_stages"),
            stage_sample_every=_stage_sample_every(model),
            frame_path=_text(model, "frame_path"),
            last_prompt_s=self._last_prompt_s,
            mic=self._mic_meter.reading(),
            mic_clean=self._clean_meter.reading(),
            speaker=self._spk_meter.reading(),
            model_out=self._model_meter.reading(),
            vad=self._vad.active,
            vad_probability=round(self._vad_p, 3),
            aec_reduction_db=erle,
            text_pieces=tuple(self._pieces),
            transcript=self._transcript,
            timings=timings,
            rtf_p50=round(rtf50, 3),
            rtf_p95=round(rtf95, 3),
            frames_per_s=round(fps, 2),
            text_tokens_per_s=round(tps, 2),
            all_tokens_per_s=round(fps, 2),
            latency=lat,
            memory=self._mem,
            counters=MappingProxyType(counters),
            audio=audio,
            warnings=tuple(self._warnings),
        )


def _rate(times: deque, now: float, window: float, since: float | None) -> float:
    """Events per second over the last `window` seconds (or since `since` when shorter)."""
    if not times or since is None:
        return 0.0
    span = min(window, now - since)
    if span < 0.5:
        return 0.0
    n = sum(1 for t in times if now - t <= span)
    return n / span


def _persona_label(persona: Any) -> str:
    if persona is None:
        return ""
    for attr in ("name", "label", "title"):
        v = getattr(persona, attr, None)
        if isinstance(v, str) and v:
            return v
    if isinstance(persona, dict):
        for k in ("name", "label"):
            if isinstance(persona.get(k), str):
                return persona[k]
    return str(persona)


def _context_frames(model: Any) -> int | None:
    if model is None:
        return None
    for attr in ("context_frames", "context"):
        v = getattr(model, attr, None)
        if isinstance(v, int):
            return v
    try:
        v = model.config.lm.context  # DuplexEngine
        return int(v) if v else None
    except AttributeError:
        return None


def _flag(model: Any, attr: str) -> bool:
    return model is not None and getattr(model, attr, False) is True


def _text(model: Any, attr: str) -> str:
    v = getattr(model, attr, "") if model is not None else ""
    return v if isinstance(v, str) else ""


def _stage_sample_every(model: Any) -> int | None:
    """The model's stage-split sampling period (one frame in N), None if it has none."""
    v = getattr(model, "stage_sample_every", None) if model is not None else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


_HEADPHONE_WORDS = ("headphone", "headset", "airpods", "earbud", "earphone", "buds", "beats")


def _looks_like_headphones(name: str) -> bool:
    n = (name or "").lower()
    return any(w in n for w in _HEADPHONE_WORDS)
