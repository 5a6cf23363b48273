"""Finding, loading and calling plugins.

The manager is made by :func:`make_plugin_manager` (no import-time global), so tests and embedding
applications can build their own; :func:`plugin_manager` keeps one per process for the command
line and the library functions, built on first use (:func:`reset_plugin_manager` drops it).

Where plugins come from, in this order:

1. core plugins, part of workbench itself (:data:`DEFAULT_PLUGINS`), always loaded;
2. the ``workbench`` entry-point group: our own plugins in ``plugins/`` and everyone else's, by
   exactly the same route;
3. loose ``.py`` files in the folders of ``--plugins-dir`` / ``$WORKBENCH_PLUGINS_DIR``
   (``os.pathsep``-separated), each loaded as a module named after its file;
4. objects a test registers for its own duration (:func:`extra_plugins`).

``$WORKBENCH_PLUGINS`` restricts 2–4 to the names it lists (comma-separated; empty: none).

A plugin that fails to import, implements a hook that does not exist (a misspelling), or whose
hook raises when called is reported — a warning line on stderr, and in ``workbench plugins`` —
and skipped, while every other plugin still works. ``WORKBENCH_STRICT_PLUGINS=1`` turns each of
those into an exception instead.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pluggy

from workbench import hookspecs
from workbench.errors import STRICT_ENV, UserError, strict_plugins

__all__ = ["DEFAULT_PLUGINS", "STRICT_ENV", "PluginError", "PluginFailure", "PluginInfo",
           "PluginReport", "call_each", "collect_unique", "extra_plugins", "make_plugin_manager",
           "plugin_dirs", "plugin_manager", "report_of", "reset_plugin_manager", "strict_plugins"]

# Core plugins: part of workbench itself, loaded whatever the environment says.
DEFAULT_PLUGINS: tuple[str, ...] = ("workbench.builtin_models",)

ONLY_ENV = "WORKBENCH_PLUGINS"
DIR_ENV = "WORKBENCH_PLUGINS_DIR"

HOOK_NAMES: tuple[str, ...] = tuple(
    name for name in vars(hookspecs) if callable(getattr(hookspecs, name))
    and hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")
)


class PluginError(Exception):
    """A plugin problem raised in strict mode (``WORKBENCH_STRICT_PLUGINS=1``)."""


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, or a hook of it that failed, and why (one line)."""

    name: str
    error: str


@dataclass
class PluginInfo:
    """One plugin as ``workbench plugins`` shows it."""

    name: str
    source: str
    """``core``, ``entry point``, ``file`` or ``registered`` (by code, e.g. a test)."""
    location: str
    """Module path, ``dist==version: module``, or file path."""
    version: str | None = None
    """The version of the distribution that provides it, where there is one."""
    loaded: bool = False
    hooks: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PluginReport:
    """What :func:`make_plugin_manager` loaded, and every problem met since (loading, calling)."""

    plugins: dict[str, PluginInfo] = field(default_factory=dict)

    @property
    def loaded(self) -> list[str]:
        return [p.name for p in self.plugins.values() if p.loaded]

    @property
    def failed(self) -> list[PluginFailure]:
        return [PluginFailure(p.name, e) for p in self.plugins.values() for e in p.errors]

    def info(self, name: str) -> PluginInfo:
        if name not in self.plugins:
            self.plugins[name] = PluginInfo(name=name, source="registered", location=name, loaded=True)
        return self.plugins[name]

    def problem(self, plugin: str, message: str, exc: BaseException | None = None) -> None:
        """Record a plugin problem and warn; in strict mode raise instead."""
        if strict_plugins():
            if exc is not None:
                raise exc
            raise PluginError(f"plugin {plugin!r}: {message}")
        self.info(plugin).errors.append(message)
        print(f"workbench: warning: plugin {plugin!r}: {message}", file=sys.stderr)


def _allowed() -> set[str] | None:
    value = os.environ.get(ONLY_ENV)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def plugin_dirs() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(DIR_ENV, "").split(os.pathsep) if p.strip()]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook implementations of ``plugin`` whose names are no hook of ours (misspellings)."""
    problems = []
    for attr in dir(plugin):
        try:
            opts = pm.parse_hookimpl_opts(plugin, attr)
        except Exception:  # noqa: BLE001, S112 - attribute access on odd objects: not a hook
            continue
        if opts is None:
            continue
        name = opts.get("specname") or attr
        if name not in HOOK_NAMES:
            close = difflib.get_close_matches(name, HOOK_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (hooks: {', '.join(HOOK_NAMES)})"
            problems.append(f"implements unknown hook {name!r}{hint}")
    return problems


def _register(pm: pluggy.PluginManager, report: PluginReport, info: PluginInfo,
              load: Callable[[], object]) -> None:
    report.plugins[info.name] = info
    try:
        plugin = load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
        report.problem(info.name, f"failed to load ({_one_line(exc)})", exc)
        return
    unknown = _unknown_hooks(pm, plugin)
    if unknown:
        for message in unknown:
            report.problem(info.name, message + "; plugin not loaded")
        return
    try:
        pm.register(plugin, name=info.name)
    except ValueError as exc:  # name or object already registered
        report.problem(info.name, f"not loaded ({_one_line(exc)})", exc)
        return
    except pluggy.PluginValidationError as exc:  # e.g. an argument the hook does not have
        report.problem(info.name, f"not loaded ({exc})", exc)
        return
    info.loaded = True
    info.hooks = sorted({impl.name for impl in pm.get_hookcallers(plugin) or []})


def _load_file(path: Path) -> object:
    name = f"workbench_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _identity(plugin: object) -> object:
    return plugin


_EXTRA: list[tuple[str, object]] = []


@contextlib.contextmanager
def extra_plugins(*plugins: tuple[str, object]) -> Iterator[None]:
    """Register ``(name, plugin)`` pairs in every plugin manager built inside the ``with`` block
    (the process-wide one is rebuilt on entry and exit). For tests; see ``workbench.testing``."""
    _EXTRA.extend(plugins)
    reset_plugin_manager()
    try:
        yield
    finally:
        for item in plugins:
            _EXTRA.remove(item)
        reset_plugin_manager()


def make_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A new plugin manager with the hookspecs, the core plugins and (by default) every other
    plugin (entry points, plugin folders, :func:`extra_plugins`). ``pm.workbench_report`` (a
    :class:`PluginReport`) tells what loaded and what failed."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    report = PluginReport()
    pm.workbench_report = report  # type: ignore[attr-defined]
    for module_path in DEFAULT_PLUGINS:
        info = PluginInfo(name=module_path, source="core", location=module_path)
        _register(pm, report, info, functools.partial(importlib.import_module, module_path))
    if not load_entry_points:
        return pm
    allowed = _allowed()
    for ep in metadata.entry_points(group=hookspecs.PROJECT):
        if pm.has_plugin(ep.name) or (allowed is not None and ep.name not in allowed):
            continue
        dist = getattr(ep, "dist", None)
        version = dist.version if dist is not None else None
        where = f"{dist.name}=={version}: {ep.value}" if dist is not None else ep.value
        info = PluginInfo(name=ep.name, source="entry point", location=where, version=version)
        _register(pm, report, info, ep.load)
    for folder in plugin_dirs():
        if not folder.is_dir():
            report.plugins[str(folder)] = PluginInfo(name=str(folder), source="file", location=str(folder))
            report.problem(str(folder), f"plugins folder {folder} does not exist")
            continue
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_") or (allowed is not None and path.stem not in allowed):
                continue
            if pm.has_plugin(path.stem) or path.stem in report.plugins:
                report.plugins[str(path)] = PluginInfo(name=str(path), source="file", location=str(path))
                report.problem(str(path), f"not loaded: a plugin named {path.stem!r} already exists")
                continue
            info = PluginInfo(name=path.stem, source="file", location=str(path))
            _register(pm, report, info, functools.partial(_load_file, path))
    for name, plugin in _EXTRA:
        if allowed is not None and name not in allowed:
            continue
        info = PluginInfo(name=name, source="registered", location=repr(plugin))
        _register(pm, report, info, functools.partial(_identity, plugin))
    pm.check_pending()  # a safety net: unknown hooks were refused plugin by plugin above
    return pm


_CURRENT: list[pluggy.PluginManager] = []


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    if not _CURRENT:
        _CURRENT.append(make_plugin_manager())
    return _CURRENT[0]


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (and the registries built from it)."""
    _CURRENT.clear()


def report_of(pm: pluggy.PluginManager) -> PluginReport:
    report = getattr(pm, "workbench_report", None)
    if report is None:
        report = PluginReport()
        pm.workbench_report = report  # type: ignore[attr-defined]
    return report


def call_each(pm: pluggy.PluginManager, hook: str,
              kwargs_for: Callable[[str], dict[str, Any]]) -> None:
    """Call ``hook`` on every plugin that implements it, one at a time and in registration order,
    with the arguments ``kwargs_for(plugin_name)`` (so what a plugin registers can be attributed
    to it). A plugin whose implementation raises is reported (:meth:`PluginReport.problem`) and
    the others still run. Implementations may take fewer arguments than the spec (pluggy's rule).
    """
    report = report_of(pm)
    for impl in getattr(pm.hook, hook).get_hookimpls():  # registration order
        name = impl.plugin_name
        kwargs = kwargs_for(name)
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported; re-raised in strict mode
            report.problem(name, f"failed in {hook} ({_one_line(exc)})", exc)


T = TypeVar("T")


def collect_unique(pm: pluggy.PluginManager, hook: str, cls: type[T], kind: str,
                   info_field: str) -> dict[str, T]:
    """Call the registration ``hook`` on every plugin (:func:`call_each`) with a ``register``
    callback taking ``cls`` objects, each stamped with its plugin's name (``obj.plugin``) and
    listed under ``info_field`` of that plugin's :class:`PluginInfo`. A name registered more than
    once is rejected everywhere, with a problem naming every plugin that registered it.
    Returns name -> object."""
    report = report_of(pm)
    found: dict[str, list[Any]] = {}

    def kwargs_for(plugin: str) -> dict[str, Any]:
        def register(obj: T) -> None:
            if not isinstance(obj, cls):
                raise TypeError(f"{hook}: register() takes {cls.__name__} objects, not {type(obj).__name__}")
            obj.plugin = plugin  # type: ignore[attr-defined]
            found.setdefault(obj.name, []).append(obj)  # type: ignore[attr-defined]

        return {"register": register}

    call_each(pm, hook, kwargs_for)
    out: dict[str, T] = {}
    for name, candidates in found.items():
        if len(candidates) > 1:
            plugins = " and ".join(repr(c.plugin) for c in candidates)
            for c in candidates:
                report.problem(c.plugin, f"{kind} {name!r} is registered by both {plugins}; neither is used")
            continue
        out[name] = candidates[0]
        listed = getattr(report.info(candidates[0].plugin), info_field)
        if name not in listed:
            listed.append(name)
    return out
