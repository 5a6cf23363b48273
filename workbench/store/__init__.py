"""The HDF5 run store: :func:`open_run` to read, :class:`RunWriter` to write (format: docs/store.md).

Importing this package imports nothing heavy: :func:`open_run` and :class:`Run` (the reader)
are imported, with numpy and h5py, when first used, so that modules which only need a type of
the store (``workbench.store.results.Result``) keep ``workbench --help`` fast. Never torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.store.reader import Run, open_run
    from workbench.store.schema import SCHEMA_VERSION, HookSpec

__all__ = ["SCHEMA_VERSION", "HookSpec", "Run", "open_run"]

_LAZY = {"Run": "workbench.store.reader", "open_run": "workbench.store.reader",
         "SCHEMA_VERSION": "workbench.store.schema", "HookSpec": "workbench.store.schema"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench.store' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
