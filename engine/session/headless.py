"""`run_headless`: the live session without a dashboard, for `parley run` and scripts.

    from engine.session import run_headless
    summary = run_headless(model, input_wav="in.wav", output_wav="out.wav")   # file backend
    summary = run_headless(model, duration_s=60)                               # sound devices

With `input_wav` the session runs through the `FileBackend` (real-time pace, or as fast as
possible with `realtime=False`) and stops at the end of the input. Without it the
`SoundDeviceBackend` is used until `duration_s` elapses, `stop_event` is set or Ctrl-C (the first
Ctrl-C stops cleanly, a second one raises). A status line on stderr (or
`status_callback(snapshot)`) is produced every `status_interval_s`, and once more at the end.

`model` is a FrameModel or a zero-argument factory returning one; a factory runs on the session's
model thread, which is what a DuplexEngine needs (MLX arrays belong to the thread that made them):

    run_headless(lambda: DuplexEngine.load("tiny"), input_wav="in.wav", persona=persona)
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..audio.backends.base import AudioBackend, BackendState
from ..errors import AudioError
from .runtime import Session, SessionConfig
from .telemetry import Snapshot, format_status_line


@dataclass(frozen=True)
class HeadlessResult:
    snapshot: Snapshot  # the final telemetry
    frames: int  # model steps run
    seconds: float  # wall time of the run
    output_wav: str | None
    record_dir: str | None
    interrupted: bool  # stopped by Ctrl-C / stop_event / duration rather than end of input
    error: str | None = None  # why the model stopped (a failed prefill or step), if it did


def run_headless(
    model,
    input_wav: str | Path | None = None,
    output_wav: str | Path | None = None,
    realtime: bool = True,
    record_dir: str | Path | None = None,
    status_callback: Callable[[Snapshot], None] | None = None,
    *,
    persona: Any = None,
    persona_name: str | None = None,
    duration_s: float | None = None,
    status_interval_s: float = 1.0,
    echo_mode: str | None = None,
    input_device: int | str | None = None,
    output_device: int | str | None = None,
    config: SessionConfig | None = None,
    backend: AudioBackend | None = None,
    stop_event: threading.Event | None = None,
    loop_input: bool = False,
) -> HeadlessResult:
    """Runs one live session to completion. Raises `AudioError` when the input file cannot be
    read or no sound device can be opened (the message says why); the model is never called from
    this thread (it has its own)."""
    if backend is None:
        if input_wav is not None or (loop_input and duration_s):
            from ..audio.backends.file_backend import FileBackend

            backend = FileBackend(input_wav, output_wav, realtime=realtime, loop=loop_input, duration_s=duration_s if loop_input else None)
        else:
            from ..audio.backends.sounddevice_backend import SoundDeviceBackend

            backend = SoundDeviceBackend(input_device, output_device)
    cfg = config or SessionConfig()
    if echo_mode is not None:
        cfg.echo_mode = echo_mode
    if status_callback is None:

        def status_callback(s: Snapshot) -> None:
            print(format_status_line(s), file=sys.stderr, flush=True)

    session = Session(model, backend, persona=persona, config=cfg, record_dir=record_dir, persona_name=persona_name)
    stop = stop_event or threading.Event()
    interrupted = False
    t0 = time.monotonic()
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):  # first Ctrl-C stops cleanly; the second one raises
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()

        signal.signal(signal.SIGINT, on_sigint)
    try:
        session.start()
        st = backend.state
        if st.failed:
            session.stop()
            raise AudioError(backend.message or f"audio backend failed ({st.value})")
        next_status = time.monotonic() + status_interval_s
        while True:
            now = time.monotonic()
            if stop.is_set():
                interrupted = True
                break
            if duration_s is not None and now - t0 >= duration_s + (1.0 if loop_input else 0.0):
                interrupted = True
                break
            if backend.state is BackendState.FINISHED:
                # let the last frames come out of the model
                end = time.monotonic() + 2.0
                while session._runner.pending_count() and time.monotonic() < end:
                    time.sleep(0.02)
                break
            if backend.state is BackendState.ERROR or session.snapshot.state.value == "ERROR":
                break
            if now >= next_status:
                status_callback(session.snapshot)
                next_status = now + status_interval_s
            time.sleep(0.02)
    finally:
        final = session.stop()
        error = session.error
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    status_callback(final)
    if backend.state is BackendState.ERROR:
        raise AudioError(backend.message)
    return HeadlessResult(
        snapshot=final,
        frames=final.frame_index,
        seconds=time.monotonic() - t0,
        output_wav=str(output_wav) if output_wav is not None else None,
        record_dir=str(record_dir) if record_dir is not None else None,
        interrupted=interrupted,
        error=error,
    )
