"""Errors a user can cause and fix.

A :class:`UserError` is a mistake in what the user asked for (a bad name, an unreadable file, a flag
that does not apply). The command line prints its message as one line and exits with status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

STRICT_ENV = "WORKBENCH_STRICT_PLUGINS"


def strict_plugins() -> bool:
    """Whether ``WORKBENCH_STRICT_PLUGINS`` asks for plugin problems (a plugin that fails to load,
    a misspelt hook, an analysis that raises) to be errors instead of warnings."""
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


class UserError(Exception):
    """A mistake the user can fix; its message is one self-contained line."""

    exit_code = 2


class ModelNotFound(UserError):
    """No model source matches the requested name."""


class ModelUnavailable(UserError):
    """The model source exists but cannot be loaded here (missing package, hub unreachable, ...)."""
