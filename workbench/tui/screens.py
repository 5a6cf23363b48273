"""Modal screens: help, token search, choosing an analysis to run."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option


def key_label(key: str) -> str:
    names = {"left": "←", "right": "→", "up": "↑", "down": "↓", "shift+left": "shift+←",
             "shift+right": "shift+→", "question_mark": "?", "slash": "/", "left_square_bracket": "[",
             "right_square_bracket": "]", "comma": ",", "full_stop": ".", "escape": "esc"}
    return ",".join(names.get(k, k) for k in key.split(","))


class HelpScreen(ModalScreen[None]):
    """Every key of the app, generated from its bindings (so it cannot fall out of date)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 76; max-width: 100%; height: auto; max-height: 90%;
                                  border: round $accent; background: $surface; padding: 0 1; }
    """

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.bindings_shown = bindings

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, what in self.bindings_shown:
            table.add_row(key_label(key), what)
        table.add_row("ctrl+p", "command palette: every action by name")
        table.add_row("mouse", "optional: click tabs, prompts and results")
        with VerticalScroll():
            yield Static(Text("workbench — keys", style="bold"))
            yield Static(table, id="help-table")
            yield Static(Text("esc closes this screen", style="dim"))


class SearchScreen(ModalScreen[str | None]):
    """Ask for a token text to find (case-insensitive substring of a token)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    SearchScreen { align: center bottom; }
    SearchScreen > Vertical { width: 60; max-width: 100%; height: auto; border: round $accent;
                              background: $surface; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("find a token (from the focused one on, across prompts):")
            yield Input(placeholder="e.g.  Paris", id="search-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class AnalysisPicker(ModalScreen[str | None]):
    """Choose an analysis to run on the run; those whose inputs the run lacks are listed,
    disabled, with what they need."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    AnalysisPicker { align: center middle; }
    AnalysisPicker > Vertical { width: 72; max-width: 100%; height: auto; max-height: 80%;
                                border: round $accent; background: $surface; }
    """

    def __init__(self, choices: list[tuple[str, str, list[str]]]) -> None:
        super().__init__()
        self.choices = choices

    def compose(self) -> ComposeResult:
        options: list[Any] = []
        for name, description, missing in self.choices:
            label = Text.assemble((name, "bold"), "  ", (description.splitlines()[0] if description else "", "dim"))
            if missing:
                label.append(f"\n  needs {'; '.join(missing)}", style="red")
            options.append(Option(label, id=name, disabled=bool(missing)))
        with Vertical():
            yield Label("run an analysis (enter; esc cancels):")
            yield OptionList(*options, id="analysis-list")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PromptScreen(ModalScreen[str | None]):
    """Type a prompt to run through the live model (Enter runs it, Escape cancels)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    PromptScreen { align: center bottom; }
    PromptScreen > Vertical { width: 72; max-width: 100%; height: auto; border: round $accent;
                              background: $surface; }
    """

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("a prompt for the live model (Enter runs it; then > samples a token, t temperature):")
            yield Input(value=self.text, placeholder="e.g.  The river bank was", id="prompt-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
