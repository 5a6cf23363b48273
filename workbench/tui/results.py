"""The results panel: a run's stored analysis results, each shown by the view its plugin
registered (``register_views``) or by the generic view (tables for records, shaded grids for 2-D
arrays) when none is.

The entry on screen is marked (``▶``) whether or not the list has the focus, and Tab goes from the
list straight into the view's first focusable widget (its keys then work without the mouse; a view
with none gets the scrolling body instead). A plugin view is asked to follow the focus (class
``result-view``) only while it is mounted: from the end of its mount to the start of its removal.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from workbench.tui import render as R

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult
    from workbench.views import View, ViewRegistry


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


def generic_renderable(stored: StoredResult, width: int = 76) -> Any:
    """Any stored result as Rich tables: scalars, lists of records, and arrays (2-D arrays
    also as a shaded grid)."""
    parts: list[Any] = []
    head = Text.assemble((f"{stored.analysis} {stored.version}", "bold"), "  ",
                         ", ".join(f"{k}={v!r}" for k, v in stored.params.items()))
    parts.append(head)
    if not stored.ok:
        parts.append(Text(f"error: {stored.error}", style="red"))
        return Group(*parts)
    data = stored.result().data
    scalars = Table.grid(padding=(0, 2))
    scalars.add_column(style="bold")
    scalars.add_column()
    nested: list[tuple[str, Any]] = []
    items = data.items() if isinstance(data, dict) else [("value", data)]
    for k, v in items:
        if isinstance(v, (dict, list)):
            nested.append((k, v))
        else:
            scalars.add_row(str(k), _scalar(v))
    parts.append(scalars)
    for k, v in nested:
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            cols = list(dict.fromkeys(c for r in v[:50] for c in r))
            t = Table(title=f"{k} ({len(v)})", title_justify="left", header_style="bold", box=None)
            for c in cols:
                t.add_column(str(c))
            for r in v[:50]:
                t.add_row(*[_scalar(r.get(c, "")) for c in cols])
            parts.append(t)
        else:
            parts.append(Text.assemble((f"{k}: ", "bold"), _scalar(v)[:2000]))
    arrays = stored.arrays
    if arrays:
        t = Table(title="arrays", title_justify="left", header_style="bold", box=None)
        for c in ("name", "shape", "dtype", "min", "mean", "max"):
            t.add_column(c)
        for name, a in arrays.items():
            finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a.reshape(-1)
            stats = ([_scalar(float(x)) for x in (finite.min(), finite.mean(), finite.max())]
                     if finite.size else ["", "", ""])
            t.add_row(name, "×".join(map(str, a.shape)), str(a.dtype), *stats)
        parts.append(t)
        for name, a in arrays.items():
            if a.ndim == 2 and a.dtype.kind == "f" and a.size:
                rows = [str(i) for i in range(a.shape[0])]
                vals = np.abs(np.nan_to_num(a.astype(np.float64)))
                parts.append(Text(f"{name} (|value| shaded)", style="bold"))
                parts.append(R.grid(vals, rows, [str(i) for i in range(a.shape[1])], (0, 0), width,
                                    min(20, a.shape[0] + 1), label_width=4))
    return Group(*parts)


class GenericResultView(Static):
    """The fallback view of a result no plugin registered a view for."""

    def __init__(self, stored: StoredResult) -> None:
        super().__init__(generic_renderable(stored))
        self.stored = stored


class ResultsPanel(Horizontal):
    """Stored results of the run on the left; the chosen one's view on the right."""

    DEFAULT_CSS = """
    ResultsPanel { height: 1fr; }
    ResultsPanel > #result-list { width: 22; height: 1fr; }
    ResultsPanel > #result-body { width: 1fr; height: 1fr; padding: 0 1; }
    ResultsPanel > #result-list > .option-list--option-highlighted { text-style: bold; }
    ResultsPanel DataTable > .datatable--cursor { text-style: bold; }
    """
    MARK = "▶ "
    """Prefix of the entry on screen (the list's highlight alone is faint while it lacks focus)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entries: list[tuple[StoredResult, View | None]] = []
        self.labels: list[Text] = []
        self.shown: int | None = None
        """Index of the entry whose view is on screen."""
        self.run: Run | None = None
        self.views: ViewRegistry | None = None

    def compose(self) -> ComposeResult:
        yield OptionList(id="result-list")
        yield VerticalScroll(id="result-body")

    def show(self, run: Run, views: ViewRegistry, select: str | None = None) -> None:
        """List ``run``'s results (one entry per result and registered view); ``select`` picks
        the first entry of that analysis."""
        from workbench.store.results import list_results

        self.run, self.views = run, views
        listing = self.query_one("#result-list", OptionList)
        listing.clear_options()
        self.entries, self.labels, self.shown = [], [], None
        for stored in list_results(run):
            views_for: list[View | None] = list(views.for_analysis(stored.analysis)) if stored.ok else []
            for view in (views_for or [None]):
                self.entries.append((stored, view))
                how = view.title if view is not None else "generic view"
                state = "error" if not stored.ok else ("stale" if not stored.current(run) else "")
                label = Text.assemble((stored.analysis, "bold"), f" {stored.version}")
                if stored.params:
                    label.append(" " + " ".join(f"{k}={v}" for k, v in stored.params.items()), style="dim")
                label.append(f"\n  {how}" + (f" · {state}" if state else ""), style="dim")
                self.labels.append(label)
                listing.add_option(Option(self._label(len(self.labels) - 1)))
        if not self.entries:
            self._swap_later([Static(Text("no analysis results stored for this run yet: press a to "
                                          "run one", style="dim"))])
            return
        index = 0
        if select is not None:
            index = next((k for k, (s, _) in enumerate(self.entries) if s.analysis == select), 0)
        listing.highlighted = index  # opens it (the highlight event)

    def _label(self, index: int) -> Text:
        return Text.assemble(self.MARK if index == self.shown else " " * len(self.MARK), self.labels[index])

    def _mark(self, index: int | None) -> None:
        """Mark entry ``index`` as the one on screen (and unmark the one before)."""
        before, self.shown = self.shown, index
        listing = self.query_one("#result-list", OptionList)
        for k in {before, index} - {None}:
            if k is not None and k < len(self.labels) and k < listing.option_count:
                listing.replace_option_prompt_at_index(k, self._label(k))

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_list.id == "result-list" and event.option_index is not None:
            self.open(event.option_index)

    def open(self, index: int) -> None:
        if not 0 <= index < len(self.entries) or self.run is None:
            return
        stored, view = self.entries[index]
        widgets: list[Any] = []
        follower = None
        if view is None:
            widgets.append(GenericResultView(stored))
        else:
            try:
                follower = view.make(stored, self.run)
                widgets.append(follower)
            except Exception as exc:  # noqa: BLE001 - a plugin's view must not take the app down
                widgets.append(Static(Text(f"view {view.name} ({view.plugin}) failed: {exc!r}\n",
                                           style="red")))
                widgets.append(GenericResultView(stored))
        self._mark(index)
        self._swap_later(widgets, follower)

    def _swap_later(self, widgets: list[Any], follower: Any = None) -> None:
        # Removing children completes asynchronously: mount the new view only after the old one
        # is gone (a plugin's widget may carry a fixed id). Swaps run in order.
        self.call_later(self._swap, widgets, follower)

    async def _swap(self, widgets: list[Any], follower: Any = None) -> None:
        body = self.query_one("#result-body", VerticalScroll)
        # Textual removes a widget's children before the widget itself: a view still in the DOM
        # may already have lost its parts, so it stops following before its removal starts ...
        for old in body.query(".result-view"):
            old.remove_class("result-view")
        await body.remove_children()
        await body.mount_all(widgets)
        # ... and starts once it is mounted (composed: its parts exist).
        body.can_focus = not any(w.focusable for w in body.query("*"))  # Tab: into the view
        if follower is not None and follower.is_attached:
            follower.add_class("result-view")
        follow = getattr(self.app, "follow_results", None)
        if callable(follow):
            follow()
