"""The Parley dashboard: a Textual app that shows a live duplex session and drives its controls.

Data path (TUI.md §5.1): the session publishes an immutable telemetry snapshot and an event
stream. The UI never waits on the engine and the engine never waits on the UI:

* one `set_interval` per rate class reads the latest snapshot (meters 30 Hz, graphs and text
  8 Hz, numbers 4 Hz, slow facts 1 Hz; `+` / `-` and `--low-bandwidth` pick other presets);
* discrete events (text pieces, state changes, errors) are drained from the session's event
  stream at the text rate, so a burst of pieces costs one redraw;
* controls (mute, interrupt, persona, voice, reset, pause, detailed timing) are the session's
  non-blocking commands (it queues them for its engine thread; prefills and the timing switch
  run on its model thread); saving files runs in a thread worker;
* the model is loaded in a thread worker, so the dashboard is on screen at once and shows the
  loading progress; any failure becomes a banner that says the fix, never a traceback.

`tui.widgets.session_view` is the only place that knows the session's method and field names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState, get_current_worker

from themes.dashboard import THEMES, fallback_variables, theme_name
from tui.screens import ErrorBanner, ErrorScreen, HelpScreen, PersonaPicker
from tui.screens.personas import persona_name, persona_voice
from tui.widgets import (AudioPanel, EnginePanel, LatencyPanel, StatusStrip, StatusView,
                         Transcript)
from tui.widgets.session_view import SessionLink, Views, build_views

# ---------------------------------------------------------------------------------------------
# Refresh presets (TUI.md §4)


@dataclass(frozen=True)
class RefreshPreset:
    name: str
    meters_hz: float
    graphs_hz: float
    numbers_hz: float


PRESETS: tuple[RefreshPreset, ...] = (
    RefreshPreset("slow", 5.0, 1.0, 1.0),
    RefreshPreset("low-bandwidth", 15.0, 2.0, 2.0),
    RefreshPreset("normal", 30.0, 8.0, 4.0),
)
PRESET_NAMES = tuple(p.name for p in PRESETS)
SLOW_HZ = 1.0
TTY_CHECK_S = 3.0
COMPACT_WIDTH = 100
COMPACT_HEIGHT = 30
PERSONA_DEBOUNCE_S = 0.08
CONFIRM_S = 2.0

PANELS = {1: "audio", 2: "text", 3: "timing", 4: "engine"}
PANEL_TITLES = {"audio": "Audio", "text": "Model text", "timing": "Frame timing",
                "engine": "Engine"}


# ---------------------------------------------------------------------------------------------
# Messages from worker threads (post_message is thread-safe and never blocks)


class LoadProgress(Message):
    def __init__(self, text: str, fraction: float | None = None):
        super().__init__()
        self.text = text
        self.fraction = fraction


class SessionReady(Message):
    def __init__(self, session: Any):
        super().__init__()
        self.session = session


class SessionFailed(Message):
    def __init__(self, message: str, details: str | None = None):
        super().__init__()
        self.message = message
        self.details = details


class Notice(Message):
    """A one-line result of a background action (saved files, persona switched)."""

    def __init__(self, text: str, *, error: bool = False):
        super().__init__()
        self.text = text
        self.error = error


class LoadCancelled(Exception):
    """Raised from the progress callback when the user quit while the model was loading."""


# ---------------------------------------------------------------------------------------------
# Command palette providers


class PersonaCommands(Provider):
    """"Persona: <name>" entries that switch straight to a persona."""

    async def discover(self) -> Hits:
        app = self.app
        assert isinstance(app, ParleyApp)
        for p in app.personas:
            name = persona_name(p)
            yield DiscoveryHit(f"Persona: {name}", _partial(app.switch_persona, name),
                               help=f"voice {persona_voice(p)} · {getattr(p, 'description', '')}")

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, ParleyApp)
        matcher = self.matcher(query)
        for p in app.personas:
            name = persona_name(p)
            title = f"Persona: {name}"
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), _partial(app.switch_persona, name),
                          help=f"voice {persona_voice(p)} · {getattr(p, 'description', '')}")


class RefreshCommands(Provider):
    """"Refresh: <preset>" entries."""

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, ParleyApp)
        matcher = self.matcher(query)
        for i, preset in enumerate(PRESETS):
            title = f"Refresh: {preset.name}"
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), _partial(app.set_preset, i),
                          help=f"meters {preset.meters_hz:g} Hz, graphs {preset.graphs_hz:g} Hz, "
                               f"numbers {preset.numbers_hz:g} Hz")


def _partial(fn: Callable, *args: Any) -> Callable[[], Any]:
    def call() -> Any:
        return fn(*args)

    return call


# ---------------------------------------------------------------------------------------------
# The main screen


class Dashboard(Screen):
    """Status strip, error banner, the four panels and the footer."""

    def compose(self) -> ComposeResult:
        app = self.app
        assert isinstance(app, ParleyApp)
        yield StatusStrip(id="status")
        yield ErrorBanner(id="banner")
        yield Static("", id="tabs")
        with Vertical(id="body"):
            with Horizontal(id="top"):
                with Vertical(id="audio-box", classes="panel"):
                    yield AudioPanel(clock=app.monotonic, id="audio")
                with Vertical(id="text-box", classes="panel"):
                    yield Transcript(clock=app.clock, id="text")
            with Horizontal(id="bottom"):
                with Vertical(id="timing-box", classes="panel"):
                    yield LatencyPanel(id="timing")
                with Vertical(id="engine-box", classes="panel"):
                    yield EnginePanel(id="engine")
        yield Footer(compact=False, id="footer")

    def _on_timer_update(self) -> None:  # one screen frame: layout + compositor + write
        app = self.app
        if not getattr(app, "probe", False):
            super()._on_timer_update()
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        super()._on_timer_update()
        app.render_ms.append((time.perf_counter() - t0) * 1000.0)
        app.render_cpu_ms.append((time.thread_time() - c0) * 1000.0)

    def on_mount(self) -> None:
        for number, key in PANELS.items():
            self.query_one(f"#{key}-box").border_title = f"{number} {PANEL_TITLES[key]}"
        app = self.app
        assert isinstance(app, ParleyApp)
        app._apply_layout(self.size.width, self.size.height)
        app._render_status()
        for warning in app.startup_warnings:  # e.g. a persona file that could not be read
            app._show_error(warning, warning=True)


# ---------------------------------------------------------------------------------------------
# The app


class ParleyApp(App[int]):
    """The dashboard.

    Give it either a running `session`, or a `starter(progress) -> session` that loads the model
    and starts the session; the starter runs in a thread worker while the dashboard is already
    on screen, and may call `progress(text, fraction)` (thread-safe) as often as it likes.
    """

    TITLE = "Parley"
    CSS_PATH = "dashboard.tcss"
    ENABLE_COMMAND_PALETTE = True
    COMMANDS = App.COMMANDS | {PersonaCommands, RefreshCommands}

    BINDINGS = [
        Binding("space", "interrupt", "Interrupt", id="interrupt",
                tooltip="Cut the model off: flush its queued audio and force silence briefly"),
        Binding("m", "toggle_mic", "Mute", id="mute-mic",
                tooltip="Mute the microphone: the model is fed digital silence"),
        Binding("d", "toggle_speaker", "Deafen", id="mute-speaker",
                tooltip="Mute the speaker; the model keeps running"),
        Binding("p", "next_persona", "Persona", id="persona-next",
                tooltip="Next persona (reset + prefill)"),
        Binding("P", "previous_persona", "Prev persona", id="persona-previous", show=False,
                tooltip="Previous persona (reset + prefill)"),
        Binding("o", "pick_persona", "Personas…", id="persona-picker", show=False,
                tooltip="Choose a persona, with its prompt and voice"),
        Binding("v", "next_voice", "Next voice", id="voice-next", show=False,
                tooltip="Next voice of the model, keeping the persona's prompt (reset + prefill)"),
        Binding("r", "reset_stats", "Reset peaks", id="reset-stats", show=False,
                tooltip="Reset peak holds, p50/p95 statistics and the MLX peak memory"),
        Binding("R", "new_conversation", "New conversation", id="new-conversation", show=False,
                tooltip="Reset the conversation and prefill the same persona (press twice)"),
        Binding("a", "echo_mode", "Echo mode", id="echo-mode", show=False,
                tooltip="Cycle echo handling: AEC, headphones (off), mic gate"),
        Binding("t", "detailed_timing", "Detailed timing", id="detailed-timing", show=False,
                tooltip="Per-stage timing on every frame on/off (its extra barriers cost "
                        "throughput)"),
        Binding("z", "pause", "Pause", id="pause", show=False,
                tooltip="Pause or resume the session"),
        Binding("f", "freeze", "Freeze", id="freeze", show=False,
                tooltip="Freeze the display; the engine keeps running"),
        Binding("s", "save", "Save", id="save", show=False,
                tooltip="Save the session: text, events and the recording so far"),
        Binding("c", "clear_text", "Clear text", id="clear-text", show=False,
                tooltip="Clear the text view (not the saved history)"),
        Binding("1", "panel(1)", "Audio", id="panel-audio", show=False,
                tooltip="Show or hide the audio panel"),
        Binding("2", "panel(2)", "Text", id="panel-text", show=False,
                tooltip="Show or hide the model text (a tab on small terminals)"),
        Binding("3", "panel(3)", "Timing", id="panel-timing", show=False,
                tooltip="Show or hide frame timing (a tab on small terminals)"),
        Binding("4", "panel(4)", "Engine", id="panel-engine", show=False,
                tooltip="Show or hide the engine panel (a tab on small terminals)"),
        Binding("plus,equals_sign", "refresh_rate(1)", "Faster", id="refresh-up", show=False,
                tooltip="Raise the refresh preset"),
        Binding("minus", "refresh_rate(-1)", "Slower", id="refresh-down", show=False,
                tooltip="Lower the refresh preset"),
        Binding("e", "show_errors", "Errors", id="errors", show=False,
                tooltip="Show the latest errors"),
        Binding("x", "dismiss_error", "Dismiss", id="dismiss-error", show=False,
                tooltip="Dismiss the error banner"),
        Binding("question_mark,f1", "help", "Help", id="help", key_display="?",
                tooltip="Every key"),
        Binding("q", "quit", "Quit", id="quit", tooltip="Quit Parley"),
        Binding("ctrl+c", "quit", "Quit", id="quit-ctrl-c", show=False, priority=True,
                tooltip="Quit Parley"),
    ]

    def __init__(self, *, session: Any = None, starter: Callable[[Callable], Any] | None = None,
                 personas: Sequence[Any] = (), persona: str | None = None,
                 model_label: str = "", theme: str | None = None, preset: str = "normal",
                 low_colour: bool = False, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, timers: bool = True,
                 tty_check: bool = True, save_dir: str | None = None, probe: bool = False,
                 persona_resolver: Callable[[Any], Any] | None = None,
                 on_model_ready: Callable[[Any], str | None] | None = None,
                 warnings: Sequence[str] = (),
                 probe_file: str | None = None):
        super().__init__()
        self.clock = clock
        self.monotonic = monotonic
        self.personas = list(personas)
        self.model_label = model_label
        self.link: SessionLink | None = None
        self.starter = starter
        self._initial_session = session
        self.use_timers = timers
        self.tty_check = tty_check
        self.save_dir = save_dir
        self.preset_index = PRESET_NAMES.index(preset) if preset in PRESET_NAMES else 2
        self.frozen = False
        self.compact = False
        self.tab = "text"
        self.hidden_panels: set[str] = set()
        self.persona_current = persona or (persona_name(self.personas[0]) if self.personas
                                           else None)
        self.persona_target: str | None = None
        self.loading_text: str | None = "starting" if starter is not None else None
        self.failed = False
        self.exit_reason: str | None = None
        self.ui_frame_ms: list[float] = []  # durations of the UI's own timer callbacks
        self.render_ms: list[float] = []  # wall durations of screen frames (probe mode)
        self.render_cpu_ms: list[float] = []  # UI-thread CPU time of those frames
        self.loop_lag_ms: list[float] = []  # how late a 10 ms asyncio probe ran (probe mode)
        self.probe = probe or bool(probe_file)
        self.probe_file = probe_file
        self._rate_timers: list = []
        self._persona_timer = None
        self.voice_target: str | None = None  # the voice a run of `v` presses has reached
        self._voice_persona: str | None = None  # ... for this persona
        self._voice_timer = None
        self._confirm_until = 0.0
        self._last_state: str | None = None
        self._last_vad = False
        self._silent_since: float | None = None
        self._views_cache: tuple | None = None
        self._last_frame_seen = -1
        self.event_log: deque = deque(maxlen=20000)  # every session event seen (for `s`)
        self.voice_map: dict[str, str] = {persona_name(p): persona_voice(p)
                                          for p in self.personas}
        self.persona_resolver = persona_resolver
        self.on_model_ready = on_model_ready
        self.startup_warnings = list(warnings)
        self._model_ready = False
        self._load_started = monotonic()
        for t in THEMES.values():
            self.register_theme(t)
        self.theme = theme_name(theme, low_colour=low_colour)

    # -- theme ---------------------------------------------------------------------------------

    def get_theme_variable_defaults(self) -> dict[str, str]:
        defaults = super().get_theme_variable_defaults()
        dark = True
        try:
            dark = self.current_theme.dark
        except Exception:
            pass
        defaults.update(fallback_variables(dark))
        return defaults

    # -- screens -------------------------------------------------------------------------------

    def get_default_screen(self) -> Screen:
        return Dashboard(id="dashboard")

    @property
    def dashboard(self) -> Dashboard:
        screen = self.screen_stack[0]
        assert isinstance(screen, Dashboard)
        return screen

    def on_mount(self) -> None:
        if self.use_timers:
            self._start_timers()
            if self.tty_check and not self.is_headless:
                self.set_interval(TTY_CHECK_S, self._check_terminal, name="tty-check")
                self._install_hangup_handler()
        if self.probe:
            self.run_worker(self._lag_probe(), group="probe", exit_on_error=False)
        if self.link is None and self.starter is not None:
            self._load_session()
        elif self._initial_session is not None:
            self.attach_session(self._initial_session)

    def on_resize(self, event) -> None:
        try:
            self._apply_layout(event.size.width, event.size.height)
        except NoMatches:  # before the dashboard is composed
            pass

    def _apply_layout(self, width: int, height: int) -> None:
        compact = width < COMPACT_WIDTH or height < COMPACT_HEIGHT
        screen = self.dashboard
        self.compact = compact
        screen.set_class(compact, "-compact")
        for name in ("text", "timing", "engine"):
            screen.set_class(compact and self.tab == name, f"-tab-{name}")
        try:
            self.dashboard.query_one(Footer).compact = compact
        except Exception:
            pass
        self._apply_hidden()
        self._update_tabs()

    def _apply_hidden(self) -> None:
        screen = self.dashboard
        try:
            top = screen.query_one("#top")
            bottom = screen.query_one("#bottom")
        except Exception:
            return
        for name in PANELS.values():
            hidden = name in self.hidden_panels and not (self.compact and name != "audio")
            screen.query_one(f"#{name}-box").set_class(hidden, "-hidden")
        if self.compact:
            top.set_class(False, "-single")
            bottom.set_class(False, "-single")
            bottom.set_class(False, "-empty")
            return
        visible_top = [n for n in ("audio", "text") if n not in self.hidden_panels]
        visible_bottom = [n for n in ("timing", "engine") if n not in self.hidden_panels]
        top.set_class(len(visible_top) == 1, "-single")
        bottom.set_class(len(visible_bottom) == 1, "-single")
        bottom.set_class(not visible_bottom, "-empty")
        top.display = bool(visible_top)

    def _update_tabs(self) -> None:
        try:
            tabs = self.dashboard.query_one("#tabs", Static)
        except Exception:
            return
        parts = []
        for number, name in PANELS.items():
            label = f"{number} {PANEL_TITLES[name]}"
            if name == "audio":
                shown = "audio" not in self.hidden_panels
            else:
                shown = self.tab == name
            parts.append(f"[reverse bold] {label} [/]" if shown else f" {label} ")
        preset = PRESETS[self.preset_index].name
        tabs.update("".join(parts) + f"   [dim]refresh {preset}[/]")

    # -- timers (one per rate class) -------------------------------------------------------------

    def _start_timers(self) -> None:
        for timer in self._rate_timers:
            timer.stop()
        preset = PRESETS[self.preset_index]
        self._rate_timers = [
            self.set_interval(1.0 / preset.meters_hz, self._tick_meters, name="meters"),
            self.set_interval(1.0 / preset.graphs_hz, self._tick_graphs, name="graphs"),
            self.set_interval(1.0 / preset.numbers_hz, self._tick_numbers, name="numbers"),
            self.set_interval(1.0 / SLOW_HZ, self._tick_slow, name="slow"),
        ]

    def set_preset(self, index: int) -> None:
        self.preset_index = max(0, min(len(PRESETS) - 1, index))
        if self.use_timers:
            self._start_timers()
        self._update_tabs()
        self.notify(f"Refresh: {PRESETS[self.preset_index].name}", timeout=2)

    def _timed(self, fn: Callable[[], None]) -> None:
        if not self.screen_stack:  # a tick after the app's screens are gone (shutting down)
            return
        t0 = time.perf_counter()
        try:
            fn()
        except NoMatches:  # a tick before the dashboard is composed, or while it is torn down
            pass
        except Exception as exc:  # a display bug must not end the conversation with a traceback
            if os.environ.get("PARLEY_DEBUG"):
                raise
            self._show_error(f"The display hit an internal error ({type(exc).__name__}: {exc}); "
                             "the session keeps running. Rerun with PARLEY_DEBUG=1 and report it.")
        finally:
            dt = (time.perf_counter() - t0) * 1000.0
            self.ui_frame_ms.append(dt)
            if len(self.ui_frame_ms) > 20000:
                del self.ui_frame_ms[:10000]

    def _snapshot(self):
        if self.link is None:
            return None
        try:
            return self.link.snapshot()
        except Exception as exc:  # a broken snapshot must never take the UI down
            self._show_error(f"The session stopped reporting ({type(exc).__name__}: {exc}).")
            return None

    def _tick_meters(self) -> None:
        if self.frozen or self.link is None:
            return
        self._timed(self._update_meters)

    def _tick_graphs(self) -> None:
        if self.link is None:
            return
        self._timed(self._update_graphs)

    def _tick_numbers(self) -> None:
        if self.frozen:
            return
        self._timed(self._update_numbers)

    def _tick_slow(self) -> None:
        if self.frozen:
            return
        self._timed(self._update_slow)

    # -- applying the snapshot -----------------------------------------------------------------

    def _views(self, snap) -> Views:
        """The widgets' views of one snapshot (built once per published snapshot)."""
        key = (id(snap), getattr(snap, "seq", None), self.persona_target)
        if self._views_cache is not None and self._views_cache[0] == key:
            return self._views_cache[1]
        views = build_views(snap, model_label=self.model_label, voices=self.voice_map,
                            persona_hint=self.persona_current)
        self._views_cache = (key, views)
        return views

    def _update_meters(self, snap: Any = None) -> None:
        snap = snap if snap is not None else self._snapshot()
        if snap is None or "audio" in self.hidden_panels:
            return
        self.dashboard.query_one(AudioPanel).set_levels(self._views(snap).audio)

    def _update_graphs(self, snap: Any = None, events: Sequence[Any] | None = None) -> None:
        """Events (text pieces coalesced here, <= 10 Hz), lanes and latency history."""
        link = self.link
        screen = self.dashboard
        transcript = screen.query_one(Transcript)
        if events is None:
            try:
                events = link.drain_events() if link is not None else []
            except Exception:
                events = []
        for event in events:
            self._handle_event(event, transcript)
        snap = snap if snap is not None else self._snapshot()
        if snap is None:
            return
        views = self._views(snap)
        now = self.monotonic()
        vad = views.audio.vad and not views.audio.mic_muted
        if vad and not self._last_vad:
            transcript.user_spoke(self.clock())
        self._last_vad = vad
        audio = screen.query_one(AudioPanel)
        audio.push_lanes(now, vad, views.model_db)
        timing = screen.query_one(LatencyPanel)
        total = views.latency.stages.get("total")
        if total is not None and snap.frame_index != self._last_frame_seen:
            timing.push_history(now, total.last)
        self._last_frame_seen = snap.frame_index
        if self.frozen:
            return
        with self.batch_update():
            transcript.update_display(self.clock())
            if "audio" not in self.hidden_panels:
                audio.update_graphs()
            if self._panel_visible("timing"):
                timing.update_graphs()

    def _panel_visible(self, name: str) -> bool:
        if self.compact:
            if name == "audio":
                return "audio" not in self.hidden_panels
            return self.tab == name
        return name not in self.hidden_panels

    def _update_numbers(self, snap: Any = None) -> None:
        snap = snap if snap is not None else self._snapshot()
        if snap is None:
            self._render_status()
            return
        views = self._views(snap)
        screen = self.dashboard
        loading = self.link is not None and not self._model_ready  # (a replay has no link)
        if loading:
            self._check_model_ready(views)
            loading = not self._model_ready
        if self.persona_target and views.persona_name == self.persona_target \
                and not snap.prompting:
            self.persona_current = self.persona_target
            self.persona_target = None
        status = views.status
        if loading and status.state not in ("ERROR", "NO AUDIO DEVICE"):
            waited = max(0.0, self.monotonic() - self._load_started)
            status = _replace(status, state="LOADING", live=False,
                              progress=f"loading the weights ({waited:.0f} s)")
        with self.batch_update():
            self._render_status(status)
            if self._panel_visible("timing"):
                screen.query_one(LatencyPanel).set_view(views.latency)
            if self._panel_visible("engine"):
                screen.query_one(EnginePanel).set_view(views.engine)
        state = views.status.state
        if state != self._last_state:
            self._last_state = state
            if state in ("ERROR", "NO AUDIO DEVICE", "DEVICE LOST") and views.message:
                self._show_error(views.message, warning=state == "DEVICE LOST")
            elif state == "FINISHED":
                self.notify("The input file has ended; q quits (and finishes the output file).",
                            timeout=8)

    def _update_slow(self, snap: Any = None) -> None:
        snap = snap if snap is not None else self._snapshot()
        if snap is None:
            return
        views = self._views(snap)
        audio = self.dashboard.query_one(AudioPanel)
        audio.set_devices(views.devices)
        audio.set_silent_mic(views.silent_mic)

    def _handle_event(self, event: Any, transcript: Transcript) -> None:
        kind = event.kind
        data = event.data
        self.event_log.append(event)
        if kind == "text":
            transcript.add_piece(str(data.get("piece", "")), event.time)
        elif kind == "prompted":
            name = data.get("persona")
            if name:
                self.persona_current = name
                if self.persona_target == name:
                    self.persona_target = None
            transcript.buffer.commit()
        elif kind == "control" and data.get("control") == "interrupt":
            transcript.buffer.commit()
        elif kind == "warning":
            self._show_error(str(data.get("message", "")), warning=True)
        elif kind == "error":
            self._show_error(str(data.get("message", "")))
        elif kind == "audio" and data.get("message") and data.get("state") in (
                "no_portaudio", "no_device", "refused", "lost", "error"):
            self._show_error(str(data["message"]), warning=data.get("state") == "lost")

    def _render_status(self, view: StatusView | None = None) -> None:
        try:
            strip = self.dashboard.query_one(StatusStrip)
        except NoMatches:
            return
        if view is None:
            if self.failed:
                state = "ERROR"
            else:
                state = "LOADING" if self.loading_text is not None else "STARTING"
            persona = self.persona_target or self.persona_current
            view = StatusView(state=state, model=self.model_label, persona=persona,
                              voice=self.voice_map.get(persona or ""),
                              progress=self.loading_text)
        if self.voice_target and view.persona == self._voice_persona:  # a run of `v` presses
            view = _replace(view, voice=self.voice_target)
        badges = list(view.badges)
        if self.frozen:
            badges.append("FROZEN")
        if self.persona_target and view.persona != self.persona_target:
            view = _replace(view, persona=self.persona_target,
                            voice=self.voice_map.get(self.persona_target), state="PROMPTING")
        strip.set_view(_replace(view, badges=tuple(badges)))

    def show_snapshot(self, snap: Any, events: Sequence[Any] = ()) -> None:
        """Draws one telemetry snapshot (and events) everywhere at once, as the timers would.

        Replays and deterministic screenshots use it: no session is needed.
        """
        saved, self.frozen = self.frozen, False
        try:
            self._views_cache = None
            self._update_meters(snap)
            self._update_graphs(snap, list(events))
            self._update_numbers(snap)
            self._update_slow(snap)
        finally:
            self.frozen = saved

    # -- UI frame-time measurement ----------------------------------------------------------------

    async def _lag_probe(self, period: float = 0.01) -> None:
        """Records how late the event loop runs a 10 ms sleep: the longest stretch the UI thread
        was busy (timer callbacks, layout, rendering) shows up as lag."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(period)
            self.loop_lag_ms.append(max(0.0, (loop.time() - t0 - period) * 1000.0))
            if len(self.loop_lag_ms) > 100000:
                del self.loop_lag_ms[:50000]

    def probe_report(self) -> dict[str, Any]:
        return {"callbacks_ms": ui_frame_stats(self.ui_frame_ms),
                "render_ms": ui_frame_stats(self.render_ms),
                "render_cpu_ms": ui_frame_stats(self.render_cpu_ms),
                "loop_lag_ms": ui_frame_stats(self.loop_lag_ms),
                "preset": PRESETS[self.preset_index].name}

    def _write_probe(self) -> None:
        if not self.probe_file:
            return
        import json

        try:
            with open(self.probe_file, "w") as fh:
                json.dump(self.probe_report(), fh, indent=1)
        except OSError:
            pass

    # -- loading ---------------------------------------------------------------------------------

    @work(thread=True, group="session", exclusive=True, exit_on_error=False,
          description="load the model and start the session")
    def _load_session(self) -> None:
        worker = get_current_worker()

        def progress(text: str, fraction: float | None = None) -> None:
            if worker.is_cancelled:
                raise LoadCancelled()
            self.post_message(LoadProgress(text, fraction))

        from engine.errors import ParleyError

        try:
            session = self.starter(progress)
        except LoadCancelled:
            return
        except ParleyError as exc:
            self.post_message(SessionFailed(str(exc)))
            return
        except MemoryError:
            self.post_message(SessionFailed(
                "Out of memory while loading the model; close other programs or use "
                "--quantize 4 (about 5.5 GB)."))
            return
        except Exception as exc:  # a bug: one line, never a traceback on screen
            self.post_message(SessionFailed(
                f"Internal error while starting ({type(exc).__name__}: {exc}); rerun with "
                "PARLEY_DEBUG=1 for details and report it.", details=repr(exc)))
            if os.environ.get("PARLEY_DEBUG"):
                import traceback

                traceback.print_exc(file=sys.__stderr__)
            return
        if worker.is_cancelled:
            SessionLink(session).close()
            return
        self.post_message(SessionReady(session))

    def on_load_progress(self, message: LoadProgress) -> None:
        text = message.text
        if message.fraction is not None:
            text += f" {message.fraction * 100:.0f} %"
        self.loading_text = text
        self._render_status()

    def on_session_ready(self, message: SessionReady) -> None:
        self.attach_session(message.session)

    def attach_session(self, session: Any) -> None:
        self.link = SessionLink(session, persona_resolver=self.persona_resolver)
        # Everything loaded so far (model, Textual, the DOM) lives as long as the process: move it
        # out of the collector's reach, so a full collection no longer stalls a frame (or the
        # engine thread, which waits on the GIL meanwhile) for tens of milliseconds.
        import gc

        gc.collect()
        gc.freeze()
        self.loading_text = None
        self._views_cache = None
        snap = self._snapshot()
        if snap is not None and snap.persona:
            self.persona_current = snap.persona
        try:
            self._update_numbers()
        except NoMatches:  # not composed yet: the next tick draws it
            pass

    def _check_model_ready(self, views: Views) -> None:
        model = self.link.model() if self.link is not None else None
        if model is None:
            return
        self._model_ready = True
        if self.on_model_ready is not None:
            try:
                label = self.on_model_ready(model)
            except Exception:
                label = None
            if label:
                self.set_model_label(label)

    def set_model_label(self, label: str) -> None:
        self.model_label = label
        self._views_cache = None
        self._render_status()

    def set_voice(self, persona: str, voice: str) -> None:
        self.voice_map[persona] = voice
        self._views_cache = None

    def on_session_failed(self, message: SessionFailed) -> None:
        self.failed = True
        self.loading_text = None
        self._show_error(message.message, details=message.details)
        self._render_status()

    def on_notice(self, message: Notice) -> None:
        if message.error:
            self._show_error(message.text)
        else:
            self.notify(message.text, timeout=4)

    def _show_error(self, message: str, *, details: str | None = None,
                    warning: bool = False) -> None:
        if not message:
            return
        try:
            banner = self.dashboard.query_one(ErrorBanner)
        except NoMatches:
            return
        if banner.message == message:
            return
        banner.show(message, details=details, warning=warning)

    # -- actions -------------------------------------------------------------------------------

    def _need_session(self) -> SessionLink | None:
        if self.link is None:
            if self.failed:
                self.notify("No session is running (see the banner).", severity="warning",
                            timeout=3)
            else:
                self.notify("The model is still loading.", timeout=2)
        return self.link

    def _refresh_now(self) -> None:
        """Shows the effect of a control at once instead of at the next tick."""
        self._views_cache = None
        self._update_meters()
        self._update_numbers()

    def action_interrupt(self) -> None:
        link = self._need_session()
        if link is not None:
            link.interrupt()
            self.dashboard.query_one(Transcript).buffer.commit()
            self._refresh_now()

    def action_toggle_mic(self) -> None:
        link = self._need_session()
        if link is not None:
            link.set_mic_muted(not link.mic_muted())
            self._refresh_now()

    def action_toggle_speaker(self) -> None:
        link = self._need_session()
        if link is not None:
            link.set_speaker_muted(not link.speaker_muted())
            self._refresh_now()

    def action_echo_mode(self) -> None:
        link = self._need_session()
        if link is not None:
            mode = link.cycle_echo_mode()
            if mode:
                self.notify(f"Echo handling: {mode}", timeout=2)

    def action_pause(self) -> None:
        link = self._need_session()
        if link is not None:
            link.set_paused(not link.paused())
            self._refresh_now()

    def _persona_names(self) -> list[str]:
        return [persona_name(p) for p in self.personas]

    def _step_persona(self, delta: int) -> None:
        names = self._persona_names()
        if not names:
            self.notify("No personas are available.", severity="warning", timeout=3)
            return
        base = self.persona_target or self.persona_current
        i = names.index(base) if base in names else -1
        self.persona_target = names[(i + delta) % len(names)]
        self._render_status()
        # debounce: a quick run of p presses switches once, to where the user stopped
        if self._persona_timer is not None:
            self._persona_timer.stop()
        self._persona_timer = self.set_timer(PERSONA_DEBOUNCE_S, self._commit_persona)

    def action_next_persona(self) -> None:
        self._step_persona(+1)

    def action_previous_persona(self) -> None:
        self._step_persona(-1)

    def _commit_persona(self) -> None:
        self._persona_timer = None
        if self.persona_target:
            self.switch_persona(self.persona_target)

    def switch_persona(self, name: str) -> None:
        """Reset + prefill of the named persona (the session does it on its model thread)."""
        persona = next((p for p in self.personas if persona_name(p) == name), None)
        if persona is None:
            self.notify(f"No persona named {name}.", severity="warning", timeout=3)
            return
        link = self._need_session()
        if link is None:
            self.persona_current = name  # used when the session starts
            self.persona_target = None
            self._render_status()
            return
        self.persona_target = name
        try:
            link.switch_persona(persona)
        except Exception as exc:  # a voice that cannot be used, ...
            self.persona_target = None
            self._show_error(_sentence(exc, f"Switching to {name} failed"))
        self._refresh_now()

    # -- voices (`v`: next voice, same prompt) -------------------------------------------------

    def _persona_index(self, name: str | None) -> int | None:
        return next((i for i, p in enumerate(self.personas) if persona_name(p) == name), None)

    def _running_persona(self, link: SessionLink, name: str) -> Any:
        """The persona `name` as the session runs it (its voice resolved), else the app's entry."""
        running = link.persona()
        if running is not None and persona_name(running) == name:
            return running
        index = self._persona_index(name)
        return None if index is None else link.resolve(self.personas[index])

    def action_next_voice(self) -> None:
        link = self._need_session()
        if link is None:
            return
        voices = link.voices()
        if voices is None:
            self.notify("The model is still loading; its voices are not known yet.", timeout=3)
            return
        if len(voices) < 2:
            self.notify("This model offers only one voice, so there is no other voice to switch "
                        "to." if voices else "This model offers no voices to switch between.",
                        severity="warning", timeout=4)
            return
        name = self.persona_target or self.persona_current
        persona = self._running_persona(link, name) if name else None
        if persona is None:
            self.notify("No persona is active to give another voice.", severity="warning",
                        timeout=3)
            return
        if self._voice_persona != name:
            self.voice_target = None
        base = (self.voice_target or persona_voice(persona)).lower()
        lowered = [v.lower() for v in voices]
        i = lowered.index(base) if base in lowered else -1
        self.voice_target = voices[(i + 1) % len(voices)]
        self._voice_persona = name
        self._render_status()
        # debounce like `p`: a quick run of presses switches once, to where the user stopped
        if self._voice_timer is not None:
            self._voice_timer.stop()
        self._voice_timer = self.set_timer(PERSONA_DEBOUNCE_S, self._commit_voice)

    def _commit_voice(self) -> None:
        self._voice_timer = None
        voice, name = self.voice_target, self._voice_persona
        self.voice_target = self._voice_persona = None
        if voice and name:
            self.switch_voice(name, voice)

    def switch_voice(self, name: str, voice: str) -> None:
        """Reset + prefill of persona `name` with `voice`, keeping its prompt and other fields."""
        link = self._need_session()
        if link is None:
            return
        persona = self._running_persona(link, name)
        try:
            new = dataclasses.replace(persona, voice=voice)
        except TypeError:  # not a dataclass (or no voice field)
            self.notify(f"Persona {name} cannot take another voice.", severity="warning",
                        timeout=3)
            return
        index = self._persona_index(name)
        saved = (None if index is None else self.personas[index], self.voice_map.get(name))
        if index is not None:  # p / P, the picker and the palette keep the chosen voice
            try:
                self.personas[index] = dataclasses.replace(self.personas[index], voice=voice)
            except TypeError:
                pass
        self.set_voice(name, voice)
        try:
            link.switch_persona(new)
        except Exception as exc:  # a voice that cannot be used, ...
            if index is not None and saved[0] is not None:
                self.personas[index] = saved[0]
            if saved[1] is None:
                self.voice_map.pop(name, None)
            else:
                self.voice_map[name] = saved[1]
            self._views_cache = None
            self._show_error(_sentence(exc, f"Switching {name} to voice {voice} failed"))
            self._render_status()
            return
        self.notify(f"Voice {voice} for {name}: prefilling the same prompt.", timeout=2)
        self._refresh_now()

    # -- detailed timing (`t`) ---------------------------------------------------------------

    def action_detailed_timing(self) -> None:
        link = self._need_session()
        if link is None:
            return
        on = not link.detailed_timing()
        link.set_detailed_timing(on)
        if link.detailed_timing_supported() is False:
            self.notify("This model has no detailed-timing switch; its stage timings stay as "
                        "they are.", severity="warning", timeout=3)
        elif on:
            self.notify("Detailed timing on: per-stage barriers on every frame, which costs "
                        "throughput.", timeout=3)
        else:
            every = getattr(link.model(), "stage_sample_every", None)
            sampled = (f"sampled 1 frame in {every}" if isinstance(every, int) and every > 1
                       else "measured as the model does by default")
            self.notify(f"Detailed timing off: the stage split is {sampled}.", timeout=3)
        self._refresh_now()

    def action_pick_persona(self) -> None:
        if not self.personas:
            self.notify("No personas are available.", severity="warning", timeout=3)
            return

        def chosen(name: str | None) -> None:
            if name:
                self.switch_persona(name)

        self.push_screen(PersonaPicker(self.personas, self.persona_target or
                                       self.persona_current), chosen)

    def action_reset_stats(self) -> None:
        screen = self.dashboard
        screen.query_one(AudioPanel).reset_peaks()
        screen.query_one(LatencyPanel).clear_history()
        if self.link is not None:
            self.link.reset_stats()
        self.notify("Peaks and statistics reset.", timeout=2)

    def action_new_conversation(self) -> None:
        now = self.monotonic()
        if now > self._confirm_until:
            self._confirm_until = now + CONFIRM_S
            self.notify("Press R again to start a new conversation.", timeout=CONFIRM_S)
            return
        self._confirm_until = 0.0
        link = self._need_session()
        if link is None:
            return
        self.dashboard.query_one(Transcript).buffer.commit()
        link.reset()
        self.notify("New conversation: prefilling the persona again.", timeout=2)
        self._refresh_now()

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        self.dashboard.set_class(self.frozen, "-frozen")
        if self.frozen:
            strip = self.dashboard.query_one(StatusStrip)
            self._render_status(_replace(strip.view, badges=tuple(
                b for b in strip.view.badges if b != "FROZEN")))
        else:
            self._update_numbers()

    def action_save(self) -> None:
        link = self._need_session()
        if link is None:
            return
        transcript = self.dashboard.query_one(Transcript)
        lines = list(transcript.committed_text)
        if transcript.live_text:
            lines.append(transcript.live_text)
        events = [e.to_json() for e in self.event_log]
        snap = self._snapshot()
        self._save_worker(link, lines, events, snap)

    @work(thread=True, group="save", exclusive=False, exit_on_error=False,
          description="save the session")
    def _save_worker(self, link: SessionLink, lines: list[str], events: list[dict],
                     snap: Any) -> None:
        try:
            where = save_session(self.save_dir, lines, events, snap, link.record_dir(),
                                 self.clock())
        except Exception as exc:
            self.post_message(Notice(_sentence(exc, "Saving the session failed"), error=True))
            return
        self.post_message(Notice(f"Saved the session to {where}"))

    def action_clear_text(self) -> None:
        self.dashboard.query_one(Transcript).clear()

    def action_panel(self, number: int) -> None:
        name = PANELS.get(int(number))
        if name is None:
            return
        if self.compact and name != "audio":
            self.tab = name
        elif name in self.hidden_panels:
            self.hidden_panels.discard(name)
        else:
            self.hidden_panels.add(name)
        self._apply_layout(self.size.width, self.size.height)
        self._update_numbers()

    def action_refresh_rate(self, delta: int) -> None:
        self.set_preset(self.preset_index + int(delta))

    def action_show_errors(self) -> None:
        banner = self.dashboard.query_one(ErrorBanner)
        self.push_screen(ErrorScreen(banner.history))

    def action_dismiss_error(self) -> None:
        self.dashboard.query_one(ErrorBanner).dismiss()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.key_rows(), notes=(
            "Rebind keys with PARLEY_KEYS=\"id=key;id=key\" using the ids in brackets.")))

    def key_rows(self) -> list[tuple[str, str, str]]:
        """(keys, what, detail) for every binding, with the user's PARLEY_KEYS overrides."""
        overrides = getattr(self, "_keymap", None) or {}
        rows = []
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            keys = overrides.get(binding.id or "") or binding.key_display or binding.key
            keys = ", ".join(_key_label(k) for k in keys.split(","))
            rows.append((keys, binding.description, f"{binding.tooltip}  [{binding.id}]"))
        return rows

    async def action_quit(self) -> None:
        self.exit_reason = "quit"
        self.exit(0)

    # -- palette -------------------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            if binding.id in ("quit", "quit-ctrl-c"):
                continue
            action = binding.action
            keys = ", ".join(_key_label(k) for k in (binding.key_display or binding.key)
                             .split(","))
            yield SystemCommand(f"{binding.description} ({keys})", binding.tooltip,
                                _partial(self.run_action, action))
        for theme in THEMES:
            yield SystemCommand(f"Theme: {theme}", "Switch the dashboard theme",
                                _partial(setattr, self, "theme", theme))

    # -- terminal loss -------------------------------------------------------------------------

    def _check_terminal(self) -> None:
        try:
            alive = sys.__stdin__ is not None and os.isatty(sys.__stdin__.fileno())
            if alive:
                os.tcgetpgrp(sys.__stdin__.fileno())
        except (OSError, ValueError):
            alive = False
        if not alive:
            self._terminal_gone()

    def _terminal_gone(self) -> None:
        self.exit_reason = "terminal closed"
        self.exit(0)

    def _install_hangup_handler(self) -> None:
        import asyncio
        import signal

        try:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self._terminal_gone)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            pass

    # -- shutdown ------------------------------------------------------------------------------

    def on_unmount(self) -> None:
        self._write_probe()
        import gc

        gc.unfreeze()  # let the model's objects be collected normally from here on
        for worker in self.workers:
            if worker.group == "session" and worker.state in (WorkerState.PENDING,
                                                               WorkerState.RUNNING):
                worker.cancel()

    @property
    def last_state(self) -> str | None:
        """The last state word the status strip showed from the session."""
        return self._last_state

    @property
    def loader_running(self) -> bool:
        return any(w.group == "session" and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
                   for w in self.workers)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.group == "session":
            self.post_message(SessionFailed("Internal error while starting; rerun with "
                                            "PARLEY_DEBUG=1 for details and report it."))


def save_session(save_dir: str | None, lines: list[str], events: list[dict], snap: Any,
                 record_dir: str | None, now: float) -> str:
    """Writes transcript.txt, events.jsonl and stats.json; returns a sentence saying where.

    With `--record DIR` the files go next to the session's WAV recordings in DIR; otherwise into
    a new `parley-session-YYYYmmdd-HHMMSS` folder (the WAVs need --record).
    """
    import json
    from pathlib import Path

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = Path(save_dir or record_dir or ".")
    target = base if (save_dir or record_dir) else base / f"parley-session-{stamp}"
    target.mkdir(parents=True, exist_ok=True)
    (target / f"transcript-{stamp}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(target / f"ui-events-{stamp}.jsonl", "w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event) + "\n")
    if snap is not None:
        (target / f"stats-{stamp}.json").write_text(json.dumps(_plain(snap), indent=1),
                                                    encoding="utf-8")
    audio = (" with the WAV recordings" if record_dir else
             " (text, events, statistics; start with --record DIR to keep the audio too)")
    return f"{target}{audio}"


def _plain(obj: Any) -> Any:
    """A snapshot as JSON-able data (enums by value, mappings as dicts)."""
    import dataclasses
    from enum import Enum

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _replace(view: StatusView, **changes: Any) -> StatusView:
    from dataclasses import replace

    return replace(view, **changes)


def _sentence(exc: BaseException, what: str) -> str:
    from engine.errors import ParleyError

    if isinstance(exc, ParleyError):
        return str(exc)
    return f"{what} ({type(exc).__name__}: {exc})."


_KEY_LABELS = {"space": "space", "question_mark": "?", "plus": "+", "minus": "-",
               "equals_sign": "=", "ctrl+c": "ctrl+c", "f1": "F1"}


def _key_label(key: str) -> str:
    key = key.strip()
    return _KEY_LABELS.get(key, key)


def ui_frame_stats(samples: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / max of UI callback durations in ms."""
    if not samples:
        return {"n": 0, "p50": math.nan, "p95": math.nan, "max": math.nan}
    s = sorted(samples)
    return {"n": len(s), "p50": s[len(s) // 2], "p95": s[min(len(s) - 1, int(len(s) * 0.95))],
            "max": s[-1]}
