"""workbench's terminal UI (Textual): ``workbench tui [RUN ...]``.

:func:`make_app` builds the app over runs on disk; :class:`WorkbenchApp` over open runs. Plugins
add views of their analyses' results through the ``register_views`` hook (:mod:`workbench.views`).
"""

from __future__ import annotations

from workbench.tui.app import WorkbenchApp, make_app

__all__ = ["WorkbenchApp", "make_app"]
