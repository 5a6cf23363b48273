"""The UI's state: which run, prompt, token and attention head are in focus. Views read it; only
the app changes it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from workbench.errors import UserError
from workbench.store.files import final_name

if TYPE_CHECKING:
    from workbench.store.reader import Run

F = TypeVar("F", bound=Callable[..., Any])


def shows_damage(method: F) -> F:
    """Wrap a method of the app or of a widget that reads a run: a :class:`UserError` it raises (a
    damaged run: an offset past its data, a missing part; docs/store.md) is shown as an error
    notice and the session goes on. (Textual ends the app on any exception a handler raises, and
    a message pump that raised stops, so the error is caught here, where it happens.) The same
    notice is not repeated: a live run is polled several times a second."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except UserError as exc:
            app = getattr(self, "app", self)
            if getattr(app, "_last_damage", None) != str(exc):
                app._last_damage = str(exc)
                app.notify(str(exc), title="cannot show this", severity="error", timeout=15)
            return None

    return wrapper  # type: ignore[return-value]


@dataclass
class Focus:
    prompt: int = 0
    pos: int = 0
    """Focused token of the prompt's main stream: the query row of attention views."""
    key: int = 0
    """Key column of the attention view's cursor."""
    pattern: int = 0
    """Index into the run's attention patterns (:func:`workbench.store.depth.pattern_hooks`)."""
    head: int = 0
    point: int = 0
    """Row of the residual-norm view (a point of the residual stream)."""
    show_ids: bool = False
    log_scale: bool = True
    """Residual norms on a log colour scale (``l`` toggles)."""
    skip_sink: bool | None = None
    """Leave position 0 out of the residual colour scale: ``None`` when it is an attention sink
    (:func:`workbench.store.depth.sink_position`), else as toggled with ``x``."""


def find_runs(folder: Path) -> list[Path]:
    """Runs in ``folder``: ``*.h5`` files, ``*.h5.partial`` ones whose capture has not finished
    (a finished file wins over a stale partial of the same name), and sharded captures still
    running (``RUN.h5.shards/units.json`` without ``RUN.h5``)."""
    finals = sorted(p for p in folder.glob("*.h5") if p.is_file())
    partials = sorted(p for p in folder.glob("*.h5.partial")
                      if p.is_file() and final_name(p) not in finals)
    sharded = sorted(d.with_name(d.name[: -len(".shards")]) for d in folder.glob("*.h5.shards")
                     if (d / "units.json").is_file() and not d.with_name(d.name[: -len(".shards")]).exists())
    return finals + partials + sharded


def open_runs(paths: list[str]) -> list[Run]:
    """Open every run named (or every run in the current folder); a user error names the first
    that cannot be opened, after closing the others."""
    from workbench.store import open_run

    targets = [Path(p) for p in paths] if paths else find_runs(Path.cwd())
    if not targets:
        raise UserError("no runs here (no *.h5 in the current folder); name one: workbench tui RUN")
    runs: list[Run] = []
    try:
        for p in targets:
            runs.append(open_run(p))
    except BaseException:
        for r in runs:
            r.close()
        raise
    return runs
