"""Messages a plugin's view may post to the app, and the focus protocol it may implement.

A view widget (``View.make``) lives inside the app's results tab. It can:

- post :class:`ShowAttentionHead` (``self.post_message(ShowAttentionHead(hook, head))``) to open
  the attention heatmap at that pattern and head;
- define ``follow(run, focus)`` (:class:`workbench.kit.FollowsFocus`): the app calls it when the
  widget is shown and whenever the focused prompt or token changes while it is on screen.
  ``focus`` is a :class:`workbench.tui.state.Focus` (``prompt``, ``pos``, ...); read it, never
  change it.

Plugins import both from :mod:`workbench.kit`.
"""

from __future__ import annotations

# The message is the view kit's (public to plugins, below the UI); the app handles it.
from workbench.kit.messages import ShowAttentionHead

__all__ = ["ShowAttentionHead"]
