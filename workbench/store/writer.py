"""Writing a run: a single HDF5 file written in SWMR mode, committed prompt by prompt.

Crash safety rests on three rules:

1. Every dataset is created before the switch to SWMR mode; afterwards the writer only appends.
2. A batch is appended to every data dataset and flushed *before* any offsets are extended; the
   per-field offsets are flushed next, and ``prompts/token_offsets`` — the commit marker — last.
   A reader (or a reader after ``kill -9``) trusts ``len(token_offsets) - 1`` prompts, whose data
   is already on disk.
3. The file is ``NAME.h5.partial`` while it is written and is renamed to ``NAME.h5`` (atomically, in
   the same folder) only after a clean close and ``fsync``. A finished run is never reopened for
   writing.

A killed SWMR file opens only read-only, so ``--resume`` copies its committed prompts into a fresh
partial file (:meth:`RunWriter.copy_committed`) and continues there; see docs/store.md for why this
was chosen over shards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.store import schema as S

CHUNK_BYTES_MAX = 1 << 20  # 1 MiB chunks, as recommended for HDF5 streaming writes
CHUNK_BYTES_MIN = 64 << 10


@dataclass
class BatchRecord:
    """Everything stored for one batch of prompts, already on the CPU in storage dtype."""

    prompt_ids: list[str]
    texts: list[str]
    metas: list[str]
    """Per-prompt metadata as JSON text."""
    token_ids: list[np.ndarray]
    str_tokens: list[list[str]]
    acts: dict[str, np.ndarray]
    """Per stored hook: token layout ``(batch_tokens, *feature_shape)``; square layout flat."""
    square_sizes: dict[str, list[int]] = field(default_factory=dict)
    """Per square hook: number of elements for each prompt of the batch."""
    loss: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.token_ids))

    def nbytes(self) -> int:
        total = sum(a.nbytes for a in self.acts.values())
        for extra in (self.loss, self.topk_ids, self.topk_logprobs):
            if extra is not None:
                total += extra.nbytes
        return total + sum(t.nbytes for t in self.token_ids)


def _chunk_rows(row_bytes: int, target: int) -> int:
    return max(1, target // max(1, row_bytes))


class RunWriter:
    """Appends committed batches to a new partial run file."""

    def __init__(
        self,
        path: Path,
        *,
        model_info: dict[str, Any],
        settings: dict[str, Any],
        hooks: list[S.HookSpec],
        planned_prompts: int,
        storage_dtype: str,
        top_k: int,
        has_lm_head: bool,
        compression: str | None,
        tool_version: str,
        expected_tokens: int = 0,
        expected_elements: dict[str, int] | None = None,
    ) -> None:
        self.path = path
        self.hooks = hooks
        self.storage_dtype = storage_dtype
        self.top_k = top_k
        self.has_lm_head = has_lm_head
        self.bytes_written = 0
        self.n_prompts = 0
        self.n_tokens = 0
        self._elements: dict[str, int] = {}  # square hook -> elements written
        self._ragged_bytes: dict[str, int] = dict.fromkeys(S.RAGGED_BYTES, 0)
        self._str_bytes = 0
        self._closed = False
        filters: dict[str, Any] = {}
        if compression == "gzip":
            filters = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        elif compression == "lzf":
            filters = {"compression": "lzf", "shuffle": True}
        elif compression not in (None, "none"):
            raise ValueError(f"unknown compression {compression!r}")
        self._filters = filters
        # Chunks never larger than the data expected, so a small run is a small file.
        self._expected_tokens = max(1, expected_tokens)
        self._expected_elements = expected_elements or {}
        # Chunks of at most 1 MiB, smaller when there are many hooks, so the chunk cache (one
        # partly filled chunk per dataset) stays bounded whatever is captured.
        n_data = max(1, len(hooks) + 8)
        self._chunk_target = int(min(CHUNK_BYTES_MAX, max(CHUNK_BYTES_MIN, (256 << 20) // n_data)))
        self.f = h5py.File(
            path, "w", libver="latest", rdcc_nbytes=2 * self._chunk_target, rdcc_nslots=1009
        )
        try:
            self._create(model_info, settings, planned_prompts, tool_version)
            self.f.swmr_mode = True
        except BaseException:
            self.f.close()
            raise

    # --- creation -----------------------------------------------------------------------------

    def _ds(self, name: str, shape: tuple[int, ...], dtype: Any, *, compress: bool = False,
            chunk_rows: int | None = None, fill: Any = None,
            expected_rows: int | None = None) -> h5py.Dataset:
        maxshape = (None, *shape[1:])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        rows = chunk_rows or _chunk_rows(row_bytes, self._chunk_target)
        if expected_rows is not None:
            # The row count is known before writing: split it into equal chunks so the last one
            # is (nearly) full. HDF5 allocates whole chunks, and a run has one last chunk per
            # dataset: with hundreds of hooks, a mostly empty one each is real space.
            expected_rows = max(1, expected_rows)
            n_chunks = -(-expected_rows // max(1, rows))
            rows = -(-expected_rows // n_chunks)
        kwargs: dict[str, Any] = {"maxshape": maxshape, "chunks": (rows, *shape[1:]), "dtype": dtype}
        if compress:
            kwargs.update(self._filters)
        ds = self.f.create_dataset(name, shape=shape, **kwargs)
        if fill is not None:
            ds[...] = fill
        return ds

    def _offsets(self, name: str, entries: int) -> h5py.Dataset:
        return self._ds(name, (1,), np.int64, chunk_rows=4096, fill=np.zeros(1, np.int64),
                        expected_rows=entries + 1)

    def _create(self, model_info: dict[str, Any], settings: dict[str, Any], planned: int,
                tool_version: str) -> None:
        f = self.f
        f.attrs[S.ATTR_SCHEMA] = S.SCHEMA
        f.attrs[S.ATTR_VERSION] = S.SCHEMA_VERSION
        f.attrs[S.ATTR_TOOL] = tool_version
        f.attrs[S.ATTR_CREATED] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs[S.ATTR_PLANNED] = int(planned)
        f.attrs["storage_dtype"] = self.storage_dtype
        for name, doc in (
            (S.META_MODEL, model_info),
            (S.META_SETTINGS, settings),
            (S.META_HOOKS, [h.to_dict() for h in self.hooks]),
        ):
            raw = S.dumps(doc).encode("utf-8")
            # A fixed-length UTF-8 string: h5dump prints it as text.
            f.create_dataset(name, data=np.array(raw, dtype=h5py.string_dtype("utf-8", len(raw))))
        self._offsets(S.TOKEN_OFFSETS, planned)
        for name in S.RAGGED_BYTES:
            self._ds(name, (0,), np.uint8, chunk_rows=64 << 10)
            self._offsets(S.offsets_name(name), planned)
        n_tok = self._expected_tokens
        self._ds(S.TOKEN_IDS, (0,), np.int32, chunk_rows=16384, expected_rows=n_tok)
        self._ds(S.TOKEN_STR, (0,), np.uint8, chunk_rows=64 << 10, expected_rows=4 * n_tok)
        self._offsets(S.TOKEN_STR_OFFSETS, n_tok)
        if self.has_lm_head:
            self._ds(S.TOKEN_LOSS, (0,), np.float32, chunk_rows=16384, expected_rows=n_tok)
            self._ds(S.TOKEN_TOPK_IDS, (0, self.top_k), np.int32, chunk_rows=4096, expected_rows=n_tok)
            self._ds(S.TOKEN_TOPK_LOGPROBS, (0, self.top_k), np.float32, chunk_rows=4096,
                     expected_rows=n_tok)
        acts = f.create_group(S.ACTS)
        f.create_group(S.ACTS_OFFSETS)
        for h in self.hooks:
            dtype = S.storage_numpy_dtype(self.storage_dtype, h.kind)
            if h.layout == "square":
                ds = self._ds(f"{S.ACTS}/{h.name}", (0,), dtype, compress=True,
                              expected_rows=self._expected_elements.get(h.name))
                self._offsets(f"{S.ACTS_OFFSETS}/{h.name}", planned)
                self._elements[h.name] = 0
            else:
                ds = self._ds(f"{S.ACTS}/{h.name}", (0, *h.feature_shape), dtype, compress=True,
                              expected_rows=n_tok)
            ds.attrs["layout"] = h.layout
            ds.attrs["axes"] = ",".join(h.axes)
            ds.attrs["encoding"] = "bfloat16" if (self.storage_dtype == "bfloat16" and h.kind == "float") else ""
            if h.aliases:
                ds.attrs["aliases"] = ",".join(h.aliases)
        acts.attrs["storage_dtype"] = self.storage_dtype

    # --- appending ----------------------------------------------------------------------------

    def _append(self, name: str, values: np.ndarray) -> h5py.Dataset:
        ds = self.f[name]
        start = ds.shape[0]
        if len(values):
            ds.resize(start + len(values), axis=0)
            ds[start:] = values
            self.bytes_written += values.nbytes
        return ds

    def _append_offsets(self, name: str, ends: list[int]) -> h5py.Dataset:
        return self._append(name, np.asarray(ends, dtype=np.int64))

    def append(self, batch: BatchRecord) -> None:
        """Write one batch and commit it (see the module docstring for the order)."""
        n = len(batch.texts)
        data_sets = []
        # 1. data
        ragged_ends: dict[str, list[int]] = {}
        for name, items in ((S.PROMPT_TEXT, batch.texts), (S.PROMPT_ID, batch.prompt_ids),
                            (S.PROMPT_META, batch.metas)):
            encoded = [s.encode("utf-8") for s in items]
            ends, pos = [], self._ragged_bytes[name]
            for e in encoded:
                pos += len(e)
                ends.append(pos)
            ragged_ends[name] = ends
            self._ragged_bytes[name] = pos
            data_sets.append(self._append(name, np.frombuffer(b"".join(encoded), np.uint8)))
        token_ids = np.concatenate(batch.token_ids).astype(np.int32)
        data_sets.append(self._append(S.TOKEN_IDS, token_ids))
        str_ends, pieces, pos = [], [], self._str_bytes
        for toks in batch.str_tokens:
            for t in toks:
                b = t.encode("utf-8", errors="surrogatepass")
                pieces.append(b)
                pos += len(b)
                str_ends.append(pos)
        self._str_bytes = pos
        data_sets.append(self._append(S.TOKEN_STR, np.frombuffer(b"".join(pieces), np.uint8)))
        if self.has_lm_head:
            assert batch.loss is not None and batch.topk_ids is not None
            assert batch.topk_logprobs is not None
            data_sets.append(self._append(S.TOKEN_LOSS, batch.loss))
            data_sets.append(self._append(S.TOKEN_TOPK_IDS, batch.topk_ids))
            data_sets.append(self._append(S.TOKEN_TOPK_LOGPROBS, batch.topk_logprobs))
        for h in self.hooks:
            data_sets.append(self._append(f"{S.ACTS}/{h.name}", batch.acts[h.name]))
        for ds in data_sets:
            ds.flush()
        # 2. per-field offsets
        offset_sets = []
        for name, ends in ragged_ends.items():
            offset_sets.append(self._append_offsets(S.offsets_name(name), ends))
        offset_sets.append(self._append_offsets(S.TOKEN_STR_OFFSETS, str_ends))
        for h in self.hooks:
            if h.layout == "square":
                ends, pos = [], self._elements[h.name]
                for size in batch.square_sizes[h.name]:
                    pos += size
                    ends.append(pos)
                self._elements[h.name] = pos
                offset_sets.append(self._append_offsets(f"{S.ACTS_OFFSETS}/{h.name}", ends))
        for ds in offset_sets:
            ds.flush()
        # 3. the commit marker
        token_ends, pos = [], self.n_tokens
        for ids in batch.token_ids:
            pos += len(ids)
            token_ends.append(pos)
        self._append_offsets(S.TOKEN_OFFSETS, token_ends).flush()
        self.n_tokens = pos
        self.n_prompts += n

    # --- resume ------------------------------------------------------------------------------

    def copy_committed(self, old: h5py.File, n_prompts: int, step_bytes: int = 64 << 20) -> None:
        """Copy the first ``n_prompts`` committed prompts of ``old`` (a run opened read-only) into
        this (empty) file, committing them with the same ordering rules as :meth:`append`."""
        if n_prompts == 0:
            return
        tok_off = old[S.TOKEN_OFFSETS][: n_prompts + 1]
        n_tokens = int(tok_off[-1])
        plan: list[tuple[str, int]] = []  # (data dataset, rows to copy)
        offsets_plan: list[tuple[str, int]] = []  # (offsets dataset, entries to copy)
        for name in S.RAGGED_BYTES:
            ends = old[S.offsets_name(name)][: n_prompts + 1]
            plan.append((name, int(ends[-1])))
            offsets_plan.append((S.offsets_name(name), n_prompts + 1))
        plan.append((S.TOKEN_IDS, n_tokens))
        str_ends = old[S.TOKEN_STR_OFFSETS][: n_tokens + 1]
        plan.append((S.TOKEN_STR, int(str_ends[-1])))
        offsets_plan.append((S.TOKEN_STR_OFFSETS, n_tokens + 1))
        if self.has_lm_head:
            plan += [(S.TOKEN_LOSS, n_tokens), (S.TOKEN_TOPK_IDS, n_tokens),
                     (S.TOKEN_TOPK_LOGPROBS, n_tokens)]
        for h in self.hooks:
            if h.layout == "square":
                ends = old[f"{S.ACTS_OFFSETS}/{h.name}"][: n_prompts + 1]
                plan.append((f"{S.ACTS}/{h.name}", int(ends[-1])))
                offsets_plan.append((f"{S.ACTS_OFFSETS}/{h.name}", n_prompts + 1))
                self._elements[h.name] = int(ends[-1])
            else:
                plan.append((f"{S.ACTS}/{h.name}", n_tokens))
        for name, rows in plan:
            src = old[name]
            row_bytes = max(1, src.dtype.itemsize * int(np.prod(src.shape[1:], dtype=np.int64)))
            step = max(1, step_bytes // row_bytes)
            for start in range(0, rows, step):
                self._append(name, src[start : min(rows, start + step)])
            self.f[name].flush()
        for name, entries in offsets_plan:
            # offsets[0] = 0 is already there
            self._append(name, old[name][1:entries]).flush()
        self._append(S.TOKEN_OFFSETS, tok_off[1:]).flush()
        for name in S.RAGGED_BYTES:
            self._ragged_bytes[name] = int(old[S.offsets_name(name)][n_prompts])
        self._str_bytes = int(str_ends[-1])
        self.n_tokens = n_tokens
        self.n_prompts = n_prompts

    def move_to(self, path: Path) -> None:
        """Rename the (open) file atomically, e.g. a resumed copy over the killed original."""
        os.replace(self.path, path)
        self.path = path

    # --- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file and make its bytes durable (a clean close clears the SWMR flags)."""
        if self._closed:
            return
        self._closed = True
        self.f.close()
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())
