"""What the UI draws, as plain functions of the stored arrays: shaded grids, token labels, norms.

No Textual here (only Rich text), so it is tested without an app and reused by ``workbench plot``
for the data side. The shading (``cell``, ``grid``, ``legend``, ``token_label``, ``RAMP``, ...) is
the view kit's (:mod:`workbench.kit`), re-exported here.
"""

from __future__ import annotations

# The shading lives in the view kit (below the UI, public to plugins); the UI draws with it.
from workbench.kit.shading import (  # noqa: F401 - re-exported: R.cell, R.grid, ...
    CHARS,
    RAMP,
    ZERO,
    Window,
    cell,
    grid,
    legend,
    level,
    token_label,
)
from workbench.store.depth import pattern_hooks, residual_norms, sink_position  # noqa: F401 - re-exported

