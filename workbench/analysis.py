"""Analyses: what a plugin declares, and how workbench runs it and stores its result.

An analysis is a :class:`Analysis` registered through the ``register_analyses`` hook. It reads a
stored run (and, if it says so, the live model, reloaded by the provenance the run recorded) and
returns a :class:`Result`: JSON-able ``data`` plus named numpy ``arrays``. workbench stores each
result in its own file beside the run (``workbench.store.results``), keyed by the analysis's
name, version and parameters, so the same request again reuses it.

This module imports neither torch nor TransformerLens; analyses import them inside ``compute``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError, strict_plugins
from workbench.hooknames import glob_to_regex, preset_patterns
from workbench.store.results import Result

if TYPE_CHECKING:
    from workbench.models import ModelRegistry
    from workbench.models.model import Model
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

__all__ = ["Analysis", "AnalysisContext", "AnalysisRegistry", "Outcome", "Param", "Result",
           "analyze", "capture_hooks_for", "missing_inputs", "reload_model"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
PARAM_TYPES: tuple[type, ...] = (int, float, str, bool)
TASK_FIELDS = ("answer", "wrong", "corrupted")


# --- declarations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A typed parameter of an analysis. ``--param ANALYSIS.NAME=VALUE`` sets it."""

    name: str
    type: type
    """``int``, ``float``, ``str`` or ``bool``."""
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise TypeError(f"parameter {self.name!r}: type must be one of int, float, str, bool")
        self.check(self.default)

    def parse(self, text: str) -> Any:
        """Convert the text of ``--param`` to this parameter's type (then :meth:`check`)."""
        if self.type is bool:
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise UserError(f"parameter {self.name!r} is true or false, not {text!r}")
            return self.check(low in ("1", "true", "yes", "on"))
        try:
            value = self.type(text)
        except ValueError:
            raise UserError(f"parameter {self.name!r} needs a{'n' if self.type is int else ''} "
                            f"{self.type.__name__}, not {text!r}") from None
        return self.check(value)

    def check(self, value: Any) -> Any:
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise UserError(f"parameter {self.name!r} needs a {self.type.__name__}, not {value!r}")
        if self.choices is not None and value not in self.choices:
            raise UserError(f"parameter {self.name!r} is one of {', '.join(map(str, self.choices))}; "
                            f"not {value!r}")
        if self.min is not None and value < self.min:  # type: ignore[operator]
            raise UserError(f"parameter {self.name!r} is at least {self.min}, not {value!r}")
        if self.max is not None and value > self.max:  # type: ignore[operator]
            raise UserError(f"parameter {self.name!r} is at most {self.max}, not {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type.__name__, "default": self.default,
                "help": self.help, "choices": list(self.choices) if self.choices else None,
                "min": self.min, "max": self.max}


@dataclass
class Analysis:
    """An analysis, as a plugin registers it.

    ``compute(ctx)`` receives an :class:`AnalysisContext` and returns a :class:`Result` (or a
    plain JSON-able dict, taken as its ``data``). Everything else is declaration: workbench uses
    it to decide whether a run can be analysed, what ``workbench capture --for NAME`` captures,
    how to parse parameters, and how to show the result.
    """

    name: str
    """Lower case, digits, ``-``, ``_``, ``.``; unique across all plugins."""
    description: str
    """One line."""
    version: str
    """Bump it when the result for the same input changes: stored results are keyed by it."""
    compute: Callable[[AnalysisContext], Result | dict[str, Any]]
    needs: tuple[str, ...] = ()
    """Hook names, globs or presets the analysis reads from the run: a run lacking one is refused.
    Declare the least it reads (``capture --for`` captures these and :attr:`optional`)."""
    optional: tuple[str, ...] = ()
    """Hook names, globs or presets it also reads where the run holds them (the logit lens's
    embedding row): ``capture --for`` captures them, and a run without them is still analysed.
    Each must exist on every model of :attr:`families` (``capture`` refuses a name that matches
    nothing), or be a preset."""
    needs_lm_outputs: bool = False
    """It reads the stored per-token loss and top-k predictions (runs of models with an LM head)."""
    needs_task: tuple[str, ...] = ()
    """Per-prompt task fields (``answer``, ``wrong``, ``corrupted``) at least one prompt must have;
    prompts without them are the analysis's to skip."""
    needs_model: bool = False
    """It runs the model: reloaded by the provenance recorded in the run (a mismatch is an
    error)."""
    may_use_model: bool = False
    """It runs the model where the run's can be reloaded, for something optional (the SAE's
    next-token loss with its reconstruction spliced in): ``ctx.model()`` works as for
    :attr:`needs_model`, and a run whose model cannot be reloaded (a synthetic run) is still
    analysed; ``compute`` catches the :class:`UserError` and says what it left out."""
    params: tuple[Param, ...] = ()
    families: tuple[str, ...] = ("decoder", "encoder", "encoder-decoder")
    """Model families it works on."""
    auto: bool = True
    """``workbench analyze RUN`` with no names runs it when the run can feed it. False for an
    analysis that needs a parameter only the user can give (a direction's name, a file)."""
    inputs: Callable[[Run, dict[str, Any]], dict[str, Any]] | None = None
    """What else the result depends on, besides the run and the parameters: ``inputs(run,
    params)`` returns a small JSON-able identity (the SAE a ``features.sae=""`` resolves to now,
    a file's digest) that joins the result's key, so a changed input is computed again rather
    than reused. A :class:`UserError` it raises is the user's (exit 2)."""
    render_text: Callable[[Result], str] | None = None
    """Text for the terminal; default: the data as indented JSON and the arrays' shapes."""
    to_json: Callable[[Result], Any] | None = None
    """JSON for ``--json``; default: ``{"data": ..., "arrays": {name: nested lists}}``."""
    plugin: str = ""
    """Set by workbench at registration: the plugin that registered it."""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"analysis name {self.name!r}: use lower case letters, digits, '-', '_', '.'")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$", self.version):
            raise ValueError(f"analysis {self.name!r}: version {self.version!r} is not a version")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"analysis {self.name!r}: duplicate parameter names")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        valid = ", ".join(p.name for p in self.params) or "none"
        raise UserError(f"analysis {self.name!r} has no parameter {name!r} (parameters: {valid})")

    def resolve_params(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with ``given`` (values, or strings to parse), checked."""
        values = {p.name: p.default for p in self.params}
        for key, value in (given or {}).items():
            p = self.param(key)
            values[key] = p.parse(value) if isinstance(value, str) and p.type is not str else p.check(value)
        return values

    def text(self, result: Result) -> str:
        if self.render_text is not None:
            return self.render_text(result)
        return default_text(result)

    def json(self, result: Result) -> Any:
        if self.to_json is not None:
            return self.to_json(result)
        return default_json(result)

    def reads(self) -> dict[str, Any]:
        """Exactly what the analysis reads: ``hooks`` (the patterns of :attr:`needs`, presets
        expanded), ``optional_hooks`` (of :attr:`optional`), ``presets`` (each named preset's
        patterns: a pattern the model lacks is skipped), ``lm_outputs``, ``task`` (fields at
        least one prompt must have) and ``model`` (reloaded by the run's provenance)."""
        def expand(items: tuple[str, ...]) -> list[str]:
            return list(dict.fromkeys(p for item in items for p in (preset_patterns(item) or (item,))))

        return {"hooks": expand(self.needs), "optional_hooks": expand(self.optional),
                "presets": {n: list(preset_patterns(n) or ()) for n in (*self.needs, *self.optional)
                            if preset_patterns(n) is not None},
                "lm_outputs": self.needs_lm_outputs, "task": list(self.needs_task), "model": self.needs_model}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "plugin": self.plugin, "needs": list(self.needs), "optional": list(self.optional),
                "needs_lm_outputs": self.needs_lm_outputs, "needs_task": list(self.needs_task),
                "needs_model": self.needs_model, "may_use_model": self.may_use_model,
                "reads": self.reads(), "auto": self.auto,
                "families": list(self.families), "params": [p.to_dict() for p in self.params]}


def default_json(result: Result) -> dict[str, Any]:
    return {"data": result.data, "arrays": {k: np.asarray(v).tolist() for k, v in result.arrays.items()}}


def default_text(result: Result) -> str:
    import json

    lines = [json.dumps(result.data, indent=2, default=str)] if result.data else []
    for name, arr in result.arrays.items():
        lines.append(f"array {name}: {arr.dtype} {tuple(arr.shape)}")
    return "\n".join(lines)


# --- registry -----------------------------------------------------------------------------------


class AnalysisRegistry:
    """Every registered analysis by name."""

    def __init__(self, by_name: dict[str, Analysis] | None = None) -> None:
        self._by_name: dict[str, Analysis] = dict(by_name or {})

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._by_name.values(), key=lambda a: a.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Analysis:
        if name not in self._by_name:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"no analysis named {name!r}{hint} (analyses: {', '.join(self.names()) or 'none'})")
        return self._by_name[name]


# --- what a run holds ---------------------------------------------------------------------------


def _need_patterns(need: str) -> tuple[bool, tuple[str, ...]]:
    patterns = preset_patterns(need)
    if patterns is not None:
        return True, patterns
    return False, (need,)


def missing_inputs(run: Run, analysis: Analysis) -> list[str]:
    """What ``analysis`` needs that ``run`` lacks, one phrase each (empty: it can run)."""
    missing = []
    family = run.family
    if family not in analysis.families:
        missing.append(f"a {' or '.join(analysis.families)} model (this run's is {family})")
    if analysis.needs_lm_outputs and not run.has_lm_outputs:
        missing.append("LM outputs (per-token loss and predictions; the model has no LM head)")
    for key in analysis.needs_task:
        if not any(key in run.metadata(i) for i in range(len(run))):
            missing.append(f"prompts with a {key!r} field (JSONL)")
    settings = run.capture_settings
    stored = set(run.hooks) | set(run.aliases)
    model_hooks = settings.model_hooks
    skip = set(settings.unstorable_hooks)
    gated = set(settings.gated_hooks)
    for need in analysis.needs:
        is_preset, patterns = _need_patterns(need)
        wanted: set[str] = set()
        for pattern in patterns:
            rx = glob_to_regex(pattern)
            if model_hooks is None:  # runs from before model_hooks was recorded: any match will do
                if not any(rx.match(n) for n in stored) and not is_preset:
                    missing.append(f"hooks matching {pattern}")
                continue
            names = {n for n in model_hooks if rx.match(n)} - skip
            if is_preset or "*" in pattern:
                names -= gated
            wanted |= names
        if model_hooks is None:
            if is_preset and not any(glob_to_regex(p).match(n) for p in patterns for n in stored):
                missing.append(f"the {need} preset")
            continue
        lacking = sorted(wanted - stored)
        if lacking:
            example = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
            missing.append(f"{need} ({example})")
    return missing


def capture_hooks_for(analyses: Iterable[Analysis]) -> list[str]:
    """The hook patterns and presets ``workbench capture --for`` adds, in order, once each: each
    analysis's ``needs``, then its ``optional``."""
    out: dict[str, None] = {}
    for a in analyses:
        out.update(dict.fromkeys((*a.needs, *a.optional)))
    return list(out)


# --- running ------------------------------------------------------------------------------------


@dataclass
class AnalysisContext:
    """What ``Analysis.compute`` receives."""

    run: Run
    """The stored run (``workbench.store.Run``): tokens, activations, LM outputs, metadata."""
    params: dict[str, Any]
    """Every parameter, defaults filled in, checked."""
    analysis: Analysis
    n_prompts: int = 0
    """How many prompts the run had committed when the analysis started."""
    _model_loader: Callable[[], Model] | None = None
    _progress: Callable[[int, int], None] | None = None
    _reloader: Callable[[Run], Model] | None = None

    @property
    def prompts(self) -> range:
        """Indices of the prompts to analyse: every prompt committed when the analysis started
        (a run still being written grows meanwhile; the result covers these)."""
        return range(self.n_prompts)

    def task(self, i: int) -> dict[str, Any]:
        """Prompt ``i``'s task fields: ``answer``, ``wrong``, ``corrupted`` where the prompts file
        gave them (JSONL), else absent."""
        meta = self.run.metadata(i)
        return {k: meta[k] for k in TASK_FIELDS if k in meta}

    def model(self) -> Model:
        """The model, reloaded by the run's recorded provenance (once per ``analyze`` call). Only
        for analyses declared with ``needs_model=True`` or ``may_use_model=True`` (for those, a
        run whose model cannot be reloaded raises :class:`UserError` here)."""
        if not (self.analysis.needs_model or self.analysis.may_use_model) or self._model_loader is None:
            raise RuntimeError(f"analysis {self.analysis.name!r} declared neither needs_model nor "
                               "may_use_model")
        return self._model_loader()

    def model_of(self, other: Run) -> Model:
        """The model ``other`` (another run this analysis reads, e.g. the second run of a diff)
        was captured with, reloaded and checked as :meth:`model` is (same device, same registry
        of models). Only for analyses declared with ``needs_model`` or ``may_use_model``."""
        if not (self.analysis.needs_model or self.analysis.may_use_model):
            raise RuntimeError(f"analysis {self.analysis.name!r} declared neither needs_model nor "
                               "may_use_model")
        return (self._reloader or reload_model)(other)

    def progress(self, done: int, total: int, status: str = "") -> None:
        """Report progress (``done`` of ``total`` units), with an optional one-line ``status``
        (a training loss); shown on a terminal as a bar, in a log as a line now and then."""
        if self._progress is not None:
            if status:
                self._progress(done, total, status)  # type: ignore[call-arg]
            else:
                self._progress(done, total)


def reload_model(run: Run, device: str = "auto", registry: ModelRegistry | None = None) -> Model:
    """Load the model a run was captured with, and check it is the same one: the provenance
    recorded in the run must equal the reloaded model's. Names resolve against ``registry``
    (default: the models that ship with workbench; :func:`workbench.registries.reload_model`
    passes every plugin's)."""
    from workbench.models import load_model

    recorded = run.capture_settings.model
    name = recorded.name
    if not name:
        raise UserError(f"{run.path} does not record which model it was captured with")
    try:
        model = load_model(name, device=device, dtype=recorded.dtype,
                           bos=run.capture_settings.bos, progress=False,  # type: ignore[arg-type]
                           registry=registry)
    except UserError as exc:
        raise UserError(f"cannot reload the model of {run.final_path.name} ({name}): {exc}") from None
    now = model.info.provenance.to_dict()
    then = recorded.provenance
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if diff:
        detail = "; ".join(f"{k}: run {then.get(k)!r}, now {now.get(k)!r}" for k in diff[:3])
        raise UserError(f"{name} now loads different weights than {run.final_path.name} was captured "
                        f"with ({detail})")
    return model


@dataclass
class Outcome:
    """One analysis of one ``analyze`` call."""

    analysis: Analysis
    params: dict[str, Any]
    status: str
    """``computed``, ``reused`` (a stored result with the same key), or ``error``."""
    stored: StoredResult
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "error"


def analyze(run: Run, analyses: list[Analysis], params: dict[str, dict[str, Any]] | None = None, *,
            force: bool = False, device: str = "auto", model: Model | None = None,
            registry: ModelRegistry | None = None,
            progress: Callable[[Analysis, int, int], None] | None = None,
            on_start: Callable[[Analysis], None] | None = None) -> list[Outcome]:
    """Run ``analyses`` over ``run`` and store each result beside it.

    An analysis that needs the model gets ``model``, else the run's model reloaded once
    (:func:`reload_model`, names resolved against ``registry``; :func:`workbench.registries.analyze`
    passes the registry of every plugin's models).

    A result stored under the same key (name, version, parameters) for the same run and prompt
    count is reused unless ``force``. An analysis that raises is recorded as that analysis's
    error result and the others still run; with ``WORKBENCH_STRICT_PLUGINS=1`` the exception
    propagates instead (results already stored stay). Inputs are checked first: an analysis the
    run cannot feed is a :class:`UserError` before anything runs.
    """
    from workbench.capturing.malloc import freed_memory_kept
    from workbench.store import results as R

    params = params or {}
    for name in params:
        if name not in {a.name for a in analyses}:
            raise UserError(f"--param for {name!r}, which is not among the analyses run "
                            f"({', '.join(a.name for a in analyses)})")
    resolved = [(a, a.resolve_params(params.get(a.name))) for a in analyses]
    for a, _ in resolved:
        missing = missing_inputs(run, a)
        if missing:
            raise UserError(f"analysis {a.name!r} needs {'; '.join(missing)}, which "
                            f"{run.final_path.name} lacks (capture with --for {a.name})")
    loaded: list[Model] = [model] if model is not None else []

    def load() -> Model:
        if not loaded:
            print(f"workbench: reloading {run.model_name} for analysis", file=sys.stderr)
            loaded.append(reload_model(run, device, registry))
        return loaded[0]

    outcomes = []
    for a, values in resolved:
        run.refresh()
        inputs = a.inputs(run, values) if a.inputs is not None else {}
        key = R.result_key(a.name, a.version, {**values, "_inputs": inputs} if inputs else values)
        if not force:
            existing = R.find(run, a.name, a.version, key)
            if existing is not None and existing.ok and existing.current(run):
                outcomes.append(Outcome(a, values, "reused", existing))
                continue
        if on_start is not None:
            on_start(a)
        n_prompts = len(run)
        ctx = AnalysisContext(run=run, params=values, analysis=a, n_prompts=n_prompts, _model_loader=load,
                              _progress=functools.partial(progress, a) if progress else None,
                              _reloader=lambda other: reload_model(other, device, registry))
        t0 = time.perf_counter()
        error = tb = None
        result = Result()
        try:
            # Forward passes over big batches allocate and free blocks above glibc's mmap threshold
            # all the time; kept for reuse, they are not page-faulted in and zeroed again each time.
            with freed_memory_kept() if a.needs_model or a.may_use_model else contextlib.nullcontext():
                out = a.compute(ctx)
            result = out if isinstance(out, Result) else Result(data=dict(out))
            R.check_storable(result)
        except UserError:
            raise
        except Exception as exc:
            if strict_plugins():
                raise
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            tb = traceback.format_exc()
            print(f"workbench: warning: analysis {a.name!r} (plugin {a.plugin!r}) failed: {error}",
                  file=sys.stderr)
            result = Result()
        seconds = time.perf_counter() - t0
        stored = R.save(run, a.name, a.version, values, key, result, plugin=a.plugin,
                        n_prompts=n_prompts, seconds=seconds, error=error, traceback_text=tb)
        outcomes.append(Outcome(a, values, "error" if error else "computed", stored, seconds))
    return outcomes
