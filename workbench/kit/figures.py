"""Matplotlib figures for views (``View.figure``) and ``workbench plot``: made with
``matplotlib.figure.Figure``, not pyplot, so nothing global changes and a notebook's backend is
left as it is (``Figure.savefig`` draws with Agg). matplotlib is the extra ``plot``."""

from __future__ import annotations

from typing import Any

from workbench.errors import UserError


def new_figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes (``Figure.subplots(rows, cols)``); ``kwargs`` go to ``Figure``
    (``layout="constrained"``, say). A UserError (one line) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (the package itself: its submodules may be cached without it)
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("figures need matplotlib: pip install 'workbench[plot]'") from None
    fig = Figure(figsize=figsize, **kwargs)
    return fig, fig.subplots(rows, cols)
