"""The always-visible status strip: the state in words, badges, persona, model, time, step timing.

Line 1: model and precision ─ voice ─ persona ─ live time ─ frame counter.
Line 2: the state word (reverse video, readable without colour) with badges such as MUTED, then
step p50/p95, real-time factor, dropped input and the glitch counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from . import format as fmt
from .lines import LineWidget

BUSY_STATES = {"LOADING", "WARMING UP", "PROMPTING", "STARTING"}
BAD_STATES = {"ERROR", "NO AUDIO DEVICE", "DEVICE LOST", "SILENT MIC"}
IDLE_STATES = {"PAUSED", "STOPPED", "FINISHED", "ENDED"}
BAD_BADGES = ("MUTED", "BEHIND", "SILENT MIC", "CLIP")


@dataclass(frozen=True)
class StatusView:
    state: str = "STARTING"
    secondary: str | None = None  # e.g. "you too" (overlap)
    badges: tuple[str, ...] = ()
    model: str = ""
    voice: str | None = None
    persona: str | None = None
    uptime_s: float | None = None
    frame: int | None = None
    step_p50: float | None = None
    step_p95: float | None = None
    rtf: float | None = None
    dropped_ms: float | None = None
    glitches: int | None = None
    progress: str | None = None  # "loading weights 40 %" while LOADING
    live: bool = False


class StatusStrip(LineWidget):
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "status--title", "status--sep", "status--field", "status--dim",
        "status--state-live", "status--state-speaking", "status--state-busy",
        "status--state-bad", "status--state-idle",
        "status--badge", "status--badge-bad", "status--warn", "status--live-dot",
    }
    DEFAULT_CSS = """
    StatusStrip { height: 2; width: 1fr; background: $panel; padding: 0 1; }
    StatusStrip > .status--title { color: $primary; text-style: bold; }
    StatusStrip > .status--sep { color: $text-muted; }
    StatusStrip > .status--field { color: $foreground; text-style: bold; }
    StatusStrip > .status--dim { color: $text-muted; }
    StatusStrip > .status--state-live { color: $state-live; text-style: bold reverse; }
    StatusStrip > .status--state-speaking { color: $state-speaking; text-style: bold reverse; }
    StatusStrip > .status--state-busy { color: $state-busy; text-style: bold reverse; }
    StatusStrip > .status--state-bad { color: $state-bad; text-style: bold reverse; }
    StatusStrip > .status--state-idle { color: $state-idle; text-style: bold reverse; }
    StatusStrip > .status--badge { color: $state-busy; text-style: bold reverse; }
    StatusStrip > .status--badge-bad { color: $state-bad; text-style: bold reverse; }
    StatusStrip > .status--warn { color: $warning; text-style: bold; }
    StatusStrip > .status--live-dot { color: $state-live; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.view = StatusView()
        self._shown: tuple | None = None

    def set_view(self, view: StatusView) -> None:
        self.view = view
        if view != self._shown:
            self._shown = view
            self.invalidate()

    def line_count(self) -> int:
        return 2

    def build(self, width: int):
        """Two lines; when the terminal is narrow the least important groups are left out."""
        v = self.view
        room = max(20, width)
        sep = (" ─ ", "status--sep")

        # line 1, in priority order: model, persona, time, voice, frame
        head: list[tuple[int, list]] = [(0, [(v.model or "parley", "status--title")])]
        if v.persona:
            head.append((1, [sep, ("persona: ", "status--dim"), (v.persona, "status--field")]))
        clock = [sep]
        if v.live:
            clock += [("● ", "status--live-dot"), ("live ", "status--dim")]
        clock.append((fmt.clock(v.uptime_s), "status--field"))
        head.append((2, clock))
        if v.voice:
            head.append((3, [sep, ("voice ", "status--dim"), (v.voice, "status--field")]))
        if v.frame is not None:
            head.append((4, [sep, ("frame ", "status--dim"), (fmt.count(v.frame), "status--field")]))

        # line 2: the state word and badges always; then the numbers while they fit
        state = v.state.upper()
        tail: list[tuple[int, list]] = [(0, [(f" {state} ", _state_class(state))])]
        if v.secondary:
            tail.append((0, [(f" · {v.secondary}", "status--field")]))
        for badge in v.badges:
            bad = badge.startswith(BAD_BADGES)
            tail.append((0, [(" ", None),
                             (f" {badge} ", "status--badge-bad" if bad else "status--badge")]))
        if v.progress:
            tail.append((1, [("  " + v.progress, "status--field")]))
        if v.step_p50 is not None:
            tail.append((2, [("   step ", "status--dim"),
                             (f"p50 {fmt.ms(v.step_p50)}  p95 {fmt.ms(v.step_p95)}",
                              "status--field")]))
        if v.rtf is not None:
            tail.append((3, [("   RTF ", "status--dim"),
                             (f"{v.rtf:.2f}", "status--warn" if v.rtf > 1.0 else "status--field")]))
        if v.dropped_ms is not None:
            tail.append((5, [("   dropped ", "status--dim"),
                             (f"{v.dropped_ms:.0f} ms",
                              "status--warn" if v.dropped_ms else "status--field")]))
        if v.glitches is not None:
            tail.append((4, [("   ⚠ ", "status--warn" if v.glitches else "status--dim"),
                             (f"{v.glitches} glitches" if v.glitches else "0",
                              "status--warn" if v.glitches else "status--dim")]))
        return [_fit(head, room), _fit(tail, room)]


def _fit(groups: list[tuple[int, list]], room: int) -> list:
    """Drops the lowest-priority groups (highest number) until the line fits `room` cells."""
    kept = list(groups)

    def length(gs) -> int:
        return sum(len(text) for _, runs in gs for text, _ in runs)

    while length(kept) > room and any(p > 0 for p, _ in kept):
        worst = max(p for p, _ in kept)
        for i in range(len(kept) - 1, -1, -1):
            if kept[i][0] == worst:
                del kept[i]
                break
    return [run for _, runs in kept for run in runs]


def _state_class(state: str) -> str:
    if state in BAD_STATES:
        return "status--state-bad"
    if state in BUSY_STATES:
        return "status--state-busy"
    if state in IDLE_STATES:
        return "status--state-idle"
    if state.startswith("SPEAK") or state == "OVERLAP":
        return "status--state-speaking"
    return "status--state-live"
