"""The view kit: what a plugin needs to build terminal views the way our own plugins do.

A plugin's ``View.make`` (``workbench.views``) returns a Textual widget. The kit gives it:

- :class:`PromptView`, the base of a view that shows the focused prompt of a per-prompt result
  and follows the UI's focus, with :meth:`PromptView.columns`, the window of positions around the
  focused token;
- :class:`FollowsFocus` and :class:`Focus`, the protocol by which the UI tells a view which prompt
  and token are focused (any widget with ``follow(run, focus)`` takes part), and
  :class:`ShowAttentionHead`, the message a view posts to open a head's attention heatmap;
- shading and labels as Rich text and styles: the UI's heatmaps (:data:`RAMP`, :data:`CHARS`,
  :func:`level`, :func:`cell`, :func:`grid`, :func:`legend`, :class:`Window`,
  :func:`token_label`) and table helpers (:func:`bar`, :func:`short`, :func:`shade`,
  :func:`diverging`, :func:`diverging_cell`, :func:`abs_max`).

Every name of ``__all__`` is documented in ``docs/writing-plugins.md`` ("The view kit"). Importing
the kit loads Rich but neither Textual (until :class:`PromptView` or :class:`ShowAttentionHead` is
first used) nor torch. The kit sits below the terminal UI, which draws with the same functions and
handles the same message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workbench.kit.focus import Focus, FollowsFocus
from workbench.kit.shading import (
    CHARS,
    RAMP,
    Window,
    abs_max,
    bar,
    cell,
    diverging,
    diverging_cell,
    grid,
    legend,
    level,
    shade,
    short,
    token_label,
)

if TYPE_CHECKING:
    from workbench.kit.messages import ShowAttentionHead
    from workbench.kit.prompt_view import PromptView

__all__ = [
    "CHARS",
    "RAMP",
    "Focus",
    "FollowsFocus",
    "PromptView",
    "ShowAttentionHead",
    "Window",
    "abs_max",
    "bar",
    "cell",
    "diverging",
    "diverging_cell",
    "grid",
    "legend",
    "level",
    "shade",
    "short",
    "token_label",
]


_TEXTUAL = {"PromptView": "workbench.kit.prompt_view", "ShowAttentionHead": "workbench.kit.messages"}


def __getattr__(name: str) -> Any:
    """:class:`PromptView` and :class:`ShowAttentionHead` are Textual classes: import Textual only
    when one is asked for."""
    if name in _TEXTUAL:
        import importlib

        return getattr(importlib.import_module(_TEXTUAL[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
