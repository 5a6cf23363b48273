"""The HDF5 run store: :func:`open_run` to read, :class:`RunWriter` to write (format: docs/store.md).

Importing this package imports numpy and h5py, never torch.
"""

from workbench.store.reader import Run, open_run
from workbench.store.schema import SCHEMA_VERSION, HookSpec

__all__ = ["SCHEMA_VERSION", "HookSpec", "Run", "open_run"]
