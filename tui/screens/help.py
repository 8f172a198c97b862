"""`?` help: every key the dashboard answers to, with what it does."""

from __future__ import annotations

from typing import Iterable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    """A modal listing `(keys, description, detail)` rows. Esc, `?`, `q` or Enter closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90; max-width: 100%; height: auto; max-height: 100%;
        border: round $primary; background: $surface; padding: 0 1;
    }
    HelpScreen #help-title { text-style: bold; color: $primary; }
    HelpScreen #help-foot { color: $text-muted; }
    """

    BINDINGS = [
        Binding("escape", "close", "Close", id="help.close.esc", show=False),
        Binding("question_mark", "close", "Close", id="help.close", show=False),
        Binding("q", "close", "Close", id="help.close.q", show=False),
        Binding("enter", "close", "Close", id="help.close.enter", show=False),
    ]

    def __init__(self, rows: Iterable[tuple[str, str, str]], *, notes: str = ""):
        super().__init__()
        self.rows = list(rows)
        self.notes = notes

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(style="dim")
        for keys, description, detail in self.rows:
            table.add_row(keys, description, detail)
        with VerticalScroll():
            yield Static("Parley keys", id="help-title")
            yield Static(table, id="help-table")
            foot = Text(self.notes + ("\n" if self.notes else ""))
            foot.append("ctrl+p opens the command palette (personas, themes, refresh presets). "
                        "Esc, ? or q closes this help.")
            yield Static(foot, id="help-foot")

    def action_close(self) -> None:
        self.dismiss(None)
