"""The persona picker: each persona's name, voice and role prompt, chosen with Enter."""

from __future__ import annotations

from typing import Any, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option


def persona_name(p: Any) -> str:
    return str(getattr(p, "name", p))


def persona_voice(p: Any) -> str:
    voice = getattr(p, "voice", None)
    if voice is None:
        return "–"
    return str(getattr(voice, "name", voice))


def persona_prompt(p: Any) -> str:
    return str(getattr(p, "prompt", "") or "")


def persona_title(p: Any) -> str:
    return str(getattr(p, "title", None) or getattr(p, "description", None) or "")


class PersonaPicker(ModalScreen[str | None]):
    """Returns the chosen persona's name, or None when closed."""

    DEFAULT_CSS = """
    PersonaPicker { align: center middle; }
    PersonaPicker > Vertical {
        width: 100; max-width: 100%; height: 24; max-height: 100%;
        border: round $primary; background: $surface;
    }
    PersonaPicker #picker-title { text-style: bold; color: $primary; padding: 0 1; }
    PersonaPicker Horizontal { height: 1fr; }
    PersonaPicker OptionList { width: 30; height: 1fr; }
    PersonaPicker #preview-scroll { width: 1fr; height: 1fr; padding: 0 1; }
    PersonaPicker #picker-foot { color: $text-muted; padding: 0 1; }
    """

    BINDINGS = [
        Binding("escape", "close", "Close", id="personas.close.esc", show=False),
        Binding("q", "close", "Close", id="personas.close", show=False),
    ]

    def __init__(self, personas: Sequence[Any], current: str | None = None):
        super().__init__()
        self.personas = list(personas)
        self.current = current

    def compose(self) -> ComposeResult:
        options = []
        for p in self.personas:
            name = persona_name(p)
            label = Text(name, style="bold" if name == self.current else "")
            if name == self.current:
                label.append("  (now)", style="dim")
            options.append(Option(label, id=name))
        with Vertical():
            yield Static("Choose a persona: voice + role prompt", id="picker-title")
            with Horizontal():
                yield OptionList(*options, id="persona-list")
                with VerticalScroll(id="preview-scroll"):
                    yield Static("", id="preview")
            yield Static("↑/↓ look · Enter switch (resets the conversation) · Esc close",
                         id="picker-foot")

    def on_mount(self) -> None:
        option_list = self.query_one(OptionList)
        names = [persona_name(p) for p in self.personas]
        if self.current in names:
            option_list.highlighted = names.index(self.current)
        elif names:
            option_list.highlighted = 0
        option_list.focus()
        self._show(option_list.highlighted)

    def _show(self, index: int | None) -> None:
        preview = self.query_one("#preview", Static)
        if index is None or not (0 <= index < len(self.personas)):
            preview.update("No personas found.")
            return
        p = self.personas[index]
        text = Text()
        text.append(persona_name(p), "bold")
        title = persona_title(p)
        if title:
            text.append(f"  {title}", "dim")
        text.append("\nvoice  ", "dim")
        text.append(persona_voice(p), "bold")
        text.append("\n\n")
        prompt = persona_prompt(p)
        text.append(prompt if prompt else "(no role prompt)", "" if prompt else "dim")
        preview.update(text)

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self._show(event.option_index)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_close(self) -> None:
        self.dismiss(None)
