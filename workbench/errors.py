"""Errors a user can cause and fix.

A :class:`UserError` is a mistake in what the user asked for (a bad name, an unreadable file, a flag
that does not apply). The command line prints its message as one line and exits with status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message is one self-contained line."""

    exit_code = 2


class ModelNotFound(UserError):
    """No model source matches the requested name."""


class ModelUnavailable(UserError):
    """The model source exists but cannot be loaded here (missing package, hub unreachable, ...)."""
