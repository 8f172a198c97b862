"""The error banner (one line under the status strip) and its details screen (`e`)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class ErrorBanner(Static):
    """Shows the latest error as a plain sentence that says the fix; hidden when there is none."""

    DEFAULT_CSS = """
    ErrorBanner {
        height: auto; max-height: 3; width: 1fr; display: none;
        background: $error; color: auto 90%; text-style: bold; padding: 0 1;
    }
    ErrorBanner.-warning { background: $warning; color: #000000; }
    ErrorBanner.-shown { display: block; }
    """

    def __init__(self, *, id: str | None = None):
        super().__init__("", id=id)
        self.message: str | None = None
        self.details: str | None = None
        self.history: list[tuple[str, str | None]] = []

    def show(self, message: str, *, details: str | None = None, warning: bool = False) -> None:
        self.message = message
        self.details = details
        self.history.append((message, details))
        del self.history[:-50]
        self.set_class(warning, "-warning")
        text = Text()
        text.append("⚠ WARNING " if warning else "✖ ERROR ", "bold reverse")
        text.append(" " + message)
        text.append("   e details · x dismiss", "dim")
        self.update(text)
        self.add_class("-shown")

    def dismiss(self) -> None:
        self.message = None
        self.remove_class("-shown")

    @property
    def shown(self) -> bool:
        return self.has_class("-shown")


class ErrorScreen(ModalScreen[None]):
    """The latest errors with their details (never a traceback)."""

    DEFAULT_CSS = """
    ErrorScreen { align: center middle; }
    ErrorScreen > Vertical {
        width: 90; max-width: 100%; height: auto; max-height: 100%;
        border: round $error; background: $surface; padding: 0 1;
    }
    ErrorScreen #errors-foot { color: $text-muted; }
    """

    BINDINGS = [
        Binding("escape", "close", "Close", id="errors.close.esc", show=False),
        Binding("q", "close", "Close", id="errors.close", show=False),
        Binding("e", "close", "Close", id="errors.close.e", show=False),
    ]

    def __init__(self, history: list[tuple[str, str | None]]):
        super().__init__()
        self.history = list(history)

    def compose(self) -> ComposeResult:
        text = Text()
        if not self.history:
            text.append("No errors so far.", "dim")
        for message, details in reversed(self.history[-10:]):
            text.append("• " + message + "\n", "bold")
            if details:
                text.append("  " + details + "\n", "dim")
        with Vertical():
            with VerticalScroll():
                yield Static(text)
            yield Static("Esc closes · x on the dashboard dismisses the banner", id="errors-foot")

    def action_close(self) -> None:
        self.dismiss(None)
