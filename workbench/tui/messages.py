"""Messages a plugin's view may post to the app, and the focus protocol it may implement.

A view widget (``View.make``) lives inside the app's results tab. It can:

- post :class:`ShowAttentionHead` (``self.post_message(ShowAttentionHead(hook, head))``) to open
  the attention heatmap at that pattern and head;
- define ``follow(run, focus)``: the app calls it when the widget is shown and whenever the
  focused prompt or token changes while it is on screen. ``focus`` is a
  :class:`workbench.tui.state.Focus` (``prompt``, ``pos``, ...); read it, never change it.
"""

from __future__ import annotations

from textual.message import Message


class ShowAttentionHead(Message):
    """Ask the app to show the attention heatmap of ``hook`` (a stored pattern's name) at
    ``head``, keeping the focused token."""

    def __init__(self, hook: str, head: int) -> None:
        super().__init__()
        self.hook = hook
        self.head = head
