"""Terminal views: how the UI shows an analysis's stored results.

A plugin registers a :class:`View` through the ``register_views`` hook. ``View.make`` builds a
Textual widget for one stored result; it runs only when the view is shown, so it imports Textual
inside. A result with no registered view is shown by the UI's generic table and array view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.analysis import NAME_RE

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult


@dataclass
class View:
    """A terminal view of one analysis's results."""

    name: str
    """Unique across plugins (lower case, digits, ``-``, ``_``, ``.``)."""
    analysis: str
    """The analysis whose results it shows."""
    title: str
    """Shown in the UI's view list."""
    make: Callable[[StoredResult, Run], Any]
    """``make(result, run)`` returns a Textual ``Widget`` showing ``result``."""
    plugin: str = ""
    """Set by workbench at registration."""
    figure: Callable[..., Any] | None = None
    """Optional: ``figure(result, run, prompt=0, **options)`` returns a matplotlib ``Figure`` of the
    same numbers (``workbench.show`` in a notebook); import matplotlib inside it. Without one, a
    notebook shows the terminal view's own drawing."""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"view name {self.name!r}: use lower case letters, digits, '-', '_', '.'")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "analysis": self.analysis, "title": self.title, "plugin": self.plugin}


def lazy_view(module: str, widget: str) -> Callable[[StoredResult, Run], Any]:
    """A ``View.make`` that imports ``module`` (where the Textual widgets live) only when the view
    is shown, and returns ``module.widget(result, run)``: registering views imports no Textual.
    (A ``View.figure`` is made the same way: keyword options are passed on.)"""

    def make(stored: StoredResult, run: Run, **options: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), widget)(stored, run, **options)

    return make


class ViewRegistry:
    def __init__(self) -> None:
        self.by_name: dict[str, View] = {}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self.by_name.values(), key=lambda v: v.name))

    def __len__(self) -> int:
        return len(self.by_name)

    def for_analysis(self, analysis: str) -> list[View]:
        return [v for v in self if v.analysis == analysis]
