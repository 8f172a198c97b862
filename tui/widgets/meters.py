"""Level meters (dBFS, peak hold), the voice-activity light and history lanes.

These widgets hold plain numbers and redraw only when what they show changes by at least one
character cell, so 30 Hz updates of a quiet meter write nothing to the terminal (TUI.md §4).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, ClassVar, Iterable

from rich.text import Text
from textual.widget import Widget

from . import format as fmt
from .lines import Line, LineWidget

EIGHTHS = " ▏▎▍▌▋▊▉█"
LANE_GLYPHS = " ▁▂▃▄▅▆▇█"

FLOOR_DB = -60.0
YELLOW_DB = -18.0
RED_DB = -6.0
CLIP_DB = -0.1


class PeakHold:
    """Peak hold with the AUDIO.md §10 ballistics: hold 1.5 s, then fall at 11.8 dB/s.

    Used when the session's snapshot carries no hold value of its own.
    """

    def __init__(self, hold_s: float = 1.5, release_db_s: float = 11.8,
                 clock: Callable[[], float] = time.monotonic):
        self.hold_s = hold_s
        self.release_db_s = release_db_s
        self.clock = clock
        self.value = -math.inf
        self._since = 0.0

    def update(self, peak_db: float) -> float:
        now = self.clock()
        held = self.value
        if held > -math.inf:
            age = now - self._since
            if age > self.hold_s:
                held = self.value - (age - self.hold_s) * self.release_db_s
        if peak_db >= held:
            self.value = peak_db
            self._since = now
            return peak_db
        return held

    def reset(self) -> None:
        self.value = -math.inf
        self._since = 0.0


class LevelMeter(LineWidget):
    """One meter line: `MIC ▕█████▊·······│··▏ -24 dBFS pk -11`.

    The bar spans FLOOR_DB..0 dBFS in eighth-cell steps; cells are green below -18 dBFS, yellow up
    to -6 and red above (the zone is also readable from the number). The hold tick is `│`.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "meter--label", "meter--low", "meter--mid", "meter--high", "meter--track",
        "meter--hold", "meter--value", "meter--muted", "meter--clip",
    }

    DEFAULT_CSS = """
    LevelMeter { height: 1; width: 1fr; }
    LevelMeter > .meter--label { text-style: bold; }
    LevelMeter > .meter--low { color: $meter-low; }
    LevelMeter > .meter--mid { color: $meter-mid; }
    LevelMeter > .meter--high { color: $meter-high; }
    LevelMeter > .meter--track { color: $meter-track; }
    LevelMeter > .meter--hold { color: $meter-hold; text-style: bold; }
    LevelMeter > .meter--value { color: $foreground; }
    LevelMeter > .meter--muted { color: $text-muted; text-style: bold; }
    LevelMeter > .meter--clip { color: $meter-high; text-style: bold reverse; }
    """

    def __init__(self, label: str, *, label_width: int = 6, show_peak: bool = True,
                 clock: Callable[[], float] = time.monotonic, id: str | None = None,
                 classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.label = label
        self.label_width = label_width
        self.show_peak = show_peak
        self.level_db = -math.inf
        self.peak_db = -math.inf
        self.hold_db = -math.inf
        self.muted_word: str | None = None
        self.clipped = False
        self._hold = PeakHold(clock=clock)
        self._shown: tuple | None = None

    # -- data ---------------------------------------------------------------------------------

    def set_level(self, level_db: float, peak_db: float | None = None,
                  hold_db: float | None = None, *, muted: str | None = None,
                  clipped: bool = False) -> None:
        """Sets the RMS level and peak (dBFS). `hold_db` None: computed here from the peaks.

        `muted` is a word (e.g. "MUTED") shown instead of the value while the bar is greyed.
        """
        self.level_db = _clean(level_db)
        self.peak_db = _clean(peak_db if peak_db is not None else level_db)
        self.hold_db = _clean(hold_db) if hold_db is not None else self._hold.update(self.peak_db)
        self.muted_word = muted
        self.clipped = clipped
        key = self._key()
        if key != self._shown:
            self._shown = key
            self.invalidate()

    def reset_peaks(self) -> None:
        self._hold.reset()
        self.hold_db = self.peak_db
        self.clipped = False
        self.invalidate()

    # -- drawing ------------------------------------------------------------------------------

    def _bar_width(self, width: int | None = None) -> int:
        width = width or self.size.width or 40
        return max(4, width - self.label_width - 2 - 18)  # the same bar length with or without pk

    def line_count(self) -> int:
        return 1

    def _key(self) -> tuple:
        cells = self._bar_width()
        return (cells, _eighths(self.level_db, cells), _cell(self.hold_db, cells),
                fmt.db(self.level_db), fmt.db(self.hold_db), self.muted_word, self.clipped,
                self.size.width)

    def build(self, width: int) -> list[Line]:
        cells = self._bar_width(width)
        muted = self.muted_word is not None
        line: list[tuple[str, str | None]] = [
            (self.label.ljust(self.label_width)[: self.label_width], "meter--label"),
            ("▕", "meter--track")]
        filled = _eighths(self.level_db, cells)
        hold_cell = _cell(self.hold_db, cells) if self.hold_db > -math.inf else -1
        full, part = divmod(filled, 8)
        runs = _Runs(lambda text, cls: line.append((text, cls)))
        for i in range(cells):
            if i < full:
                glyph = "█"
            elif i == full and part:
                glyph = EIGHTHS[part]
            elif i == hold_cell:
                glyph = "│"
            else:
                glyph = "·"
            if glyph == "·":
                cls = "meter--track"
            elif muted:
                cls = "meter--muted"
            elif glyph == "│":
                cls = "meter--hold"
            else:
                cls = _zone(FLOOR_DB + (i + 0.5) * -FLOOR_DB / cells)
            runs.add(glyph, cls)
        runs.flush()
        line.append(("▏", "meter--track"))
        if muted:
            line.append((f" {self.muted_word}", "meter--muted"))
            return [line]
        line.append((f" {fmt.db(self.level_db):>4} dBFS", "meter--value"))
        if self.show_peak:
            if self.clipped:
                line.append((" CLIP", "meter--clip"))
            else:
                line.append((f" pk {fmt.db(self.hold_db):>4}", "meter--value"))
        return [line]


class _Runs:
    """Collects glyphs into (text, class) runs: one segment per run of the same class."""

    def __init__(self, emit):
        self.emit = emit
        self.buf: list[str] = []
        self.cls: str | None = None

    def add(self, glyph: str, cls: str) -> None:
        if cls != self.cls:
            self.flush()
            self.cls = cls
        self.buf.append(glyph)

    def flush(self) -> None:
        if self.buf:
            self.emit("".join(self.buf), self.cls)
            self.buf = []


def _clean(value: float | None) -> float:
    if value is None or not math.isfinite(value):
        return -math.inf
    return min(6.0, float(value))


def _frac(db: float) -> float:
    if db == -math.inf:
        return 0.0
    return min(1.0, max(0.0, (db - FLOOR_DB) / -FLOOR_DB))


def _eighths(db: float, cells: int) -> int:
    return int(round(_frac(db) * cells * 8))


def _cell(db: float, cells: int) -> int:
    if db == -math.inf:
        return -1
    return min(cells - 1, int(_frac(db) * cells))


def _zone(db: float) -> str:
    if db < YELLOW_DB:
        return "meter--low"
    if db < RED_DB:
        return "meter--mid"
    return "meter--high"


class VadLight(Widget):
    """The user's voice-activity light: `● YOU` when speaking, `○ you` when not (never colour-only)."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"vad--on", "vad--off"}
    DEFAULT_CSS = """
    VadLight { width: auto; height: 1; }
    VadLight > .vad--on { color: $lane-you; text-style: bold; }
    VadLight > .vad--off { color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.active = False

    def set_active(self, active: bool) -> None:
        if bool(active) != self.active:
            self.active = bool(active)
            self.refresh()

    def render(self) -> Text:
        if self.active:
            return Text("● YOU SPEAKING", self.get_component_rich_style("vad--on"))
        return Text("○ you quiet   ", self.get_component_rich_style("vad--off"))


class Lane(LineWidget):
    """A history lane: block glyphs on a fixed 0..1 scale, newest at the right.

    Samples are `(t, value)` in seconds; the lane covers the last `window_s` seconds, one bucket
    per cell (the maximum of the samples in it). Unlike `Sparkline` the scale does not follow the
    data, so silence looks like silence.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"lane--label", "lane--bar", "lane--note"}
    DEFAULT_CSS = """
    Lane { height: 1; width: 1fr; }
    Lane > .lane--label { text-style: bold; }
    Lane > .lane--bar { color: $primary; }
    Lane > .lane--note { color: $text-muted; }
    """

    def __init__(self, label: str, *, window_s: float = 20.0, label_width: int = 6,
                 note: str | None = None, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.label = label
        self.label_width = label_width
        self.window_s = window_s
        self.note = note if note is not None else f"({window_s:.0f} s)"
        self._samples: deque[tuple[float, float]] = deque()
        self._now = 0.0
        self._shown: str | None = None

    def push(self, t: float, value: float) -> None:
        self._samples.append((t, min(1.0, max(0.0, float(value)))))
        self._now = t
        while self._samples and self._samples[0][0] < t - self.window_s:
            self._samples.popleft()

    def extend(self, samples: Iterable[tuple[float, float]]) -> None:
        for t, v in samples:
            self.push(t, v)

    def clear(self) -> None:
        self._samples.clear()
        self._shown = None
        self.invalidate()

    def update_display(self) -> None:
        """Re-buckets the samples and redraws when the glyphs changed."""
        glyphs = self._glyphs()
        if glyphs != self._shown:
            self._shown = glyphs
            self.invalidate()

    def line_count(self) -> int:
        return 1

    def _cells(self, width: int | None = None) -> int:
        width = width or self.size.width or 40
        return max(1, width - self.label_width - len(self.note) - 1)

    def _glyphs(self, width: int | None = None) -> str:
        cells = self._cells(width)
        if not self._samples:
            return " " * cells
        buckets = [-1.0] * cells
        start = self._now - self.window_s
        dt = self.window_s / cells
        for t, v in self._samples:
            i = int((t - start) / dt)
            if 0 <= i < cells and v > buckets[i]:
                buckets[i] = v
            elif i >= cells and v > buckets[-1]:
                buckets[-1] = v
        out = []
        for b in buckets:
            if b < 0:
                out.append(" ")
            else:
                out.append(LANE_GLYPHS[1 + int(round(b * 7))])
        return "".join(out)

    def build(self, width: int) -> list[Line]:
        glyphs = self._glyphs(width)
        return [[(self.label.ljust(self.label_width)[: self.label_width], "lane--label"),
                 (glyphs, "lane--bar"), (" " + self.note, "lane--note")]]
