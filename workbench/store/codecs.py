"""The compression codecs a run's activations may be written with, as HDF5 filter settings, and
making the plugin codecs readable.

``gzip`` and ``lzf`` come with h5py. ``blosc2-zstd`` (Blosc2 with its zstd codec and byte
shuffle, HDF5 filter 32026) and ``zstd`` (HDF5's shuffle filter, then Zstandard, filter 32015)
are HDF5 *plugin* filters, shipped compiled by the ``hdf5plugin`` package (extra ``export``):
importing it registers them with the HDF5 library h5py uses, for writing and for reading. So
:func:`filters` imports it when a capture asks for one, and :func:`register` when a reader opens
a run written with one; nothing imports it otherwise (no cost for everyone else).

Why these two: both are fast enough not to hold a capture back (both decompress at several
hundred MB/s on one core, where gzip manages ~100) and both shuffle bytes first, which is all
that lets float activations compress at all: the sign and exponent bytes repeat, the mantissa
bytes are noise. BENCHMARKS.md ("Compression") measures every codec on real activations.

Other tools: HDF5's own ``h5dump`` lists a run written with a plugin codec (groups, datasets,
their shapes, types and filter ids) but reads its values only when ``HDF5_PLUGIN_PATH`` names
hdf5plugin's plugin folder (``python -c 'import hdf5plugin; print(hdf5plugin.PLUGIN_PATH)'``);
docs/store.md says what each codec needs. Numpy and h5py only (the run store's layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.errors import UserError

BUILTIN = ("gzip", "lzf")
PLUGIN = ("blosc2-zstd", "zstd")
COMPRESSIONS = ("none", *BUILTIN, *PLUGIN)
"""What ``capture(compression=...)`` and ``workbench capture --compression`` accept."""

GZIP_LEVEL = 4
# Level 1 for both zstd codecs: on SmolLM2's float32 residual stream, zstd level 1 stored 1.179x
# smaller at 251 MB/s against 1.162x at 184 MB/s for level 3 (its default); Blosc2's zstd 1.173x
# at 251 MB/s against 1.161x at 57 MB/s for level 5 (Blosc2's default); attention patterns
# 2.29x at every level, 2-5x slower above 1. Beyond the repeated sign and exponent bytes there is
# only noise, which more effort cannot find structure in.
ZSTD_LEVEL = 1
BLOSC2_LEVEL = 1

FILTER_IDS = {"blosc2-zstd": 32026, "zstd": 32015}
"""HDF5's registered ids of the plugin filters (what ``h5dump -H`` prints under FILTERS)."""

INSTALL = "pip install 'workbench[export]'"


def _plugin_module(what: str) -> Any:
    try:
        import hdf5plugin
    except ImportError:
        raise UserError(f"{what} needs the hdf5plugin package ({INSTALL})") from None
    return hdf5plugin


def filters(compression: str | None) -> dict[str, Any]:
    """h5py ``create_dataset`` keyword arguments for ``compression`` (``None``/``"none"``: none).
    A plugin codec imports hdf5plugin (a :class:`UserError` naming the extra if it is missing)."""
    if compression in (None, "none"):
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "blosc2-zstd":
        h = _plugin_module("compression 'blosc2-zstd'")
        # Blosc2 shuffles bytes itself (per block, which suits its small blocks better than
        # HDF5's per-chunk shuffle).
        return dict(h.Blosc2(cname="zstd", clevel=BLOSC2_LEVEL, filters=h.Blosc2.SHUFFLE))
    if compression == "zstd":
        h = _plugin_module("compression 'zstd'")
        return {**dict(h.Zstd(clevel=ZSTD_LEVEL)), "shuffle": True}
    raise ValueError(f"unknown compression {compression!r}")


def check(compression: str | None) -> None:
    """A :class:`UserError` for a name not in :data:`COMPRESSIONS` or a plugin codec whose package
    is missing: before a capture loads its model."""
    if compression is not None and compression not in COMPRESSIONS:
        raise UserError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    filters(compression)


def register(path: Path | str, compression: Any) -> None:
    """Make a run written with ``compression`` (its recorded setting) readable: a plugin codec's
    filters are registered by importing hdf5plugin. Without it, a clear line rather than HDF5's
    "required filter is not registered" on the first read."""
    if isinstance(compression, str) and compression in PLUGIN:
        _plugin_module(f"{path} is compressed with {compression}; reading it")
