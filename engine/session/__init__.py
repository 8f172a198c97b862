"""The live duplex session: threads, policies, controls, telemetry and recording.

Public API:
* `Session(model, backend, persona=None, config=None, *, threaded=True, record_dir=None)` — see
  `runtime.py` for the controls;
* `SessionConfig` — policies and tunables;
* `Snapshot`, `SessionState`, `SessionEvent`, `EventKind` — telemetry for front ends;
* `run_headless(model, input_wav=None, output_wav=None, realtime=True, record_dir=None,
  status_callback=None, ...)` — what `parley run` calls;
* `ToneFrameModel` (in `engine.session.fakes`) — a deterministic stand-in model.
"""

from .headless import HeadlessResult, run_headless
from .runtime import FrameRecord, Session, SessionConfig
from .telemetry import (
    AudioInfo,
    EventKind,
    EventStream,
    LatencyStats,
    MemoryStats,
    SessionEvent,
    SessionState,
    Snapshot,
    StageStats,
    format_status_line,
)

__all__ = [
    "AudioInfo",
    "EventKind",
    "EventStream",
    "FrameRecord",
    "HeadlessResult",
    "LatencyStats",
    "MemoryStats",
    "Session",
    "SessionConfig",
    "SessionEvent",
    "SessionState",
    "Snapshot",
    "StageStats",
    "format_status_line",
    "run_headless",
]
