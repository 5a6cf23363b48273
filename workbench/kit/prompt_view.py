"""The base of views that show one prompt of a stored result at a time (imports Textual)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.widgets import Static

from workbench.kit.shading import Window

if TYPE_CHECKING:
    from workbench.kit.focus import Focus
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult


class PromptView(Static):
    """A view of one stored result that shows the focused prompt's record and follows the UI's
    focus (it implements :class:`~workbench.kit.FollowsFocus`).

    The result's ``data["prompts"]`` is a list of per-prompt records, each with an ``index`` (the
    prompt's index in the run). Subclasses implement :meth:`draw`, which returns a Rich renderable
    for ``self.prompt`` (and ``self.pos``); it is redrawn when the focus moves. Call
    ``self.update(self.draw())`` after changing anything else ``draw`` reads (a key binding's
    action, say).
    """

    DEFAULT_CSS = "PromptView { height: auto; }"
    window = 10
    """Positions shown by :meth:`columns`."""
    records_key = "prompts"
    """The list in ``data`` holding one record per prompt (a diff's is ``pairs``)."""
    index_key = "index"
    """The field of a record naming its prompt's index in the run (a diff pair's is ``a``)."""

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__()
        self.stored = stored
        self.run = run
        self.data = stored.data
        records = self.data[self.records_key]
        self.by_index: dict[int, dict[str, Any]] = {int(p[self.index_key]): p for p in records}
        self.prompt: int = int(records[0][self.index_key]) if records else 0
        self.pos: int = 0

    def on_mount(self) -> None:
        self.update(self.draw())

    def follow(self, run: Run, focus: Focus) -> None:
        """Keep ``run``; redraw when the focused prompt or token changed."""
        self.run = run
        if (focus.prompt, focus.pos) != (self.prompt, self.pos):
            self.prompt, self.pos = focus.prompt, focus.pos
            self.update(self.draw())

    def record(self) -> dict[str, Any] | None:
        """The result's record of the focused prompt; ``None`` when the result does not cover it."""
        return self.by_index.get(self.prompt)

    def columns(self, n: int) -> range:
        """The positions shown of a prompt of ``n`` tokens: a window of ``self.window`` around the
        focused token."""
        w = Window.around(n, self.pos, self.window)
        return range(w.start, w.stop)

    def draw(self) -> Any:
        """The view of the focused prompt (a Rich renderable)."""
        raise NotImplementedError
