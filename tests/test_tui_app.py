"""Pilot tests of the dashboard driving a real `Session` over the tiny PersonaPlex model.

The session reads the fixture's input.wav through the file backend at real-time pace (looped), so
the meters, timings and text are real numbers from the engine's snapshot. Every binding is checked
against what the session actually did (frame listener records, counters, events), not just the UI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.personas import Persona
from tests.conftest import TINY_DIR
from tui.app import ParleyApp, PRESETS
from tui.dashboard_cli import resolve_voice
from tui.screens import HelpScreen, PersonaPicker
from tui.widgets import AudioPanel, LevelMeter, StatusStrip, Transcript
from tui.widgets.panels import EngineStats, StageBars

pytestmark = pytest.mark.slow

PERSONAS = [
    Persona(name="Teacher", prompt="You are a wise and friendly teacher. Answer questions.",
            voice="NATF2"),
    Persona(name="Casual", prompt="You enjoy having a good conversation.", voice="NATM0"),
    Persona(name="Bank", prompt="You work for First Neuron Bank and your name is Alexis Kim.",
            voice="VARF0"),
]


class FrameLog:
    """Keeps what the session did to each frame (a real `Session` frame listener)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.records = []

    def __call__(self, rec) -> None:
        with self.lock:
            self.records.append(rec)
            del self.records[:-400]

    def last(self) -> int:
        with self.lock:
            return self.records[-1].index if self.records else -1

    def since(self, index: int):
        with self.lock:
            return [r for r in self.records if r.index >= index]


@pytest.fixture(autouse=True)
def quick_keys(monkeypatch):
    """Pilot waits for the process to go idle after each key (up to 2 s); the engine thread keeps
    it busy on purpose, so the tests wait for explicit conditions instead."""
    async def short_idle(min_sleep: float = 0.0, max_sleep: float = 1.0) -> None:
        await asyncio.sleep(0.02)

    monkeypatch.setattr("textual.app.wait_for_idle", short_idle)
    monkeypatch.setattr("textual.pilot.wait_for_idle", short_idle)


@pytest.fixture
def engine():
    """A factory: the session builds the model on its own model thread (MLX arrays belong to the
    thread that made them), exactly as the dashboard does."""
    from engine.duplex import DuplexEngine

    return lambda: DuplexEngine.load(str(TINY_DIR), dtype="float32", seed=7)


def make_session(engine, *, duration_s: float = 120.0):
    from engine.audio.backends import FileBackend
    from engine.session import Session
    from engine.voices import list_voices

    voices = list(list_voices(TINY_DIR))
    resolver = lambda p: resolve_voice(p, voices)  # noqa: E731
    backend = FileBackend(input_wav=TINY_DIR / "input.wav", output_wav=None, realtime=True,
                          loop=True, duration_s=duration_s)
    session = Session(engine, backend, resolver(PERSONAS[0]), persona_name="Teacher")
    frames = FrameLog()
    session.add_frame_listener(frames)
    return session, resolver, frames


async def wait_for(pilot, predicate, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def strip_text(app) -> str:
    return app.dashboard.query_one(StatusStrip).plain


def test_every_binding_changes_the_session(engine, tmp_path):
    asyncio.run(_every_binding(engine, tmp_path))


async def _every_binding(engine, tmp_path: Path):
    session, resolver, frames = make_session(engine)
    session.start()
    app = ParleyApp(session=session, personas=PERSONAS, persona="Teacher",
                    model_label="personaplex-tiny fp32", persona_resolver=resolver,
                    save_dir=str(tmp_path / "saved"), tty_check=False)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            # live numbers from the engine's snapshot reach every panel
            await wait_for(pilot, lambda: session.snapshot.frame_index > 12, what="12 frames")
            await pilot.pause(0.6)
            snap = session.snapshot
            strip = strip_text(app)
            assert "Teacher" in strip and "personaplex-tiny fp32" in strip
            assert any(w in strip for w in ("LISTENING", "SPEAKING")), strip
            assert "frame" in strip and "p50" in strip and "RTF" in strip
            mic = app.dashboard.query_one("#meter-mic", LevelMeter)
            assert -120 < mic.level_db <= 0 and "dBFS" in mic.plain  # a real level, drawn
            assert f"{mic.level_db:.0f} dBFS" in mic.plain or "-inf" in mic.plain
            bars = app.dashboard.query_one(StageBars)
            shown = bars.view.stages["total"]
            assert shown.p50 > 0 and f"{shown.p50:.1f}" in bars.plain
            assert abs(shown.p50 - snap.timings["total"].p50) < 40  # from the engine's window
            assert "mouth→ear p50" in bars.plain
            engine_text = app.dashboard.query_one(EngineStats).plain
            assert "frames/s" in engine_text and "tok/s" in engine_text
            assert app.dashboard.query_one(EngineStats).view.frames_per_s > 5

            # m: MUTED on the strip, and the model hears exact zeros
            await pilot.press("m")
            assert session.mic_muted
            await pilot.pause(0.3)
            assert "MUTED" in strip_text(app)
            assert "MUTED" in mic.plain
            start = frames.last() + 3  # frames already on their way may predate the mute
            await wait_for(pilot, lambda: len([r for r in frames.since(start)
                                               if r.result is not None]) >= 4,
                           what="frames while muted")
            muted = [r for r in frames.since(start) if r.result is not None]
            assert all(not np.any(r.model_in) for r in muted)
            assert any(np.any(r.mic) for r in muted)  # the mic itself still had sound
            await pilot.press("m")
            assert not session.mic_muted
            await pilot.pause(0.3)
            assert "MUTED" not in strip_text(app)

            # d: DEAFENED, the model keeps running
            before = session.snapshot.frame_index
            await pilot.press("d")
            assert session.speaker_muted
            await pilot.pause(0.4)
            assert "DEAFENED" in strip_text(app)
            assert session.snapshot.frame_index > before
            await pilot.press("d")
            assert not session.speaker_muted

            # a: the echo mode cycles
            mode = session.echo_mode
            await pilot.press("a")
            await wait_for(pilot, lambda: session.echo_mode != mode, what="the next echo mode")

            # space: interrupt flushes the queued output and forces silence for a few steps
            interrupts = session.counters["interrupts"]
            mark = frames.last()
            await pilot.press("space")
            assert session.counters["interrupts"] == interrupts + 1
            await wait_for(pilot, lambda: len([r for r in frames.since(mark)
                                               if r.forced and r.result is not None]) >= 3,
                           what="forced-silence steps")
            forced = [r for r in frames.since(mark) if r.forced and r.result is not None]
            # the text channel is emitted one step late: from the second forced step on, PAD
            assert all(r.result.text is None for r in forced[1:])
            assert session.all_counters()["out_flushed_ms"] >= 0

            # p / P: next and previous persona: the strip and the prefill change
            await pilot.press("p")
            assert "Casual" in strip_text(app)
            await wait_for(pilot, lambda: session.snapshot.persona == "Casual"
                           and not session.snapshot.prompting, what="the Casual prefill")
            assert session.model.persona.name == "Casual"
            assert session.model.persona.prompt == PERSONAS[1].prompt
            await pilot.pause(0.4)
            assert "Casual" in strip_text(app)
            await pilot.press("P")
            await wait_for(pilot, lambda: session.snapshot.persona == "Teacher"
                           and not session.snapshot.prompting, what="back to Teacher")
            assert session.model.persona.prompt == PERSONAS[0].prompt

            # r: peaks and statistics reset
            count_before = session.snapshot.timings["total"].count
            await pilot.press("r")
            await wait_for(pilot, lambda: session.snapshot.timings.get("total") is None
                           or session.snapshot.timings["total"].count < count_before,
                           what="statistics reset")

            # R: new conversation, confirmed by a second press
            resets = session.counters["resets"]
            await pilot.press("R")
            await pilot.pause(0.05)
            assert session.counters["resets"] == resets
            await pilot.press("R")
            await wait_for(pilot, lambda: session.counters["resets"] == resets + 1,
                           what="the reset")

            # f: the display freezes while the engine keeps running
            await pilot.press("f")
            await pilot.pause(0.2)
            frozen = strip_text(app)
            assert "FROZEN" in frozen
            frame_then = session.snapshot.frame_index
            await pilot.pause(0.8)
            assert strip_text(app) == frozen
            assert session.snapshot.frame_index > frame_then
            await pilot.press("f")
            await pilot.pause(0.4)
            assert "FROZEN" not in strip_text(app)

            # s: the session is saved
            await pilot.press("s")
            await wait_for(pilot, lambda: any((tmp_path / "saved").glob("transcript-*.txt")),
                           what="the saved transcript")
            assert any((tmp_path / "saved").glob("ui-events-*.jsonl"))
            assert any((tmp_path / "saved").glob("stats-*.json"))

            # 1-4: panels; + / -: refresh presets
            for key, box in (("1", "#audio-box"), ("2", "#text-box"), ("3", "#timing-box"),
                             ("4", "#engine-box")):
                widget = app.dashboard.query_one(box)
                await pilot.press(key)
                assert widget.has_class("-hidden"), key
                await pilot.press(key)
                assert not widget.has_class("-hidden"), key
            preset = app.preset_index
            await pilot.press("minus")
            assert app.preset_index == preset - 1
            await pilot.press("plus")
            assert app.preset_index == preset
            assert PRESETS[app.preset_index].meters_hz == 30

            # ?: help lists every key; Esc closes it (Esc is only ever "close")
            await pilot.press("question_mark")
            await pilot.pause(0.1)
            assert isinstance(app.screen, HelpScreen)
            keys = " ".join(row[0] for row in app.screen.rows)
            for key in ("space", "m", "d", "p", "P", "r", "R", "f", "s", "1", "4", "+", "-",
                        "?", "q", "ctrl+c"):
                assert key in keys.split(", ") or key in keys, key
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, HelpScreen)

            # ctrl+p: the palette offers "Persona: ..." entries
            await pilot.press("ctrl+p")
            await pilot.pause(0.2)
            for ch in "Persona: Bank":
                await pilot.press("space" if ch == " " else ch)
            await pilot.pause(0.5)
            await pilot.press("enter")
            await wait_for(pilot, lambda: session.snapshot.persona == "Bank"
                           and not session.snapshot.prompting and session.model.persona.name == "Bank",
                           what="the palette's persona switch")
            assert session.model.persona.prompt == PERSONAS[2].prompt

            # the persona picker shows each persona's prompt and voice
            await pilot.press("o")
            await pilot.pause(0.2)
            assert isinstance(app.screen, PersonaPicker)
            preview = str(app.screen.query_one("#preview").render())
            assert "voice" in preview
            await pilot.press("escape")
            await pilot.pause(0.1)

            # q quits with status 0
            await pilot.press("q")
            await pilot.pause(0.2)
        assert app.return_code == 0
    finally:
        session.stop()


def test_loading_shows_progress_then_the_session_and_errors_become_a_banner(engine):
    asyncio.run(_loading(engine))


async def _loading(engine):
    from engine.errors import ModelError

    session, resolver, _ = make_session(engine, duration_s=30.0)
    gate = threading.Event()

    def starter(progress):
        progress("loading the weights", None)
        gate.wait(5)
        session.start()
        return session

    app = ParleyApp(starter=starter, personas=PERSONAS, persona="Teacher", model_label="tiny",
                    persona_resolver=resolver, tty_check=False)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            t0 = time.monotonic()
            await wait_for(pilot, lambda: "LOADING" in strip_text(app), timeout=1.0,
                           what="LOADING on screen")
            assert time.monotonic() - t0 < 1.0
            assert "loading the weights" in strip_text(app)
            await pilot.press("m")  # no session yet: a hint, no crash
            gate.set()
            await wait_for(pilot, lambda: app.link is not None, what="the session")
            await wait_for(pilot, lambda: session.snapshot.frame_index > 3, what="frames")
            await pilot.pause(0.5)
            assert "LOADING" not in strip_text(app)
    finally:
        session.stop()

    def failing(progress):
        raise ModelError("Model directory /nope does not exist; pass an existing model "
                         "directory or a Hugging Face repo id such as nvidia/personaplex-7b-v1.")

    app = ParleyApp(starter=failing, personas=PERSONAS, tty_check=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.failed, what="the failure")
        await pilot.pause(0.1)
        banner = app.dashboard.query_one("#banner")
        assert banner.has_class("-shown")
        text = str(banner.render())
        assert "does not exist; pass an existing model directory" in text
        assert "Traceback" not in text
        assert "ERROR" in strip_text(app)

    def buggy(progress):
        raise KeyError("oops")

    app = ParleyApp(starter=buggy, personas=PERSONAS, tty_check=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.failed, what="the failure")
        await pilot.pause(0.1)
        text = str(app.dashboard.query_one("#banner").render())
        assert "PARLEY_DEBUG=1" in text and "Traceback" not in text


def test_compact_layout_turns_timing_and_engine_into_tabs(engine):
    asyncio.run(_compact(engine))


async def _compact(engine):
    session, resolver, _ = make_session(engine, duration_s=30.0)
    session.start()
    app = ParleyApp(session=session, personas=PERSONAS, persona="Teacher", model_label="tiny",
                    persona_resolver=resolver, tty_check=False)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: session.snapshot.frame_index > 5, what="frames")
            await pilot.pause(0.3)
            screen = app.dashboard
            assert screen.has_class("-compact")
            assert screen.query_one("#text-box").region.height > 0
            assert screen.query_one("#timing-box").region.height == 0
            await pilot.press("3")
            await pilot.pause(0.3)
            assert screen.query_one("#timing-box").region.height > 5
            assert screen.query_one("#text-box").region.height == 0
            assert "total" in screen.query_one(StageBars).plain
            await pilot.press("4")
            await pilot.pause(0.3)
            assert screen.query_one("#engine-box").region.height > 5
            await pilot.press("2")
            await pilot.pause(0.3)
            assert screen.query_one("#text-box").region.height > 5
            # the meters stay on screen in every tab
            assert screen.query_one(AudioPanel).region.height >= 3
            await pilot.resize_terminal(120, 40)
            await pilot.pause(0.3)
            assert not screen.has_class("-compact")
            assert screen.query_one("#timing-box").region.height > 5
    finally:
        session.stop()


def test_ui_frame_time_while_the_engine_runs(engine, capsys):
    asyncio.run(_frame_time(engine, capsys))


async def _frame_time(engine, capsys):
    session, resolver, _ = make_session(engine, duration_s=30.0)
    session.start()
    app = ParleyApp(session=session, personas=PERSONAS, persona="Teacher", model_label="tiny",
                    persona_resolver=resolver, tty_check=False, probe=True)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: session.snapshot.frame_index > 10, what="frames")
            await pilot.pause(1.0)
            for samples in (app.render_ms, app.render_cpu_ms, app.loop_lag_ms, app.ui_frame_ms):
                samples.clear()
            frames0 = session.snapshot.frame_index
            await pilot.pause(5.0)
            report = app.probe_report()
            report["engine_frames"] = session.snapshot.frame_index - frames0
            assert report["engine_frames"] >= 15  # the engine really ran meanwhile
    finally:
        session.stop()
    with capsys.disabled():
        print(f"\nUI frame time while the engine runs (120x40, normal preset): {report}")
    render = report["render_ms"]
    cpu = report["render_cpu_ms"]
    assert render["n"] >= 50  # ~30 frames a second were drawn
    assert cpu["p95"] < 20.0, report  # the UI thread's own work per frame
    assert render["p50"] < 20.0, report
    assert report["callbacks_ms"]["p95"] < 20.0, report


def test_silent_mic_hint_and_terminal_loss(monkeypatch):
    asyncio.run(_silent_and_tty(monkeypatch))


async def _silent_and_tty(monkeypatch):
    from tests.test_tui_snapshots import fixed_snapshot

    app = ParleyApp(personas=PERSONAS, timers=False, tty_check=False)
    async with app.run_test(size=(120, 40)) as pilot:
        app.show_snapshot(dataclasses.replace(fixed_snapshot(0, 1), mic_silent=True))
        await pilot.pause()
        panel = app.dashboard.query_one(AudioPanel)
        assert panel.has_class("-silent-mic")
        hint = str(panel.query_one("#silent-hint").render())
        assert "digital silence" in hint and "permission" in hint
        assert "SILENT MIC" in strip_text(app)
        app.show_snapshot(fixed_snapshot(1, 2))
        await pilot.pause()
        assert not panel.has_class("-silent-mic")

        # the terminal goes away: a clean exit, not a spin
        monkeypatch.setattr("os.isatty", lambda fd: False)
        app._check_terminal()
        await pilot.pause(0.1)
    assert app.exit_reason == "terminal closed"
    assert app.return_code == 0


def test_transcript_marks_the_users_turns(engine):
    asyncio.run(_transcript(engine))


async def _transcript(engine):
    session, resolver, _ = make_session(engine, duration_s=30.0)
    session.start()
    app = ParleyApp(session=session, personas=PERSONAS, persona="Teacher", model_label="tiny",
                    persona_resolver=resolver, tty_check=False)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            transcript = app.dashboard.query_one(Transcript)
            await wait_for(pilot, lambda: transcript.buffer.pieces > 5, timeout=15,
                           what="streaming text")
            await wait_for(pilot, lambda: any("┄ you ┄" in line
                                              for line in transcript.committed_text),
                           timeout=15, what="a user-turn marker")
            assert transcript.live_text or transcript.committed_text
    finally:
        session.stop()


def tiny_with_voices(tmp_path: Path, extra=("TINY1", "TINY2")) -> Path:
    """A copy of the tiny model with more voices (copies of TINY0's stored prompt)."""
    import shutil

    target = tmp_path / "personaplex-tiny"
    shutil.copytree(TINY_DIR, target, ignore=shutil.ignore_patterns("reference"))
    for name in extra:
        shutil.copy(target / "voices" / "TINY0.pt", target / "voices" / f"{name}.pt")
    return target


def make_session_in(model_dir: Path, *, duration_s: float = 60.0):
    from engine.audio.backends import FileBackend
    from engine.duplex import DuplexEngine
    from engine.session import Session
    from engine.voices import list_voices

    voices = list(list_voices(model_dir))
    resolver = lambda p: resolve_voice(p, voices)  # noqa: E731
    backend = FileBackend(input_wav=TINY_DIR / "input.wav", output_wav=None, realtime=True,
                          loop=True, duration_s=duration_s)
    session = Session(lambda: DuplexEngine.load(str(model_dir), dtype="float32", seed=7),
                      backend, resolver(PERSONAS[0]), persona_name="Teacher")
    return session, resolver


def record_notifications(app) -> list[str]:
    seen: list[str] = []
    notify = app.notify

    def recording(message, *args, **kwargs):
        seen.append(str(message))
        return notify(message, *args, **kwargs)

    app.notify = recording
    return seen


def _teacher_app(session, resolver) -> ParleyApp:
    return ParleyApp(session=session, personas=PERSONAS, persona="Teacher", model_label="tiny",
                     persona_resolver=resolver, tty_check=False)


async def _settled(pilot, session) -> None:
    """Waits for the session's first frames after its prompt."""
    await wait_for(pilot, lambda: session.model is not None
                   and session.snapshot.frame_index > 3 and not session.snapshot.prompting,
                   what="the first frames")


def test_v_switches_to_the_next_voice_and_keeps_the_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr("tui.app.PERSONA_DEBOUNCE_S", 0.4)  # slow machines: presses stay a run
    asyncio.run(_next_voice(tmp_path))


async def _next_voice(tmp_path: Path):
    session, resolver = make_session_in(tiny_with_voices(tmp_path))
    session.start()
    app = _teacher_app(session, resolver)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await _settled(pilot, session)
            assert session.model.available_voices() == ["TINY0", "TINY1", "TINY2"]
            assert session.model.persona.voice == "TINY0"
            switches = session.counters["persona_switches"]

            # v: the next voice in the model's order, the same persona and prompt
            await pilot.press("v")
            await wait_for(pilot, lambda: session.model.persona.voice == "TINY1"
                           and not session.snapshot.prompting, what="the TINY1 prefill")
            running = session.model.persona
            assert running.name == "Teacher" and running.prompt == PERSONAS[0].prompt
            assert dataclasses.replace(running, voice="NATF2") == PERSONAS[0]  # nothing else moved
            assert session.counters["persona_switches"] == switches + 1
            await pilot.pause(0.4)
            assert "TINY1" in strip_text(app) and "Teacher" in strip_text(app)
            assert app.voice_map["Teacher"] == "TINY1"

            # a quick run of presses switches once, to where the user stopped (wrapping round)
            await pilot.press("v")
            await pilot.press("v")
            await wait_for(pilot, lambda: session.model.persona.voice == "TINY0"
                           and not session.snapshot.prompting, what="the TINY0 prefill")
            await pilot.pause(0.6)
            assert session.counters["persona_switches"] == switches + 2
            assert session.model.persona.prompt == PERSONAS[0].prompt
            assert "TINY0" in strip_text(app)

            # ?: the help lists both new keys
            await pilot.press("question_mark")
            await pilot.pause(0.1)
            assert isinstance(app.screen, HelpScreen)
            rows = {row[0]: row for row in app.screen.rows}
            assert "Next voice" in rows["v"][1] and "[voice-next]" in rows["v"][2]
            assert "Detailed timing" in rows["t"][1] and "[detailed-timing]" in rows["t"][2]
            await pilot.press("escape")
    finally:
        session.stop()


def test_v_with_a_single_voice_model_only_says_so(engine):
    asyncio.run(_single_voice(engine))


async def _single_voice(engine):
    session, resolver, _ = make_session(engine, duration_s=30.0)
    session.start()
    app = _teacher_app(session, resolver)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await _settled(pilot, session)
            assert session.model.available_voices() == ["TINY0"]
            seen = record_notifications(app)
            switches = session.counters["persona_switches"]
            before = session.model.persona
            await pilot.press("v")
            await pilot.pause(0.5)
            assert any("only one voice" in m for m in seen), seen
            assert session.counters["persona_switches"] == switches
            assert session.model.persona is before and session.persona.voice == "TINY0"
            assert not session.snapshot.prompting
            assert app.voice_map["Teacher"] == "NATF2"  # the dashboard shows no change
    finally:
        session.stop()


def test_t_toggles_detailed_per_stage_timing(engine):
    asyncio.run(_detailed_timing(engine))


async def _detailed_timing(engine):
    session, resolver, frames = make_session(engine, duration_s=30.0)
    session.start()
    app = _teacher_app(session, resolver)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            bars = app.dashboard.query_one(StageBars)
            await wait_for(pilot, lambda: session.model is not None
                           and session.snapshot.frame_index > 3, what="the first frames")
            await wait_for(pilot, lambda: "sampled 1 frame in 8" in bars.plain,
                           what="the sampled-split label")
            assert session.model.profile_stages is False
            assert "detailed timing" not in bars.plain
            seen = record_notifications(app)

            await pilot.press("t")
            await wait_for(pilot, lambda: session.model.profile_stages is True
                           and session.snapshot.detailed_timing, what="barriers every frame")
            await wait_for(pilot, lambda: "detailed timing: every frame, costs throughput"
                           in bars.plain, what="the detailed-timing label")
            assert "sampled 1 frame" not in bars.plain
            assert any("Detailed timing on" in m for m in seen), seen
            mark = frames.last() + 2
            await wait_for(pilot, lambda: len([r for r in frames.since(mark)
                                               if r.result is not None]) >= 10,
                           what="frames with detailed timing")
            split = [r for r in frames.since(mark) if r.result is not None]
            assert all("encode" in r.result.timings_ms and "depth" in r.result.timings_ms
                       for r in split)

            await pilot.press("t")
            await wait_for(pilot, lambda: session.model.profile_stages is False
                           and not session.snapshot.detailed_timing, what="barriers off")
            await wait_for(pilot, lambda: "sampled 1 frame in 8" in bars.plain,
                           what="the sampled-split label again")
            assert "detailed timing" not in bars.plain
            assert any("Detailed timing off" in m and "1 frame in 8" in m for m in seen), seen
    finally:
        session.stop()


def test_a_refresh_tick_after_the_screens_are_gone_does_nothing():
    """Timers can fire once more while the app shuts down, after its screen stack is emptied: the
    tick is skipped (it used to fail on the missing dashboard, then again reporting that)."""
    app = ParleyApp(starter=lambda: None, personas=PERSONAS, tty_check=False)
    assert not app.screen_stack
    ran = []
    app._timed(lambda: ran.append(app.dashboard))
    assert ran == [] and app.ui_frame_ms == []
