"""Building the plugin manager.

The manager is made by :func:`make_plugin_manager` (no import-time global), so tests and embedding
applications can build their own. Built-in core plugins are listed by module path and always load;
every other plugin, ours in ``plugins/`` included, comes through the ``workbench`` entry-point group.
A plugin that fails to import is reported and skipped, unless ``WORKBENCH_STRICT_PLUGINS=1``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from workbench import hookspecs

# Core plugins: part of workbench itself, loaded whatever the environment says.
DEFAULT_PLUGINS: tuple[str, ...] = ("workbench.models.builtin",)

STRICT_ENV = "WORKBENCH_STRICT_PLUGINS"


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, and why (one line)."""

    name: str
    error: str


@dataclass
class PluginReport:
    """What :func:`make_plugin_manager` loaded and what it had to skip."""

    loaded: list[str] = field(default_factory=list)
    failed: list[PluginFailure] = field(default_factory=list)


def strict_plugins() -> bool:
    return os.environ.get(STRICT_ENV, "").strip() not in ("", "0", "false", "no")


def make_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A new plugin manager with the hookspecs, the core plugins and (by default) every plugin
    advertised in the ``workbench`` entry-point group. ``pm.workbench_report`` tells what loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    report = PluginReport()
    for module_path in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_path), name=module_path)
        report.loaded.append(module_path)
    if load_entry_points:
        for ep in metadata.entry_points(group=hookspecs.PROJECT):
            if pm.has_plugin(ep.name):
                continue
            try:
                plugin: Any = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                if strict_plugins():
                    raise
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                report.failed.append(PluginFailure(ep.name, message))
                print(f"workbench: warning: plugin {ep.name!r} failed to load ({message})",
                      file=sys.stderr)
                continue
            report.loaded.append(ep.name)
    pm.check_pending()
    pm.workbench_report = report  # type: ignore[attr-defined]
    return pm
