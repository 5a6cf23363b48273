"""Reading a sharded capture that is still running (or whose driver was killed): there is no
index yet, so :class:`LiveShards` stands in for the h5py file :class:`~workbench.store.reader.Run`
reads, over the unit files in ``RUN.h5.shards/``.

It shows the run's committed prefix in prompt order — every complete unit, then the committed
prompts of the first unfinished one — so prompt ``i`` is prompt ``i`` of the finished run, and
``Run.refresh()`` only ever adds prompts. Unfinished unit files are read in SWMR mode, each up to
its own commit marker, as a single run being written is; a unit whose worker was killed and
restarted is reopened when its file is replaced.

A unit that was read while being written is opened again once it is complete: its writer's
clean close trims and rewrites metadata that an SWMR reader's handle may hold stale (reading
through such a handle gave wrong values in a test).

Only what :class:`Run` reads is provided: ``attrs``, ``name in f``, ``f[name]`` (datasets with
``shape``, ``dtype``, ``attrs``, slicing and ``refresh()``) and ``close()``. Data datasets are
the units' rows joined; offsets datasets are joined with each unit's entries shifted by what the
units before it hold. (The finished run's index does the same with HDF5 virtual datasets:
:mod:`workbench.store.shards`.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.store import schema as S
from workbench.store.files import partial_path
from workbench.store.shards import Unit, is_offsets, read_units_file, row_range, unit_file


@dataclass
class _Part:
    """One unit file in the prefix, with ``n`` committed prompts."""

    unit: Unit
    f: Any
    inode: int
    swmr: bool
    n: int = 0
    datasets: dict[str, Any] = field(default_factory=dict)

    def ds(self, name: str) -> Any:
        d = self.datasets.get(name)
        if d is None:
            d = self.datasets[name] = self.f[name]
        return d

    def offset(self, name: str, i: int) -> int:
        return int(self.ds(name)[i])


class LiveShards:
    """An h5py-file look-alike over a sharded capture's committed prefix (module docstring)."""

    def __init__(self, final: Path) -> None:
        doc = read_units_file(final)
        if doc is None:
            raise UserError(f"no such run: {final}")
        self.final = final
        self.units = [Unit(**u) for u in doc.get("units", [])]
        self.planned = sum(u.stop - u.start for u in self.units)
        self.parts: list[_Part] = []
        self.generation = 0  # rises with every rescan: datasets cache their layout per generation
        self._closed = False
        self.rescan()
        if not self.parts:
            raise UserError(f"{final} is a sharded capture that has not written any prompt yet")
        self.attrs = dict(self.parts[0].f.attrs)
        self.attrs[S.ATTR_PLANNED] = self.planned

    # --- the prefix ------------------------------------------------------------------------------

    def rescan(self) -> None:
        """Find the committed prefix again (called by ``refresh()`` of the commit marker)."""
        parts = []
        old = {p.unit.index: p for p in self.parts}
        for u in self.units:
            part = self._open(u, old.get(u.index))
            if part is None:
                break
            parts.append(part)
            if part.n < u.stop - u.start:
                break  # the first unfinished unit ends the prefix
        for p in old.values():
            if all(q is not p for q in parts):
                p.f.close()
        self.parts = parts
        self.generation += 1

    def _open(self, unit: Unit, part: _Part | None) -> _Part | None:
        import h5py

        done = unit_file(self.final, unit.index)
        for path, swmr in ((done, False), (partial_path(done), True)):
            try:
                inode = os.stat(path).st_ino
            except FileNotFoundError:
                continue
            if part is not None and part.inode == inode and part.swmr == swmr:
                if swmr:  # still being written: see its new commits
                    for d in part.datasets.values():
                        d.refresh()
            else:
                if part is not None:
                    part.f.close()
                try:
                    part = _Part(unit, h5py.File(path, "r", swmr=swmr), inode, swmr)
                except OSError:
                    return None  # being created, or renamed under us: next refresh
            part.n = max(0, int(part.ds(S.TOKEN_OFFSETS).shape[0]) - 1)
            return part
        return None

    # --- rows of each dataset ------------------------------------------------------------------------

    def rows(self, part: _Part, name: str) -> int:
        """Committed rows (entries after the leading 0, for offsets) of ``name`` in ``part``."""
        n = part.n
        if is_offsets(name):
            if name.endswith("/str_offsets") and not name.startswith("prompts/"):
                stream = name.split("/", 1)[0]
                return part.offset(S.stream_offsets(stream), n)
            return n
        if name in S.RAGGED_BYTES:
            return part.offset(S.offsets_name(name), n)
        if name == S.N_INPUT:
            return n
        if name.startswith(f"{S.ACTS}/"):
            square = f"{S.ACTS_OFFSETS}/{name[len(S.ACTS) + 1:]}"
            if square in part.f:
                return part.offset(square, n)
            streams = str(part.ds(name).attrs.get("streams", "")) or S.MAIN
            return part.offset(S.stream_offsets(streams.split(",")[0]), n)
        stream, _, rest = name.partition("/")
        tokens = part.offset(S.stream_offsets(stream), n)
        return part.offset(S.offsets_name(S.str_name(stream)), tokens) if rest == "str" else tokens

    # --- the h5py.File look-alike --------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.parts[0].f

    def __getitem__(self, name: str) -> Any:
        if name.startswith(("meta/", "vocab/")):
            return self.parts[0].f[name]
        if name not in self:
            raise KeyError(name)
        return _Joined(self, name, offsets=is_offsets(name))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for p in self.parts:
                p.f.close()

    def size_bytes(self) -> int:
        total = 0
        for u in self.units:
            for path in (unit_file(self.final, u.index), partial_path(unit_file(self.final, u.index))):
                if path.exists():
                    total += path.stat().st_size
        return total


class _Joined:
    """One dataset of every part, joined in prompt order (offsets shifted)."""

    def __init__(self, shards: LiveShards, name: str, offsets: bool) -> None:
        self.shards, self.name, self.offsets = shards, name, offsets
        first = shards.parts[0].ds(name)
        self.dtype, self.attrs, self._tail = first.dtype, dict(first.attrs), first.shape[1:]
        self._cached: tuple[int, list[tuple[_Part, int, int]]] = (-1, [])

    def refresh(self) -> None:
        if self.name == S.TOKEN_OFFSETS:  # Run.refresh() refreshes the commit marker first
            self.shards.rescan()

    def _layout(self) -> list[tuple[_Part, int, int]]:
        """(part, its rows, what it adds to offsets) for each part (kept until the next rescan)."""
        if self._cached[0] == self.shards.generation:
            return self._cached[1]
        out = []
        for p in self.shards.parts:
            rows = self.shards.rows(p, self.name)
            base = int(p.ds(self.name)[rows]) if self.offsets else 0
            out.append((p, rows, base))
        self._cached = (self.shards.generation, out)
        return out

    @property
    def shape(self) -> tuple[int, ...]:
        total = sum(rows for _, rows, _ in self._layout())
        return (total + 1 if self.offsets else total, *self._tail)

    def __getitem__(self, key: Any) -> Any:
        layout = self._layout()
        length = sum(rows for _, rows, _ in layout) + (1 if self.offsets else 0)
        rows = row_range(key, length, self.name)
        if rows is None:
            raise TypeError(f"{self.name}: only contiguous slices are supported")
        start, stop, single = rows
        values = self._offsets(layout, start, stop) if self.offsets else self._rows(layout, start, stop)
        return values[0] if single else values

    def _rows(self, layout: list[tuple[_Part, int, int]], start: int, stop: int) -> np.ndarray:
        pieces, pos = [], 0
        for p, rows, _ in layout:
            lo, hi = max(start, pos), min(stop, pos + rows)
            if lo < hi:
                pieces.append(p.ds(self.name)[lo - pos : hi - pos])
            pos += rows
        if not pieces:
            return np.zeros((0, *self._tail), dtype=self.dtype)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _offsets(self, layout: list[tuple[_Part, int, int]], start: int, stop: int) -> np.ndarray:
        """Global entries ``start`` to ``stop - 1``: entry 0 is 0; each part's entries 1..rows
        are shifted by the ends of the parts before it."""
        out = np.zeros(stop - start, dtype=np.int64)
        pos, base = 0, 0  # global index of the part's entry 0; the shift
        for p, rows, last in layout:
            lo, hi = max(start, pos + 1), min(stop, pos + rows + 1)
            if lo < hi:
                out[lo - start : hi - start] = p.ds(self.name)[lo - pos : hi - pos] + base
            pos += rows
            base += last
        return out
