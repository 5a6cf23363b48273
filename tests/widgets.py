"""Helpers for tests of terminal views."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console


def plain(widget: Any, width: int = 160) -> str:
    """What a Static widget shows, as plain text (no colours), ``width`` columns wide."""
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(widget.content)
    return console.export_text()
