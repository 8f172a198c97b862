"""`LineWidget`: a widget drawn through Textual's line API from cached strips.

The fast-updating widgets (meters, lanes, stage bars, the status strip, engine numbers) describe
their content as lines of `(text, component_class)` runs. The strips are built once per change and
`render_line` hands them out, which skips the Rich `Text` → `Content` → strip conversion of
`render()`: a meter costs ~0.1 ms instead of ~1 ms per redraw on a small VM (TUI.md §4).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.strip import Strip
from textual.widget import Widget

Run = tuple[str, str | None]  # (text, component class or None for the widget's own style)
Line = Sequence[Run]


class LineWidget(Widget):
    """Subclasses implement `build(width) -> list of lines` and call `invalidate()` on change."""

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._strips: list[Strip] = []
        self._lines: list[Line] = []
        self._built_for: tuple | None = None
        self._stale = True

    # -- for subclasses ------------------------------------------------------------------------

    def build(self, width: int) -> list[Line]:
        raise NotImplementedError

    def line_count(self) -> int | None:
        """Fixed number of lines (for `height: auto`), or None to count what `build` returns."""
        return None

    def invalidate(self) -> None:
        """The content changed: rebuild the strips at the next frame."""
        self._stale = True
        self.refresh()

    # -- plain text (tests, screen readers of a sort) --------------------------------------------

    @property
    def plain(self) -> str:
        width = self.size.width or 80
        return "\n".join("".join(text for text, _ in line) for line in self.build(width))

    # -- Textual -------------------------------------------------------------------------------

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        fixed = self.line_count()
        if fixed is not None:
            return fixed
        return max(1, len(self.build(width)))

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._stale = True

    def _rebuild(self, width: int) -> None:
        base = self.rich_style
        cache: dict[str | None, Style] = {None: base}

        def style(cls: str | None) -> Style:
            found = cache.get(cls)
            if found is None:
                found = cache[cls] = self.get_component_rich_style(cls)  # type: ignore[arg-type]
            return found

        self._lines = self.build(width)
        strips = []
        for line in self._lines:
            segments = [Segment(text, style(cls)) for text, cls in line if text]
            strips.append(Strip(segments).crop_extend(0, width, base))
        self._strips = strips
        self._built_for = (width, self.app.theme)
        self._stale = False

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if self._stale or self._built_for != (width, self.app.theme):
            self._rebuild(width)
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(width, self.rich_style)


class LineBuilder:
    """Collects `(text, class)` runs; a newline in `text` starts the next line."""

    def __init__(self) -> None:
        self.lines: list[list[Run]] = [[]]

    def append(self, text: str, cls: str | None = None) -> None:
        parts = text.split("\n")
        for i, part in enumerate(parts):
            if i:
                self.lines.append([])
            if part:
                self.lines[-1].append((part, cls))


def runs_plain(lines: Iterable[Line]) -> str:
    return "\n".join("".join(text for text, _ in line) for line in lines)
