"""Sharded runs: many unit files under ``RUN.h5.shards/`` that read as one run through ``RUN.h5``.

A capture with several workers (:mod:`workbench.capturing.sharded`) splits its prompts into
*units*: contiguous prompt ranges, each written by one worker into its own ordinary run file
``RUN.h5.shards/unit-NNNNN.h5`` with the same crash-safe writer and file transaction as a
single-process capture (a unit resumes from its last commit after its worker is killed). Once
every unit is complete, :func:`write_index` writes ``RUN.h5``: an HDF5 file whose data datasets
are *virtual datasets* mapping, in prompt order, onto the units' datasets (relative paths: the
folder holding ``RUN.h5`` and ``RUN.h5.shards/`` can be moved), and whose offsets datasets are
real, global copies (every offsets dataset restarts at 0 in each unit). ``open_run``, h5py and
``h5dump`` read it as one run.

A virtual dataset reads a *missing* source file as its fill value, silently (HDFGroup/hdf5
issue 5088, h5py issue 1546), so the index also records each unit's file, prompt count, run id
and a SHA-256 of its commit marker (``prompts/token_offsets``), and :func:`check_shards` checks
them when a run is opened: a missing, short (truncated, or fewer prompts), or foreign (another
run's, another unit's, altered) shard is refused with one line naming it.

The index is written with ``libver=("earliest", "v110")``: Debian's h5dump 1.10.8 cannot read
the hyperslab selections of an index written with ``libver="latest"``.

While a sharded capture runs (or after its driver was killed), ``RUN.h5.shards/units.json``
records the plan; :func:`shard_progress` reports each unit's committed prompts (``workbench
inspect``).

Numpy and h5py only (the run store's layer). Written here because no library builds a
concatenating index over HDF5 files with ragged offsets; the mapping itself is h5py's
``VirtualLayout``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.paths import fsync_dir
from workbench.store import schema as S
from workbench.store.files import partial_path

META_SHARDS = "meta/shards"
"""JSON list of the index's units: ``file``, ``unit``, ``first_prompt``, ``prompts``,
``offsets_sha256``."""
ATTR_SHARD_RUN = "shard_run_id"
ATTR_SHARD_UNIT = "shard_unit"
UNITS_FILE = "units.json"
INDEX_LIBVER = ("earliest", "v110")
_OFFSETS_STEP = 1 << 22  # offsets entries copied per slice when the index is written


def shards_dir(final: Path) -> Path:
    """``RUN.h5.shards/``: the unit files of the sharded run ``final``."""
    return final.with_name(final.name + ".shards")


def unit_file(final: Path, unit: int) -> Path:
    return shards_dir(final) / f"unit-{unit:05d}.h5"


@dataclass(frozen=True)
class Unit:
    """Prompts ``start`` to ``stop - 1`` of a sharded capture, written to one unit file."""

    index: int
    start: int
    stop: int
    tokens: int

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "start": self.start, "stop": self.stop, "tokens": self.tokens}


def split_units(token_counts: Sequence[int], batch_size: int, n_units: int) -> list[Unit]:
    """Contiguous units of whole batches (so a unit forms exactly the batches a single-process
    capture would, and its values are bit-identical), about ``n_units`` of them, balanced by
    token count: unit ``k`` ends at the first batch boundary where the running token count
    reaches ``k / n_units`` of the total."""
    n = len(token_counts)
    bounds = list(range(0, n, batch_size)) + [n]
    n_batches = len(bounds) - 1
    n_units = max(1, min(n_units, n_batches))
    cum = np.concatenate([[0], np.cumsum(np.asarray(token_counts, dtype=np.int64))])
    total = int(cum[-1])
    units: list[Unit] = []
    b = 0  # batch index where the next unit starts
    for k in range(1, n_units + 1):
        if b >= n_batches:
            break
        left = n_units - k  # units after this one, each needing at least one batch
        target = total * k / n_units
        e = b + 1
        while e < n_batches - left and cum[bounds[e]] < target:
            e += 1
        if k == n_units:
            e = n_batches
        start, stop = bounds[b], bounds[e]
        units.append(Unit(len(units), start, stop, int(cum[stop] - cum[start])))
        b = e
    return units


def prompts_digest(prompts: Sequence[tuple[str, str]]) -> str:
    """SHA-256 over every prompt's id and text, in order: a resumed sharded capture must be
    given the same prompts."""
    h = hashlib.sha256()
    for pid, text in prompts:
        for part in (pid, text):
            raw = part.encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    return h.hexdigest()


def write_units_file(final: Path, doc: dict[str, Any]) -> None:
    """Record a sharded capture's plan (``units``, ``run_id``, ``settings``, ``prompts_sha256``,
    ``workers``) atomically in ``RUN.h5.shards/units.json``."""
    folder = shards_dir(final)
    folder.mkdir(exist_ok=True)
    tmp = folder / (UNITS_FILE + ".tmp")
    tmp.write_text(S.dumps(doc), encoding="utf-8")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, folder / UNITS_FILE)
    fsync_dir(folder)


def read_units_file(final: Path) -> dict[str, Any] | None:
    path = shards_dir(final) / UNITS_FILE
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({exc}); the capture cannot be resumed") from None


def _offsets_digest(offsets: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(offsets, dtype="<i8").tobytes()).hexdigest()


def _walk(f: Any) -> list[str]:
    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if hasattr(obj, "shape"):
            names.append(name)

    f.visititems(visit)
    return names


def is_offsets(name: str) -> bool:
    """Whether dataset ``name`` holds offsets (cumulative ends, restarting at 0 in each unit)."""
    return (name.endswith("_offsets") and not name.startswith("vocab/")) or name.startswith(f"{S.ACTS_OFFSETS}/")


def row_range(key: Any, n: int, what: str) -> tuple[int, int, bool] | None:
    """``key`` (an index, a contiguous slice, ``()`` or ``...``) of a dataset of ``n`` rows as
    ``(start, stop, single)``, ``single`` for an index; ``None`` for any other key."""
    if isinstance(key, (int, np.integer)):
        i = int(key) + (n if key < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {key} out of range for {what} ({n} rows)")
        return i, i + 1, True
    if key == () or key is Ellipsis:
        key = slice(None)
    if not isinstance(key, slice) or key.step not in (None, 1):
        return None
    start, stop, _ = key.indices(n)
    return start, max(start, stop), False


def write_index(final: Path, units: Sequence[Unit], *, created: str | None = None,
                settings: dict[str, Any] | None = None) -> Path:
    """Write ``final`` as the index over the complete unit files of ``units`` (atomically: a
    temporary file in the same folder, renamed), with the capture's ``settings`` document (else
    the first unit's). Returns ``final``."""
    import h5py

    folder = shards_dir(final)
    missing = [unit_file(final, u.index).name for u in units if not unit_file(final, u.index).exists()]
    if missing:
        raise UserError(f"{len(missing)} unit files are not in {folder} (first: {missing[0]}); on a "
                        "cluster, the output folder must be on a filesystem every node shares")
    files: list[Any] = []
    tmp = final.with_name(f".{final.name}.index-tmp")
    try:
        files += [h5py.File(unit_file(final, u.index), "r") for u in units]
        first = files[0]
        entries = []
        for f in files:
            # In a process that also reads the capture live (a notebook), HDF5 shares one open
            # file between that reader's SWMR handle and this one: refresh, or see its old state.
            for name in _walk(f):
                f[name].refresh()
        for u, f in zip(units, files, strict=True):
            offsets = f[S.TOKEN_OFFSETS][:]
            if len(offsets) - 1 != u.stop - u.start:
                raise RuntimeError(f"unit {u.index} holds {len(offsets) - 1} prompts, expected {u.stop - u.start}")
            entries.append({"file": f"{folder.name}/{unit_file(final, u.index).name}", "unit": u.index,
                            "first_prompt": u.start, "prompts": u.stop - u.start,
                            "offsets_sha256": _offsets_digest(offsets)})
        with h5py.File(tmp, "w", libver=INDEX_LIBVER) as out:
            for key, value in first.attrs.items():
                if key not in (ATTR_SHARD_RUN, ATTR_SHARD_UNIT):  # a unit's identity, not the run's
                    out.attrs[key] = value
            out.attrs[S.ATTR_PLANNED] = sum(u.stop - u.start for u in units)
            if created:
                out.attrs[S.ATTR_CREATED] = created
            for name in _walk(first):
                src = first[name]
                if name == S.META_SETTINGS and settings is not None:
                    raw = S.dumps(settings).encode("utf-8")
                    out.create_dataset(name, data=np.array(raw, dtype=h5py.string_dtype("utf-8", len(raw))))
                elif name.startswith(("meta/", "vocab/")):
                    out.create_dataset(name, data=src[()], dtype=src.dtype)
                elif is_offsets(name):
                    _write_offsets(out, name, files)
                else:
                    _write_virtual(out, name, files, entries)
                for key, value in src.attrs.items():
                    out[name].attrs[key] = value
            for group in (S.ACTS, S.ACTS_OFFSETS):
                if group in first:
                    out.require_group(group)
                    for key, value in first[group].attrs.items():
                        out[group].attrs[key] = value
            raw = S.dumps(entries).encode("utf-8")
            out.create_dataset(META_SHARDS, data=np.array(raw, dtype=h5py.string_dtype("utf-8", len(raw))))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        for f in files:
            f.close()
        tmp.unlink(missing_ok=True)
    return final


def _write_offsets(out: Any, name: str, files: list[Any]) -> None:
    """The global offsets: unit k's entries after its leading 0, plus everything before it."""
    total = 1 + sum(int(f[name].shape[0]) - 1 for f in files)
    ds = out.create_dataset(name, shape=(total,), dtype=np.int64, chunks=(min(total, 1 << 16),),
                            maxshape=(None,))
    ds[0] = 0
    pos, base = 1, 0
    for f in files:
        src = f[name]
        n = int(src.shape[0]) - 1
        for s in range(1, n + 1, _OFFSETS_STEP):
            part = src[s : min(n + 1, s + _OFFSETS_STEP)].astype(np.int64) + base
            ds[pos : pos + len(part)] = part
            pos += len(part)
        base += int(src[n]) if n else 0


def _write_virtual(out: Any, name: str, files: list[Any], entries: list[dict[str, Any]]) -> None:
    import h5py

    srcs = [f[name] for f in files]
    rows = [int(s.shape[0]) for s in srcs]
    shape = (sum(rows), *srcs[0].shape[1:])
    layout = h5py.VirtualLayout(shape=shape, dtype=srcs[0].dtype, maxshape=shape)
    pos = 0
    for src, n, entry in zip(srcs, rows, entries, strict=True):
        if n:
            layout[pos : pos + n] = h5py.VirtualSource(entry["file"], name, shape=(n, *src.shape[1:]))
        pos += n
    out.create_virtual_dataset(name, layout, fillvalue=0)


def confined(where: Path, name: str) -> str:
    """A unit file's name as an index records it: relative, inside the run's folder (a damaged or
    hostile index must not make the reader open other files)."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise UserError(f"{where} is a damaged workbench run (a shard named {name[:80]!r} lies outside its folder)")
    return name


def check_shards(index: Path, f: Any, run_id: str,
                 keep: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Check every unit file the sharded index ``f`` (an open h5py file at ``index``) names:
    present, a complete run (opened without SWMR, so a truncated file fails), of this run and
    unit, holding the recorded prompts with the recorded commit marker. Returns the entries;
    raises :class:`UserError` naming the first bad shard. With ``keep``, the checked files stay
    open in it, by their name in the index (for :class:`DirectReads`)."""
    import h5py

    from workbench.store import guard

    entries: list[dict[str, Any]] = guard.json_doc(index, META_SHARDS, f[META_SHARDS][()], list)
    for e in entries:
        if not isinstance(e, dict):
            raise guard.damaged(index, f"{META_SHARDS} holds a {type(e).__name__}, not a shard entry")
        path = index.parent / confined(index, str(e["file"]))
        what = f"{index}: shard {e['file']} (unit {e['unit']}, prompts {e['first_prompt']}-" \
               f"{e['first_prompt'] + e['prompts'] - 1})"
        if not path.exists():
            raise UserError(f"{what} is missing; the run cannot be read without it")
        try:
            shard = h5py.File(path, "r")
        except OSError as exc:
            raise UserError(f"{what} is truncated or damaged ({str(exc).splitlines()[0]})") from None
        try:
            unit_ok = (shard.attrs.get(ATTR_SHARD_RUN) == run_id
                       and int(shard.attrs.get(ATTR_SHARD_UNIT, -1)) == int(e["unit"]))
            offsets = shard[S.TOKEN_OFFSETS][:]
        except (KeyError, OSError):
            shard.close()
            raise UserError(f"{what} is not a workbench run shard") from None
        if keep is None:
            shard.close()
        else:
            keep[e["file"]] = shard
        if not unit_ok:
            raise UserError(f"{what} is foreign: it belongs to another run or unit")
        if len(offsets) - 1 < int(e["prompts"]):
            raise UserError(f"{what} is short: it holds {len(offsets) - 1} of its {e['prompts']} prompts")
        if len(offsets) - 1 != int(e["prompts"]) or _offsets_digest(offsets) != e["offsets_sha256"]:
            raise UserError(f"{what} is foreign: its contents differ from the ones indexed")
    return entries


def shard_progress(final: Path) -> dict[str, Any] | None:
    """A sharded capture in progress or interrupted (``units.json`` without the index): its
    plan and each unit's state (``complete``, ``partial`` with committed prompts, ``pending``).
    ``None`` if ``final`` is not one."""
    import h5py

    doc = read_units_file(final)
    if doc is None:
        return None
    units = []
    for u in doc.get("units", []):
        path = unit_file(final, int(u["index"]))
        state, done = "pending", 0
        for candidate, swmr in ((path, False), (partial_path(path), True)):
            if candidate.exists():
                try:
                    with h5py.File(candidate, "r", swmr=swmr) as f:
                        done = int(f[S.TOKEN_OFFSETS].shape[0]) - 1
                    state = "complete" if not swmr else "partial"
                except (OSError, KeyError):
                    state = "unreadable"
                break
        units.append({**u, "state": state, "committed": done,
                      "file": str(path.relative_to(final.parent))})
    return {"path": str(final), "run_id": doc.get("run_id"), "workers": doc.get("workers"),
            "prompts": sum(int(u["stop"]) - int(u["start"]) for u in doc.get("units", [])),
            "committed": sum(u["committed"] for u in units), "units": units}


class DirectReads:
    """Reads of a sharded index's virtual datasets straight from the unit files: the same rows
    (the mapping is the virtual dataset's own, from ``virtual_sources()``), without HDF5 resolving
    the virtual selection on every read — which made reading a hook prompt by prompt ~1.3x
    slower than from one file. Unit files are opened once, on first use; :meth:`close` closes
    them. Plain h5py and h5dump read the virtual datasets themselves."""

    def __init__(self, index: Path, files: dict[str, Any] | None = None) -> None:
        self.folder = index.parent
        self._files: dict[str, Any] = files if files is not None else {}

    def wrap(self, ds: Any) -> Any:
        return _DirectDataset(self, ds) if getattr(ds, "is_virtual", False) else ds

    def source(self, file_name: str, dset: str) -> Any:
        import h5py

        f = self._files.get(file_name)
        if f is None:
            f = self._files[file_name] = h5py.File(self.folder / confined(self.folder, file_name), "r")
        return f[dset]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class _DirectDataset:
    def __init__(self, reads: DirectReads, vds: Any) -> None:
        self.reads, self.vds = reads, vds
        self.attrs, self.dtype, self.shape = vds.attrs, vds.dtype, vds.shape
        maps = []
        for m in vds.virtual_sources():
            lo, hi = m.vspace.get_select_bounds()
            maps.append((int(lo[0]), int(hi[0]) + 1, m.file_name, m.dset_name))
        maps.sort()
        self.maps = maps
        self.starts = np.array([m[0] for m in maps], dtype=np.int64)
        self._sources: dict[int, Any] = {}

    def refresh(self) -> None:
        """A finished run does not change."""

    def _src(self, k: int) -> Any:
        ds = self._sources.get(k)
        if ds is None:
            ds = self._sources[k] = self.reads.source(self.maps[k][2], self.maps[k][3])
        return ds

    def __getitem__(self, key: Any) -> Any:
        rows = row_range(key, self.shape[0], self.vds.name)
        if rows is None:
            return self.vds[key]
        start, stop, single = rows
        values = self._read(start, stop)
        return values[0] if single else values

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), dtype=self.dtype)
        pieces = []
        k = max(0, int(np.searchsorted(self.starts, start, side="right")) - 1)
        while k < len(self.maps) and self.maps[k][0] < stop:
            lo, hi = self.maps[k][0], self.maps[k][1]
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append((k, a - lo, b - lo, a - start))
            k += 1
        if len(pieces) == 1:
            k, a, b, _ = pieces[0]
            return self._src(k)[a:b]
        # several units: each read straight into its place in the result (no second copy)
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        for k, a, b, at in pieces:
            self._src(k).read_direct(out, np.s_[a:b], np.s_[at : at + b - a])
        return out
