"""Dashboard widgets and pure helpers: formatting, peak hold, the transcript buffer, meters,
themes and the key bindings (no session needed)."""

from __future__ import annotations

import asyncio
import math

import pytest
from textual.app import App, ComposeResult
from textual.binding import Binding

from themes.dashboard import ALIASES, DASHBOARD_VARIABLES, THEMES, fallback_variables, theme_name
from tui.widgets import format as fmt
from tui.widgets.meters import Lane, LevelMeter, PeakHold, VadLight
from tui.widgets.panels import LatencyView, StageBars, StageView
from tui.widgets.status import StatusStrip, StatusView
from tui.widgets.transcript import TranscriptBuffer


def test_formatters_carry_units():
    assert fmt.ms(64.2) == "64 ms"
    assert fmt.ms(2.14) == "2.1 ms"
    assert fmt.ms(1234.0) == "1.23 s"
    assert fmt.ms(None) == "– ms"
    assert fmt.gb(9.4 * 1024**3) == "9.4 GB"
    assert fmt.gb(200 * 1024**2) == "200 MB"
    assert fmt.count(9512) == "9\u202f512"
    assert fmt.clock(761) == "00:12:41"
    assert fmt.db(-24.4) == "-24"
    assert fmt.db(-120.0) == "-inf"
    assert fmt.db(float("-inf")) == "-inf"


def test_peak_hold_holds_then_falls_at_release_rate():
    now = [0.0]
    hold = PeakHold(clock=lambda: now[0])
    assert hold.update(-10.0) == -10.0
    now[0] = 1.0
    assert hold.update(-40.0) == -10.0  # still held
    now[0] = 2.5  # 1.0 s past the 1.5 s hold
    assert hold.update(-40.0) == pytest.approx(-10.0 - 11.8)
    hold.reset()
    assert hold.update(-40.0) == -40.0


def test_transcript_commits_at_sentence_end_and_after_idle():
    now = [100.0]
    buf = TranscriptBuffer(clock=lambda: now[0])
    for piece in ["Hello", " there", "."]:
        buf.add_piece(piece)
    assert [line.text for line in buf.drain()] == ["Hello there."]
    buf.add_piece(" How")
    buf.add_piece(" are")
    assert buf.live == "How are"
    now[0] += 0.5
    buf.tick()
    assert buf.drain() == []
    now[0] += 0.6
    buf.tick()
    assert [line.text for line in buf.drain()] == ["How are"]
    assert buf.live == ""


def test_transcript_marks_user_turns_once_per_stretch():
    buf = TranscriptBuffer(clock=lambda: 5.0)
    buf.add_piece("I was saying")
    buf.user_spoke()
    buf.user_spoke()  # still the same stretch: no second marker
    lines = buf.drain()
    assert [(line.kind, line.text) for line in lines] == [("model", "I was saying"),
                                                          ("you", "┄ you ┄")]
    buf.add_piece("Right.")
    buf.user_spoke()
    assert [line.kind for line in buf.drain()] == ["model", "you"]


def test_transcript_splits_very_long_lines_at_a_space():
    buf = TranscriptBuffer(clock=lambda: 0.0)
    for _ in range(100):
        buf.add_piece(" word")
    lines = buf.drain()
    assert lines and all(len(line.text) <= 240 for line in lines)
    assert not lines[0].text.endswith(" ")


def test_themes_define_the_dashboard_variables():
    assert set(ALIASES.values()) <= set(THEMES)
    for theme in THEMES.values():
        missing = [v for v in DASHBOARD_VARIABLES if v not in theme.variables]
        assert not missing, (theme.name, missing)
    assert THEMES["parley-ansi"].ansi
    for value in (THEMES["parley-ansi"].primary, *THEMES["parley-ansi"].variables.values()):
        assert value.startswith("ansi_") or value in ("initial",) or " " in value or \
            value in ("none", "underline", "bold not underline"), value
    assert theme_name(None) == "parley-dark"
    assert theme_name(None, low_colour=True) == "parley-ansi"
    assert theme_name("light") == "parley-light"
    assert theme_name("nord") == "nord"


def test_every_binding_has_an_id_and_the_required_keys_exist():
    from tui.app import ParleyApp

    bindings = [b for b in ParleyApp.BINDINGS if isinstance(b, Binding)]
    assert all(b.id for b in bindings)
    assert len({b.id for b in bindings}) == len(bindings)
    keys = {k.strip() for b in bindings for k in b.key.split(",")}
    for key in ("space", "m", "d", "p", "P", "v", "r", "R", "t", "f", "s", "1", "2", "3", "4",
                "plus", "minus", "question_mark", "q", "ctrl+c"):
        assert key in keys, key
    for key, bid in (("v", "voice-next"), ("t", "detailed-timing")):  # palette and `?` only
        binding = next(b for b in bindings if b.key == key)
        assert binding.id == bid and not binding.show and binding.tooltip
    assert "escape" not in keys  # Esc lags over SSH (TUI.md §6): nothing is bound to it
    ctrl_c = next(b for b in bindings if b.key == "ctrl+c")
    assert ctrl_c.priority
    shown = [b for b in bindings if b.show]
    assert 4 <= len(shown) <= 6


class _MeterApp(App):
    def __init__(self):
        super().__init__()
        self.now = 0.0

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return {**super().get_theme_variable_defaults(), **fallback_variables(True)}

    def compose(self) -> ComposeResult:
        yield LevelMeter("MIC", clock=lambda: self.now, id="m")
        yield VadLight(id="v")
        yield Lane("you", window_s=10.0, id="lane")
        yield StageBars(id="stages")
        yield StatusStrip(id="status")


def test_meter_lane_stage_and_status_render_real_numbers():
    asyncio.run(_meter_lane_stage_and_status())


async def _meter_lane_stage_and_status():
    app = _MeterApp()
    async with app.run_test(size=(80, 12)) as pilot:
        meter = app.query_one(LevelMeter)
        meter.set_level(-24.0, -11.0)
        await pilot.pause()
        text = meter.plain
        assert text.startswith("MIC")
        assert "-24 dBFS" in text and "pk  -11" in text
        assert "█" in text
        meter.set_level(-50.0, -45.0, muted="MUTED")
        assert "MUTED" in meter.plain
        assert "dBFS" not in meter.plain

        vad = app.query_one(VadLight)
        vad.set_active(True)
        assert "YOU" in vad.render().plain

        lane = app.query_one(Lane)
        for i in range(20):
            lane.push(i * 0.5, 1.0 if i % 4 == 0 else 0.0)
        glyphs = lane.plain
        assert "█" in glyphs and "▁" in glyphs

        stages = app.query_one(StageBars)
        stages.set_view(LatencyView(stages={
            "encode": StageView(2.1, 2.0, 2.6), "temporal": StageView(51.2, 50.8, 53.9),
            "depth": StageView(9.7, 9.5, 10.8), "decode": StageView(1.9, 1.8, 2.3),
            "total": StageView(64.9, 64.1, 71.0, 90.2, 3)}, mouth_to_ear_p50=182.0,
            mouth_to_ear_p95=205.0))
        out = stages.plain
        assert "51.2" in out and "71.0" in out and "3 frames over budget" in out and "p50 182 ms" in out
        assert "┊" in out

        strip = app.query_one(StatusStrip)
        strip.set_view(StatusView(state="SPEAKING", secondary="you too", badges=("MUTED",),
                                  model="PersonaPlex-7B q8", voice="NATF2", persona="Teacher",
                                  uptime_s=761, frame=9512, step_p50=64.0, step_p95=71.0,
                                  rtf=0.81, dropped_ms=0, glitches=0, live=True))
        plain = strip.plain
        for word in ("SPEAKING", "you too", "MUTED", "PersonaPlex-7B q8", "NATF2", "Teacher",
                     "00:12:41", "RTF", "0.81", "p50 64 ms"):
            assert word in plain, word
        assert not math.isnan(0.0)


def test_terminal_flags_and_model_label():
    from tui.dashboard_cli import configure_terminal, model_label

    env: dict = {}
    assert configure_terminal("256", environ=env) is True
    assert env["TEXTUAL_COLOR_SYSTEM"] == "256"
    env = {}
    assert configure_terminal("16", environ=env) is True and env["TEXTUAL_COLOR_SYSTEM"] == "standard"
    env = {}
    assert configure_terminal("none", environ=env) is True and env["NO_COLOR"] == "1"
    env = {}
    assert configure_terminal("auto", environ=env) is False and env == {}
    env = {}
    configure_terminal("auto", low_bandwidth=True, environ=env)
    assert env == {"TEXTUAL_COLOR_SYSTEM": "256", "TEXTUAL_ANIMATIONS": "none"}
    env = {}
    configure_terminal("truecolor", low_bandwidth=True, environ=env)
    assert env["TEXTUAL_COLOR_SYSTEM"] == "truecolor"  # an explicit choice wins
    env = {}
    configure_terminal("auto", environ=env, fps=20)
    assert env == {"TEXTUAL_FPS": "20"}
    assert model_label(None, None, None) == "PersonaPlex-7B q8"  # the engine's default
    assert model_label(None, 0, "bfloat16") == "PersonaPlex-7B bf16"
    assert model_label("tiny", None, None) == "tiny · random weights"
    assert model_label(None, 8, None) == "PersonaPlex-7B q8"
    assert model_label("nvidia/personaplex-7b-v1", 4, None) == "PersonaPlex-7B q4"
    assert model_label("/models/my-model/", None, "float32") == "my-model fp32"
    assert model_label("/m/x", None, None, random_weights=True) == "x bf16 · random weights"


def test_persona_voice_fallback_for_models_with_their_own_voices():
    from engine.personas import Persona
    from tui.dashboard_cli import resolve_voice

    p = Persona(name="Teacher", prompt="hi", voice="NATF2")
    assert resolve_voice(p, ["NATF2", "NATM0"]) is p
    assert resolve_voice(p, ["TINY0"]).voice == "TINY0"
    assert resolve_voice(p, ["TINY0", "TINY1"], "TINY1").voice == "TINY1"
    assert resolve_voice(p, []) is p
    f = Persona(name="File", prompt="hi", voice="/voices/me.wav")
    assert resolve_voice(f, ["TINY0"]) is f


def test_palette_lists_every_key_and_ctrl_c_quits():
    asyncio.run(_palette_and_ctrl_c())


async def _palette_and_ctrl_c():
    from engine.personas import Persona
    from tui.app import ParleyApp

    personas = [Persona(name="Teacher", prompt="p", voice="NATF2"),
                Persona(name="Casual", prompt="q", voice="NATM0")]
    app = ParleyApp(personas=personas, timers=False, tty_check=False)
    async with app.run_test(size=(100, 30)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for b in ParleyApp.BINDINGS:
            if b.id not in ("quit", "quit-ctrl-c"):
                assert any(t.startswith(b.description + " (") for t in titles), b.id
        assert "Theme: parley-ansi" in titles
        from tui.app import PersonaCommands

        provider = PersonaCommands(app.screen)
        hits = [hit async for hit in provider.discover()]
        assert [str(h.display) for h in hits] == ["Persona: Teacher", "Persona: Casual"]
        await pilot.press("ctrl+c")
        await pilot.pause(0.1)
    assert app.return_code == 0


def test_keymap_overrides():
    from tui.dashboard_cli import parse_keymap

    assert parse_keymap("mute-mic=M;interrupt=i,f5; bad ;x=") == {"mute-mic": "M",
                                                                  "interrupt": "i,f5"}
    assert parse_keymap("") == {}


def test_timing_panel_says_how_the_stage_split_is_measured():
    from engine.session.telemetry import Snapshot
    from tui.widgets.session_view import build_views, timing_note

    assert timing_note(Snapshot()) == ""  # a model without the switch (fakes): as before
    sampled = Snapshot(stage_sample_every=8)
    assert "sampled 1 frame in 8" in timing_note(sampled)
    detailed = Snapshot(detailed_timing=True, stage_sample_every=8)
    assert timing_note(detailed).startswith("detailed timing: every frame, costs throughput")
    assert build_views(detailed).latency.timing_note == timing_note(detailed)
    fast = Snapshot(stage_sample_every=8, frame_path="encode overlapped, depth fused")
    assert timing_note(fast) == ("stage split sampled 1 frame in 8 (t: every frame) · "
                                 "encode overlapped, depth fused")
    assert timing_note(Snapshot(frame_path="depth fused")) == "depth fused"
    asyncio.run(_timing_note_drawn(build_views(sampled).latency, build_views(detailed).latency))


async def _timing_note_drawn(sampled: LatencyView, detailed: LatencyView):
    app = _MeterApp()
    async with app.run_test(size=(80, 20)) as pilot:
        stages = app.query_one(StageBars)
        await pilot.pause()
        plain_height = stages.size.height
        stages.set_view(sampled)
        await pilot.pause()
        assert "sampled 1 frame in 8" in stages.plain
        assert stages.size.height == plain_height + 1  # one more line, laid out
        stages.set_view(detailed)
        await pilot.pause()
        assert "detailed timing: every frame" in stages.plain
        assert "sampled" not in stages.plain
        stages.set_view(LatencyView())
        await pilot.pause()
        assert stages.size.height == plain_height
