"""The ``workbench`` command line.

Start-up stays light: importing it imports click only. torch, TransformerLens and rich are
imported inside the commands that need them, so ``workbench --help`` and ``workbench models``
answer fast. User mistakes print one line (``workbench: error: ...``) and exit with status 2.

Commands are grouped by what they work on (:mod:`~workbench.cli.models`,
:mod:`~workbench.cli.capture`, :mod:`~workbench.cli.analyze`, :mod:`~workbench.cli.ui`); each
parses its arguments and calls the Python API. Plugins add commands through ``register_commands``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from workbench.cli import analyze, capture, export, models, ui  # noqa: F401 - registers the commands
from workbench.cli.base import cli
from workbench.cli.models import hook_patterns

__all__ = ["cli", "hook_patterns", "main"]


def _plugin_dirs_from_argv(argv: list[str]) -> list[str]:
    """``--plugins-dir`` values given before the sub-command (plugins must be loaded before
    arguments are parsed: they may add sub-commands)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--plugins-dir" and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--plugins-dir="):
            dirs.append(arg.split("=", 1)[1])
    return dirs


_OWNERS: dict[str, str] = {}
"""Which plugin added each plugin command (a second ``main()`` in one process adds them again)."""


def _add_plugin_commands(group: click.Group) -> None:
    """Let plugins add sub-commands (``register_commands``); a taken name is refused."""
    from workbench.plugins import call_each, plugin_manager, report_of

    pm = plugin_manager()
    report = report_of(pm)
    last: list[Any] = [None, dict(group.commands)]

    def settle() -> None:
        plugin, before = last
        if plugin is None:
            return
        for name, cmd in list(group.commands.items()):
            if name in before and before[name] is not cmd and _OWNERS.get(name) != plugin:
                group.commands[name] = before[name]
                report.problem(plugin, f"command {name!r} already exists; not replaced")
            elif name not in before or before[name] is not cmd:  # new, or its own again (main() called twice)
                _OWNERS[name] = plugin
                if name not in report.info(plugin).commands:
                    report.info(plugin).commands.append(name)

    def kwargs_for(plugin: str) -> dict[str, Any]:
        settle()
        last[:] = [plugin, dict(group.commands)]
        return {"cli": group}

    call_each(pm, "register_commands", kwargs_for)
    settle()


def main(argv: list[str] | None = None) -> None:
    import os

    from workbench.plugins import DIR_ENV, reset_plugin_manager

    args = list(sys.argv[1:] if argv is None else argv)
    dirs = _plugin_dirs_from_argv(args)
    if dirs:
        os.environ[DIR_ENV] = os.pathsep.join([*dirs, *filter(None, [os.environ.get(DIR_ENV)])])
        reset_plugin_manager()
    _add_plugin_commands(cli)
    cli(args, prog_name="workbench")
