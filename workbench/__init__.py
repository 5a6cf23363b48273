"""workbench: a plugin-based interpretability workbench for transformer language models.

Public API (imported lazily: ``import workbench`` does not import torch)::

    import workbench
    model = workbench.load_model("smollm2-135m")
    model.predict("The capital of France is").top[0].token   # ' Paris'
"""

from __future__ import annotations

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
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
