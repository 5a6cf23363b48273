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

__version__ = "0.1.0"

if TYPE_CHECKING:
    from workbench.analysis import Analysis, AnalysisContext, Param, Result
    from workbench.capturing import Prompt, capture
    from workbench.models import DEFAULT_MODEL, ModelSource, Provenance, load_model
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
    "__version__",
    "capture",
    "hookimpl",
    "load_model",
    "open_run",
]

_LAZY = {
    "Analysis": "workbench.analysis",
    "AnalysisContext": "workbench.analysis",
    "Param": "workbench.analysis",
    "Result": "workbench.analysis",
    "View": "workbench.views",
    "load_model": "workbench.models",
    "DEFAULT_MODEL": "workbench.models",
    "ModelSource": "workbench.models",
    "Provenance": "workbench.models",
    "Model": "workbench.models.model",
    "ModelInfo": "workbench.models.model",
    "Prediction": "workbench.models.model",
    "capture": "workbench.capturing",
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
