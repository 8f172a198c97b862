"""Telemetry for front ends: an immutable `Snapshot` swapped in atomically, plus a bounded event
stream (TUI.md §5.1).

* Continuous values (levels, timings, counters, memory) live in the latest `Snapshot`. The engine
  builds a new frozen object and publishes it with one attribute assignment; readers on any thread
  just read `session.snapshot`. Nothing in it is mutable (mappings are read-only proxies).
* Discrete happenings (a text piece, a state change, a control taking effect, an error, a device
  change, a glitch) are `SessionEvent`s in an `EventStream`: a bounded queue that drops the oldest
  entry when full (and counts the drop), so a slow or absent reader never blocks the engine.
  Listeners registered with `add_listener` are called on the engine thread and must not block
  (Textual's `post_message` is fine; `call_from_thread` is not).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from ..audio.meters import LevelReading

_EMPTY: Mapping = MappingProxyType({})


class SessionState(str, Enum):
    """What the session is doing, as the word a front end shows (TUI.md §2.1)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"  # opening audio, before the first prefill is queued
    PROMPTING = "PROMPTING"  # voice + persona prefill (session start, persona switch, reset)
    LISTENING = "LISTENING"  # live, the model's output is quiet
    SPEAKING = "SPEAKING"  # live, the model's output is audible or it emits text
    MUTED = "MUTED"  # live with the mic muted (the model hears digital silence)
    PAUSED = "PAUSED"  # no model steps
    NO_AUDIO_DEVICE = "NO AUDIO DEVICE"  # PortAudio missing, no device, or the device refused
    DEVICE_LOST = "DEVICE LOST"  # the watchdog fired; reopening
    FINISHED = "FINISHED"  # a file input ended
    ERROR = "ERROR"  # the model failed; `message` says why


class EventKind:
    """The `kind` strings of `SessionEvent`."""

    STATE = "state"  # data: state, previous, message
    TEXT = "text"  # data: piece, text_id
    STARTED = "started"  # session running
    PROMPTED = "prompted"  # a prefill finished; data: persona, seconds, reason (start/switch/reset)
    CONTROL = "control"  # data: control (mute_mic, mute_speaker, interrupt, pause, echo_mode...), value
    AUDIO = "audio"  # backend state change; data: state, message, generation
    WATCHDOG = "watchdog"  # the device watchdog fired; data: fires, message
    GLITCH = "glitch"  # an audio counter moved; data: counter, delta, total
    WARNING = "warning"  # data: code (silent_mic, behind, aec_fallback, ...), message
    ERROR = "error"  # data: message
    STOPPED = "stopped"


@dataclass(frozen=True)
class SessionEvent:
    kind: str
    time: float  # time.time() (wall clock, for logs and recordings)
    frame: int  # the session's frame counter when it happened
    data: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def to_json(self) -> dict:
        return {"kind": self.kind, "time": round(self.time, 4), "frame": self.frame, **_jsonable(self.data)}


def _jsonable(d: Mapping) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Enum):
            v = v.value
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif not isinstance(v, (str, int, float, bool, type(None), list, dict)):
            v = str(v)
        out[k] = v
    return out


class EventStream:
    """Bounded, drop-oldest, thread-safe event queue with optional non-blocking listeners."""

    def __init__(self, maxsize: int = 2048):
        self._q: deque[SessionEvent] = deque(maxlen=maxsize)
        self._cond = threading.Condition()
        self._listeners: list[Callable[[SessionEvent], None]] = []
        self.dropped = 0
        self.published = 0
        self.listener_errors = 0

    def put(self, event: SessionEvent) -> None:
        with self._cond:
            if len(self._q) == self._q.maxlen:
                self.dropped += 1
            self._q.append(event)
            self.published += 1
            self._cond.notify_all()
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - a front end's bug must not stop the engine
                self.listener_errors += 1

    def get(self, timeout: float | None = None) -> SessionEvent | None:
        """The oldest event, waiting up to `timeout` seconds (None: wait forever)."""
        with self._cond:
            if not self._q:
                self._cond.wait_for(lambda: bool(self._q), timeout)
            return self._q.popleft() if self._q else None

    def drain(self, max_items: int | None = None) -> list[SessionEvent]:
        with self._cond:
            n = len(self._q) if max_items is None else min(max_items, len(self._q))
            return [self._q.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self._q)

    def add_listener(self, fn: Callable[[SessionEvent], None]) -> None:
        with self._cond:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[SessionEvent], None]) -> None:
        with self._cond:
            if fn in self._listeners:
                self._listeners.remove(fn)


@dataclass(frozen=True)
class StageStats:
    """Milliseconds for one stage over the rolling window (10 s = 125 frames by default)."""

    last: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    max: float = 0.0  # window max
    session_max: float = 0.0
    over_budget: int = 0  # frames in the session above the 80 ms budget
    count: int = 0


@dataclass(frozen=True)
class LatencyStats:
    """Estimated mouth-to-ear latency (ADC time of a frame's first input sample to DAC time of its
    output's first sample: framing, queues, model time and device latency; the model's own
    algorithmic delay is not included)."""

    last_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    max_ms: float | None = None
    count: int = 0


@dataclass(frozen=True)
class MemoryStats:
    mlx_active_mb: float | None = None
    mlx_peak_mb: float | None = None
    mlx_cache_mb: float | None = None
    rss_mb: float | None = None
    rss_peak_mb: float | None = None
    pressure: str | None = None  # macOS: "normal" / "warn" / "critical"; None elsewhere


@dataclass(frozen=True)
class AudioInfo:
    backend: str = ""
    state: str = "closed"
    message: str = ""
    input_device: str = ""
    output_device: str = ""
    input_rate: int = 0
    output_rate: int = 0
    blocksize: int = 0
    portaudio_version: str = ""
    resampled: bool = False
    echo_mode: str = ""
    echo_description: str = ""


@dataclass(frozen=True)
class Snapshot:
    """Everything a front end draws, frozen. Read `session.snapshot` as often as you like."""

    seq: int = 0
    time: float = 0.0  # time.monotonic() when built
    uptime_s: float = 0.0
    state: SessionState = SessionState.STOPPED
    message: str = ""  # one sentence for the state (errors, device problems, warnings)
    activity: str = "LISTENING"  # LISTENING / SPEAKING regardless of badges
    overlap: bool = False  # the model speaks while the user VAD is on
    # badges
    mic_muted: bool = False
    speaker_muted: bool = False
    paused: bool = False
    prompting: bool = False
    behind: bool = False  # RTF > 1 or input frames dropped in the last 2 s
    mic_silent: bool = False  # exact digital silence for > 2 s (permission?)
    glitch: bool = False  # an audio counter moved in the last second
    # persona / progress
    persona: str = ""
    frame_index: int = 0  # model steps run in this session
    frames_since_prompt: int = 0  # live frames since the last prefill (context fill)
    context_frames: int | None = None  # the model's attention window, when it says
    last_prompt_s: float | None = None  # duration of the last prefill (start / switch / reset)
    # levels
    mic: LevelReading = LevelReading()  # raw mic
    mic_clean: LevelReading = LevelReading()  # after echo handling (what the model hears unless muted)
    speaker: LevelReading = LevelReading()  # what was played
    model_out: LevelReading = LevelReading()  # the model's output, even when the speaker is muted
    vad: bool = False
    vad_probability: float = 0.0
    aec_reduction_db: float | None = None  # mic dB − clean dB over the last second with far-end audio
    # text
    text_pieces: tuple[str, ...] = ()  # most recent displayable pieces (PAD/EPAD hidden)
    transcript: str = ""  # tail of the concatenated pieces
    # performance
    timings: Mapping[str, StageStats] = field(default_factory=lambda: _EMPTY)
    rtf_p50: float = 0.0
    rtf_p95: float = 0.0
    frames_per_s: float = 0.0
    text_tokens_per_s: float = 0.0  # non-pad
    all_tokens_per_s: float = 0.0  # one per frame, pad included
    latency: LatencyStats = LatencyStats()
    # stage timing mode (TUI.md §2.2): per-stage barriers on every frame (key `t`), and otherwise
    # the model's sampling of the stage split (one frame in N; 0 never; None: the model has no
    # such setting, e.g. a fake that reports a split for every frame)
    detailed_timing: bool = False
    stage_sample_every: int | None = None
    frame_path: str = ""  # the model's speed paths, e.g. "encode overlapped, depth fused"
    memory: MemoryStats = MemoryStats()
    counters: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    audio: AudioInfo = AudioInfo()
    warnings: tuple[str, ...] = ()


class Rolling:
    """A window of recent float values with cheap percentiles."""

    def __init__(self, window: int):
        self._d: deque[float] = deque(maxlen=window)
        self.session_max = 0.0
        self.count = 0

    def add(self, v: float) -> None:
        self._d.append(float(v))
        self.count += 1
        if v > self.session_max:
            self.session_max = float(v)

    def clear(self) -> None:
        self._d.clear()
        self.session_max = 0.0
        self.count = 0

    def __len__(self) -> int:
        return len(self._d)

    @property
    def last(self) -> float | None:
        return self._d[-1] if self._d else None

    def percentiles(self, *qs: float) -> list[float]:
        if not self._d:
            return [0.0 for _ in qs]
        a = np.fromiter(self._d, dtype=np.float64, count=len(self._d))
        return [float(v) for v in np.percentile(a, qs)]

    def max(self) -> float:
        return max(self._d) if self._d else 0.0


# ---------------------------------------------------------------------------------------- memory
def process_rss_mb() -> tuple[float | None, float | None]:
    """(current RSS, peak RSS) in MB, without psutil when it is not installed."""
    rss = None
    peak = None
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = ru / (1024 * 1024) if sys.platform == "darwin" else ru / 1024  # bytes on macOS, KB on Linux
    except Exception:  # noqa: BLE001
        pass
    try:
        import psutil  # type: ignore

        rss = psutil.Process().memory_info().rss / (1024 * 1024)
        return rss, peak
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        rss = pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except Exception:  # noqa: BLE001
        rss = _mach_rss_mb()
    return rss, peak


def _mach_rss_mb() -> float | None:
    """Current resident size on macOS through task_info (no psutil); None if unavailable."""
    if sys.platform != "darwin":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)

        class MachTaskBasicInfo(ctypes.Structure):
            _fields_ = [
                ("virtual_size", ctypes.c_uint64),
                ("resident_size", ctypes.c_uint64),
                ("resident_size_max", ctypes.c_uint64),
                ("user_time", ctypes.c_uint64),
                ("system_time", ctypes.c_uint64),
                ("policy", ctypes.c_int),
                ("suspend_count", ctypes.c_int),
            ]

        info = MachTaskBasicInfo()
        count = ctypes.c_uint(ctypes.sizeof(info) // 4)
        libc.mach_task_self.restype = ctypes.c_uint
        task = libc.mach_task_self()
        MACH_TASK_BASIC_INFO = 20
        kr = libc.task_info(task, MACH_TASK_BASIC_INFO, ctypes.byref(info), ctypes.byref(count))
        if kr != 0:
            return None
        return info.resident_size / (1024 * 1024)
    except Exception:  # noqa: BLE001
        return None


def memory_pressure() -> str | None:
    """macOS `kern.memorystatus_vm_pressure_level` (1 normal, 2 warn, 4 critical); None elsewhere."""
    if sys.platform != "darwin":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        val = ctypes.c_int(0)
        size = ctypes.c_size_t(ctypes.sizeof(val))
        rc = libc.sysctlbyname(b"kern.memorystatus_vm_pressure_level", ctypes.byref(val), ctypes.byref(size), None, 0)
        if rc != 0:
            return None
        return {1: "normal", 2: "warn", 4: "critical"}.get(val.value, str(val.value))
    except Exception:  # noqa: BLE001
        return None


def mlx_memory_mb() -> tuple[float, float, float] | None:
    """(active, peak, cache) MB from MLX, only if MLX is already imported; call it on the model
    thread (all MLX work stays there)."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None
    try:
        get_active = getattr(mx, "get_active_memory", None) or mx.metal.get_active_memory
        get_peak = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
        get_cache = getattr(mx, "get_cache_memory", None) or mx.metal.get_cache_memory
        mb = 1024 * 1024
        return get_active() / mb, get_peak() / mb, get_cache() / mb
    except Exception:  # noqa: BLE001
        return None


def fmt_db(v: float | None) -> str:
    if v is None or not math.isfinite(v) or v <= -119:
        return "-inf"
    return f"{v:.0f}"


def format_status_line(s: Snapshot) -> str:
    """One line for headless runs: state, frame, step p50/p95, RTF, latency, levels, drops."""
    t = s.timings.get("total") if s.timings else None
    step = f"step {t.p50:.0f}/{t.p95:.0f} ms" if t and t.count else "step -"
    lat = f"m2e {s.latency.p50_ms:.0f} ms" if s.latency.p50_ms is not None else "m2e -"
    c = s.counters
    badges = "".join(
        [
            " MUTED" if s.mic_muted else "",
            " DEAFENED" if s.speaker_muted else "",
            " BEHIND" if s.behind else "",
            " SILENT-MIC" if s.mic_silent else "",
        ]
    )
    text = s.transcript[-40:].replace("\n", " ")
    return (
        f"[{s.uptime_s:7.1f}s] {s.state.value}{badges} frame {s.frame_index} {step} RTF {s.rtf_p50:.2f} "
        f"{lat} mic {fmt_db(s.mic.rms_dbfs)} spk {fmt_db(s.speaker.rms_dbfs)} dBFS "
        f"drop {c.get('catchup_dropped_ms', 0):.0f} ms starve {c.get('out_starved_ms', 0):.0f} ms "
        f"| {text}"
    )


def now_wall() -> float:
    return time.time()
