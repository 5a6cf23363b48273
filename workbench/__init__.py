"""workbench: a plugin-based interpretability workbench for transformer language models.

Public API (imported lazily: ``import workbench`` does not import torch)::

    import workbench
    model = workbench.load_model("smollm2-135m")
    model.predict("The capital of France is").top[0].token   # ' Paris'

In Jupyter, runs and stored results display themselves, and ``workbench.show(run, "attention",
layer=3, head=1)`` returns a figure (:mod:`workbench.notebook`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from workbench.errors import UserError
from workbench.hookspecs import hookimpl

from workbench.version import __version__

if TYPE_CHECKING:
    from workbench.analysis import Analysis, AnalysisContext, Param
    from workbench.interop import activation_cache
    from workbench.store.results import Result, StoredResult, result, results
    from workbench.capturing import Prompt
    from workbench.models import DEFAULT_MODEL, ModelSource, Provenance
    from workbench.registries import analyze, capture, load_model
    from workbench.models.model import Model, ModelInfo, Prediction
    from workbench.store import Run, open_run
    from workbench.views import View
    from workbench.notebook import show

__all__ = [
    "DEFAULT_MODEL",
    "Analysis",
    "AnalysisContext",
    "Model",
    "ModelInfo",
    "ModelSource",
    "Param",
    "Prediction",
    "Prompt",
    "Provenance",
    "Result",
    "Run",
    "UserError",
    "View",
    "StoredResult",
    "__version__",
    "activation_cache",
    "analyze",
    "capture",
    "hookimpl",
    "load_model",
    "open_run",
    "result",
    "results",
    "show",
]

_LAZY = {
    "Analysis": "workbench.analysis",
    "AnalysisContext": "workbench.analysis",
    "Param": "workbench.analysis",
    "Result": "workbench.store.results",
    "StoredResult": "workbench.store.results",
    "results": "workbench.store.results",
    "result": "workbench.store.results",
    "activation_cache": "workbench.interop",
    "View": "workbench.views",
    "load_model": "workbench.registries",
    "analyze": "workbench.registries",
    "DEFAULT_MODEL": "workbench.models",
    "ModelSource": "workbench.models",
    "Provenance": "workbench.models",
    "Model": "workbench.models.model",
    "ModelInfo": "workbench.models.model",
    "Prediction": "workbench.models.model",
    "capture": "workbench.registries",
    "Prompt": "workbench.capturing",
    "open_run": "workbench.store",
    "Run": "workbench.store",
    "show": "workbench.notebook",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def _display_in_ipython() -> None:
    """Where IPython runs (Jupyter), show runs and stored results as HTML: formatters registered
    by type *name*, so nothing is imported until one is displayed (:mod:`workbench.notebook`)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "text/html" not in formatters:
        return

    def run_html(run: Any) -> str:
        from workbench.notebook import run_html

        return run_html(run)

    def result_html(stored: Any) -> str:
        from workbench.notebook import result_html

        return result_html(stored)

    def figure_png(fig: Any) -> bytes:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()

    formatters["text/html"].for_type_by_name("workbench.store.reader", "Run", run_html)
    formatters["text/html"].for_type_by_name("workbench.store.results", "StoredResult", result_html)
    # workbench's figures are made without pyplot, so matplotlib's inline backend may not have
    # registered its own formatter; a formatter it registers later takes precedence.
    png = formatters.get("image/png")
    if png is not None:
        png.for_type_by_name("matplotlib.figure", "Figure", figure_png)


_display_in_ipython()
