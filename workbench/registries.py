"""The registries built from the plugins, and the entry points that need them.

Models, analyses and views are contributed by plugins through registration hooks
(:mod:`workbench.hookspecs`). The layers below define what a model source, an analysis and a view
are and how each is used, and take a registry where they need one; this module, above the plugin
manager (:mod:`workbench.plugins`), builds the registries from every plugin and offers the
functions users call with a name (``workbench.load_model("tiny-gpt2")``, ``workbench.capture``
with a model name, ``workbench.analyze``), which pass them down.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from workbench.analysis import Analysis, AnalysisRegistry, Outcome
from workbench.analysis import analyze as _analyze
from workbench.analysis import reload_model as _reload_model
from workbench.models import DEFAULT_MODEL, ModelRegistry, ModelSource
from workbench.models import load_model as _load_model
from workbench.plugins import call_each, collect_unique, plugin_manager, report_of
from workbench.views import View, ViewRegistry

if TYPE_CHECKING:
    from workbench.capturing.entry import CaptureResult
    from workbench.models import BosPolicy
    from workbench.models.model import Model
    from workbench.store.reader import Run

__all__ = ["analyze", "build_analyses", "build_registry", "build_views", "capture", "load_model",
           "reload_model"]


def build_registry(pm: pluggy.PluginManager | None = None) -> ModelRegistry:
    """Collect every plugin's ``register_models`` (default: the process-wide plugin manager).
    Each plugin is called on its own, so one that raises is reported (and skipped) without
    losing the others' models."""
    if pm is None:
        pm = plugin_manager()
    registry = ModelRegistry()
    report = report_of(pm)

    def kwargs_for(plugin: str) -> dict[str, Any]:
        def register(source: ModelSource) -> None:
            object.__setattr__(source, "plugin", plugin)
            registry.add(source)
            models = report.info(plugin).models
            if source.name not in models:
                models.append(source.name)

        return {"register": register}

    call_each(pm, "register_models", kwargs_for)
    return registry


def build_analyses(pm: pluggy.PluginManager | None = None) -> AnalysisRegistry:
    """Collect every plugin's ``register_analyses``. A plugin that raises is reported and skipped;
    two analyses with one name are both rejected, with an error naming both plugins."""
    return AnalysisRegistry(collect_unique(pm or plugin_manager(), "register_analyses", Analysis,
                                           "analysis", "analyses"))


def build_views(pm: pluggy.PluginManager | None = None) -> ViewRegistry:
    """Collect every plugin's ``register_views``; a view name registered twice rejects both."""
    registry = ViewRegistry()
    registry.by_name = collect_unique(pm or plugin_manager(), "register_views", View, "view", "views")
    return registry


def load_model(name: str = DEFAULT_MODEL, *, device: str | None = "auto", dtype: str = "float32",
               bos: BosPolicy | None = None, progress: bool = True,
               registry: ModelRegistry | None = None) -> Model:
    """:func:`workbench.models.load_model` with every plugin's models: a registered name or
    alias (``workbench models`` lists them), a Hugging Face id (``ORG/NAME``, ``hf:NAME``), a
    local model folder or a ``.gguf`` file."""
    return _load_model(name, device=device, dtype=dtype, bos=bos, progress=progress,
                       registry=registry if registry is not None else build_registry())


def capture(model: Model | str | Callable[[], Model], prompts: Any, **kwargs: Any) -> CaptureResult:
    """:func:`workbench.capturing.capture` (every keyword argument is its: ``hooks``, ``out``,
    ``batch_size``, ``dtype``, ``generate``, ``resume``, ...; see its documentation) with a model
    name resolved against every plugin's models, loaded after capture's own checks. (Defined here
    rather than re-exported so that naming a plugin's model works; the capture module is imported
    on the first call, which keeps ``workbench --help`` free of h5py.)"""
    from workbench.capturing import capture as _capture

    if isinstance(model, str):
        model = functools.partial(load_model, model, device=kwargs.get("device", "auto"),
                                  bos=kwargs.get("bos"))
    return _capture(model, prompts, **kwargs)


def reload_model(run: Run, device: str = "auto") -> Model:
    """:func:`workbench.analysis.reload_model` with every plugin's models."""
    return _reload_model(run, device, build_registry())


def analyze(run: Run, analyses: list[Analysis | str] | str, params: dict[str, dict[str, Any]] | None = None, *,
            force: bool = False, device: str = "auto", model: Model | None = None,
            progress: Callable[[Analysis, int, int], None] | None = None,
            on_start: Callable[[Analysis], None] | None = None) -> list[Outcome]:
    """:func:`workbench.analysis.analyze`, reloading the run's model (when an analysis needs it
    and ``model`` is not given), and another run's (``AnalysisContext.model_of``), from every
    plugin's models. Analyses may be given by name (``workbench.analyze(run, ["logit-lens"])``)."""
    items = [analyses] if isinstance(analyses, str) else list(analyses)
    named = build_analyses() if any(isinstance(a, str) for a in items) else None
    chosen = [named.get(a) if isinstance(a, str) and named is not None else a for a in items]
    chosen_analyses: list[Analysis] = [a for a in chosen if not isinstance(a, str)]
    registry = build_registry() if any(a.needs_model or a.may_use_model for a in chosen_analyses) else None
    return _analyze(run, chosen_analyses, params, force=force, device=device, model=model,
                    registry=registry, progress=progress, on_start=on_start)
