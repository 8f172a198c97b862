"""The model's streaming text: pieces flow into a live line; finished lines are committed.

A line is committed at a sentence end, after ~1 s without a text piece (the model emitting PAD),
or when it grows too long. Stretches where the user spoke (from voice activity) get a dim marker
line, because the model does not transcribe the user (TUI.md §2.2). One live line plus a
`RichLog` of committed lines keeps the cost at one short redraw per coalesced update (TUI.md §4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import RichLog, Static

from .lines import LineWidget

SENTENCE_END = (".", "!", "?", "…")
IDLE_COMMIT_S = 1.0
MAX_LINE_CHARS = 240


@dataclass(frozen=True)
class Line:
    t: float  # wall-clock time the line started
    text: str
    kind: str = "model"  # "model" or "you"


class TranscriptBuffer:
    """Pure state: the live line and the committed lines (no Textual)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.live = ""
        self.live_t: float | None = None
        self.last_piece_t: float | None = None
        self.committed: list[Line] = []  # drained by the widget
        self._last_kind: str | None = None
        self.pieces = 0

    def add_piece(self, piece: str, t: float | None = None) -> None:
        if not piece:
            return
        t = self.clock() if t is None else t
        if not self.live:
            self.live_t = t
            piece = piece.lstrip()
            if not piece:
                return
        self.live += piece
        self.last_piece_t = t
        self.pieces += 1
        stripped = self.live.rstrip()
        if stripped.endswith(SENTENCE_END) and piece.rstrip().endswith(SENTENCE_END):
            self.commit()
        elif len(self.live) > MAX_LINE_CHARS:
            cut = self.live.rfind(" ", 0, MAX_LINE_CHARS)
            cut = cut if cut > 0 else MAX_LINE_CHARS
            head, rest = self.live[:cut], self.live[cut:].lstrip()
            self.live = head
            self.commit()
            if rest:
                self.live, self.live_t = rest, t

    def tick(self, now: float | None = None) -> None:
        """Commits the live line after IDLE_COMMIT_S without a piece."""
        now = self.clock() if now is None else now
        if self.live and self.last_piece_t is not None and now - self.last_piece_t >= IDLE_COMMIT_S:
            self.commit()

    def user_spoke(self, t: float | None = None) -> None:
        """Marks that the user started speaking (a VAD rising edge)."""
        t = self.clock() if t is None else t
        if self.live:
            self.commit()
        if self._last_kind == "you":
            return
        self.committed.append(Line(t, "┄ you ┄", "you"))
        self._last_kind = "you"

    def commit(self) -> None:
        text = self.live.strip()
        if text:
            self.committed.append(Line(self.live_t or self.clock(), text, "model"))
            self._last_kind = "model"
        self.live = ""
        self.live_t = None

    def drain(self) -> list[Line]:
        out, self.committed = self.committed, []
        return out

    def clear(self) -> None:
        self.live = ""
        self.live_t = None
        self.committed = []
        self._last_kind = None


def stamp(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


class LiveLine(LineWidget):
    """The line being spoken: one row, redrawn without a layout pass (unlike `Static.update`)."""

    COMPONENT_CLASSES = {"live--time", "live--cursor"}
    DEFAULT_CSS = """
    LiveLine { height: 1; width: 1fr; }
    LiveLine > .live--time { color: $text-muted; }
    LiveLine > .live--cursor { text-style: bold; }
    """

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.stamp = ""
        self.text = ""

    def set_line(self, stamp: str, text: str) -> None:
        if (stamp, text) != (self.stamp, self.text):
            self.stamp, self.text = stamp, text
            self.invalidate()

    def line_count(self) -> int:
        return 1

    def build(self, width: int):
        if not self.text:
            return [[]]
        room = max(10, width - len(self.stamp) - 3)
        body = self.text if len(self.text) <= room else "…" + self.text[-(room - 1):]
        return [[(self.stamp, "live--time"), ("  " + body, None), ("▌", "live--cursor")]]


class Transcript(Vertical):
    """Committed lines (a `RichLog`) above a one-line live line (a `Static`)."""

    DEFAULT_CSS = """
    Transcript { height: 1fr; }
    Transcript > RichLog {
        height: 1fr; background: transparent; overflow-y: auto; overflow-x: hidden;
        scrollbar-size-vertical: 1;
    }
    Transcript > #empty { color: $text-muted; height: auto; }
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, id: str | None = None,
                 classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.buffer = TranscriptBuffer(clock)
        self._live_shown: str | None = None
        self.lines_written = 0

    def compose(self) -> ComposeResult:
        yield Static("The model's words appear here as it speaks.", id="empty")
        yield RichLog(max_lines=1000, min_width=20, wrap=True, markup=False, auto_scroll=True,
                      id="log")
        yield LiveLine(id="live")

    # -- feeding ------------------------------------------------------------------------------

    def add_piece(self, piece: str, t: float | None = None) -> None:
        self.buffer.add_piece(piece, t)

    def user_spoke(self, t: float | None = None) -> None:
        self.buffer.user_spoke(t)

    def clear(self) -> None:
        self.buffer.clear()
        self.query_one(RichLog).clear()
        self.lines_written = 0
        self._live_shown = None
        self.query_one("#empty").display = True
        self.update_display()

    def update_display(self, now: float | None = None) -> None:
        """Commits idle lines and redraws what changed (call at the text rate, <= 10 Hz)."""
        self.buffer.tick(now)
        lines = self.buffer.drain()
        if lines:
            log = self.query_one(RichLog)
            for line in lines:
                log.write(self._render_line(line))
            self.lines_written += len(lines)
            if self.query_one("#empty").display:
                self.query_one("#empty").display = False
        live = self.buffer.live
        if live != self._live_shown:
            self._live_shown = live
            stamp_text = stamp(self.buffer.live_t or self.buffer.clock()) if live else ""
            self.query_one(LiveLine).set_line(stamp_text, live)
            if live and self.query_one("#empty").display:
                self.query_one("#empty").display = False

    @property
    def committed_text(self) -> list[str]:
        return [strip.text for strip in self.query_one(RichLog).lines]

    @property
    def live_text(self) -> str:
        return self.buffer.live

    # -- drawing ------------------------------------------------------------------------------

    def _render_line(self, line: Line) -> Table:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(ratio=1, overflow="fold")
        if line.kind == "you":
            grid.add_row(stamp(line.t), Text(line.text, style="dim italic"))
        else:
            grid.add_row(stamp(line.t), Text(line.text))
        return grid
