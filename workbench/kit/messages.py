"""Messages a view may post to the app (imports Textual)."""

from __future__ import annotations

from textual.message import Message


class ShowAttentionHead(Message):
    """Ask the app to show the attention heatmap of ``hook`` (a stored pattern's name) at
    ``head``, keeping the focused token."""

    def __init__(self, hook: str, head: int) -> None:
        super().__init__()
        self.hook = hook
        self.head = head
