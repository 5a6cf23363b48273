"""Writing a run: a single HDF5 file written in SWMR mode, committed one or more whole batches
at a time.

Crash safety rests on three rules:

1. Every dataset is created before the switch to SWMR mode; afterwards the writer only appends
   (activation datasets may be extended ahead of their rows, and a clean close trims them).
2. A commit's batches are appended to every data dataset and flushed *before* any offsets are
   extended (a capture commits the batches finished in the last few seconds together); the
   per-field offsets are flushed next, and ``prompts/token_offsets`` — the commit marker — last.
   A reader (or a reader after ``kill -9``) trusts ``len(token_offsets) - 1`` prompts, whose data
   is already on disk.
3. The file is ``NAME.h5.partial`` while it is written and is renamed to ``NAME.h5`` (atomically, in
   the same folder) only after a clean close and ``fsync``. A finished run is never reopened for
   writing.

A killed SWMR file opens only read-only, so ``--resume`` copies its committed prompts into a fresh
partial file (:meth:`RunWriter.copy_committed`) and continues there; docs/store.md says why this
was chosen over shards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.store import codecs
from workbench.store import schema as S
from workbench.store.batch import BatchRecord, TokenField
from workbench.store.chunks import ChunkAppender, start_writeback
from workbench.store.settings import RunSettings

# Chunk sizes follow the bytes a dataset receives per batch (measured: benchmarks/ and
# docs/store.md). Small per-batch writes want small chunks, because every commit flushes the
# partly filled last chunk and a large one would be rewritten several times; large writes want
# large chunks that bypass the chunk cache (1.6 GB/s into the page cache at 4 MiB versus
# 0.8 GB/s at 1 MiB through the cache).
CHUNK_BYTES_MIN = 64 << 10
CHUNK_BYTES_MAX = 4 << 20
CACHE_BYTES_TOTAL = 256 << 20  # chunk caches of all datasets together
WRITEBACK_EVERY = 64 << 20  # start the disk writing every this many bytes (see chunks.start_writeback)


def _ends(start: int, sizes: list[int]) -> list[int]:
    out, pos = [], start
    for s in sizes:
        pos += s
        out.append(pos)
    return out


class RunWriter:
    """Appends committed batches to a new partial run file."""

    def __init__(
        self,
        path: Path,
        *,
        model_info: dict[str, Any],
        settings: RunSettings | dict[str, Any],
        hooks: list[S.HookSpec],
        planned_prompts: int,
        storage_dtype: str,
        compression: str | None,
        tool_version: str,
        streams: tuple[str, ...] = (S.MAIN,),
        token_fields: tuple[TokenField, ...] = (),
        expected_tokens: dict[str, int] | None = None,
        expected_elements: dict[str, int] | None = None,
        expected_batches: int = 1,
        vocab: list[str] | None = None,
        vocab_bytes: list[bytes] | None = None,
        special_ids: list[int] | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self._attrs = dict(attrs or {})
        self.hooks = hooks
        self._hook = {h.name: h for h in hooks}
        self.storage_dtype = storage_dtype
        self.streams = streams
        self.token_fields = token_fields
        self.bytes_written = 0
        self.n_prompts = 0
        self.n_tokens: dict[str, int] = dict.fromkeys(streams, 0)
        self._elements: dict[str, int] = {}  # square hook -> elements committed
        # hook -> rows (square hooks: elements) written past the committed ones, by write_act
        # calls for batches not committed yet: several batches may be committed at once
        self._pending: dict[str, int] = {h.name: 0 for h in hooks}
        self._ragged_bytes: dict[str, int] = dict.fromkeys(S.RAGGED_BYTES, 0)
        self._str_bytes: dict[str, int] = dict.fromkeys(streams, 0)
        self._closed = False
        # gzip, lzf, or an hdf5plugin codec (blosc2-zstd, zstd): workbench/store/codecs.py
        self._filters = codecs.filters(compression)
        # Chunks never larger than the data expected, so a small run is a small file.
        self._expected_tokens = {s: max(1, (expected_tokens or {}).get(s, 1)) for s in streams}
        self._expected_elements = expected_elements or {}
        self._batches = max(1, expected_batches)
        # Each dataset caches at most one chunk, and all caches together stay bounded.
        self._cache_each = max(CHUNK_BYTES_MIN, CACHE_BYTES_TOTAL // max(1, len(hooks) + 16))
        self._unsynced = 0
        # Every dataset this writer appends to stays open for the whole capture: the chunk cache
        # sized in _ds belongs to that open handle (a dataset opened again by name gets HDF5's
        # default 1 MiB cache, and closing it writes its partly filled chunks out each time).
        self._open: dict[str, h5py.Dataset] = {}
        self._direct: dict[str, ChunkAppender] = {}  # uncompressed activations (see _ds)
        # A compressed run's file format starts at HDF5 1.10's (SWMR needs no less): with the
        # lowest bound at "latest" (HDF5 2.0's format, as uncompressed runs are written), h5py's
        # HDF5 records filtered datasets in a form that HDF5 1.10's tools cannot parse (Debian's
        # h5dump fails on the whole file); tests/test_export.py checks it lists them.
        libver = ("v110", "latest") if self._filters else "latest"
        self.f = h5py.File(path, "w", libver=libver)
        try:
            doc = settings.to_dict() if isinstance(settings, RunSettings) else settings
            self._create(model_info, doc, planned_prompts, tool_version)
            if vocab:
                self._write_vocab(vocab, vocab_bytes, special_ids)
            self.f.swmr_mode = True
        except BaseException:
            self.f.close()
            raise

    # --- creation -----------------------------------------------------------------------------

    def _ds(self, name: str, shape: tuple[int, ...], dtype: Any, *, compress: bool = False,
            chunk_rows: int | None = None, fill: Any = None,
            expected_rows: int | None = None, direct: bool = False) -> h5py.Dataset:
        maxshape = (None, *shape[1:])
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
        per_batch = -(-(expected_rows or 1) // self._batches) * row_bytes
        if chunk_rows is not None:
            rows = chunk_rows
        else:
            rows = max(1, min(CHUNK_BYTES_MAX, max(CHUNK_BYTES_MIN, per_batch)) // row_bytes)
        if expected_rows is not None:
            # The row count is known before writing: split it into equal chunks so the last one
            # is (nearly) full. HDF5 allocates whole chunks, and a run has one last chunk per
            # dataset: with hundreds of hooks, a mostly empty one each is real space.
            expected_rows = max(1, expected_rows)
            n_chunks = -(-expected_rows // max(1, rows))
            rows = -(-expected_rows // n_chunks)
        chunk_bytes = rows * row_bytes
        # A batch's write covers about one chunk and straddles two, so the partly filled chunk
        # stays cached until the next batch completes it. Writes spanning several whole chunks
        # (only with 4 MiB chunks) bypass the cache: HDF5 writes a chunk larger than its cache
        # straight to the file, twice as fast as copying it through the cache.
        cached = per_batch < 4 * chunk_bytes and chunk_bytes <= self._cache_each
        # Uncompressed data that would go through the cache is written a chunk at a time by
        # ChunkAppender instead (its buffer takes the cache's place in the memory budget).
        direct = direct and cached and not (compress and self._filters)
        if cached and not direct:
            cache = chunk_bytes + 1
        else:
            cache = max(1, min(chunk_bytes // 2, CHUNK_BYTES_MIN))
        kwargs: dict[str, Any] = {"maxshape": maxshape, "chunks": (rows, *shape[1:]), "dtype": dtype,
                                  "rdcc_nbytes": cache, "rdcc_nslots": 521}
        if compress:
            kwargs.update(self._filters)
        ds = self.f.create_dataset(name, shape=shape, **kwargs)
        self._open[name] = ds
        if direct:
            self._direct[name] = ChunkAppender(ds, expected_rows or 0)
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
        f.attrs["streams"] = ",".join(self.streams)
        for key, value in self._attrs.items():  # e.g. a sharded capture's unit identity
            f.attrs[key] = value
        for name, doc in (
            (S.META_MODEL, model_info),
            (S.META_SETTINGS, settings),
            (S.META_HOOKS, [h.to_dict() for h in self.hooks]),
        ):
            raw = S.dumps(doc).encode("utf-8")
            # A fixed-length UTF-8 string: h5dump prints it as text.
            f.create_dataset(name, data=np.array(raw, dtype=h5py.string_dtype("utf-8", len(raw))))
        for stream in self.streams:
            self._offsets(S.stream_offsets(stream), planned)
        for name in S.RAGGED_BYTES:
            self._ds(name, (0,), np.uint8, chunk_rows=64 << 10)
            self._offsets(S.offsets_name(name), planned)
        self._ds(S.N_INPUT, (0,), np.int64, chunk_rows=4096, expected_rows=planned)
        for stream in self.streams:
            n_tok = self._expected_tokens[stream]
            self._ds(S.ids_name(stream), (0,), np.int32, chunk_rows=16384, expected_rows=n_tok)
            self._ds(S.str_name(stream), (0,), np.uint8, chunk_rows=64 << 10, expected_rows=4 * n_tok)
            self._offsets(S.offsets_name(S.str_name(stream)), n_tok)
        for tf in self.token_fields:
            shape = (0, tf.width) if tf.width else (0,)
            self._ds(tf.path, shape, tf.dtype, chunk_rows=4096 if tf.width else 16384,
                     expected_rows=self._expected_tokens[tf.stream])
        acts = f.create_group(S.ACTS)
        f.create_group(S.ACTS_OFFSETS)
        for h in self.hooks:
            dtype = S.storage_numpy_dtype(self.storage_dtype, h.kind)
            if h.layout == "square":
                ds = self._ds(f"{S.ACTS}/{h.name}", (0,), dtype, compress=True, direct=True,
                              expected_rows=self._expected_elements.get(h.name))
                self._offsets(f"{S.ACTS_OFFSETS}/{h.name}", planned)
                self._elements[h.name] = 0
            else:
                ds = self._ds(f"{S.ACTS}/{h.name}", (0, *h.feature_shape), dtype, compress=True,
                              direct=True, expected_rows=self._expected_tokens[h.stream_of_rows()])
            ds.attrs["layout"] = h.layout
            ds.attrs["axes"] = ",".join(h.axes)
            ds.attrs["streams"] = ",".join(h.streams)
            ds.attrs["encoding"] = "bfloat16" if (self.storage_dtype == "bfloat16" and h.kind == "float") else ""
            if h.aliases:
                ds.attrs["aliases"] = ",".join(h.aliases)
        acts.attrs["storage_dtype"] = self.storage_dtype

    def _write_vocab(self, vocab: list[str], raw: list[bytes] | None, special: list[int] | None) -> None:
        """``vocab/str`` (each entry decoded on its own) and, when given, ``vocab/bytes`` (each
        entry's raw bytes) and ``vocab/special`` (the special tokens' ids)."""
        fields = [(S.VOCAB, [v.encode("utf-8", "surrogatepass") for v in vocab])]
        if raw is not None:
            fields.append((S.VOCAB_BYTES, raw))
        datasets: list[tuple[str, np.ndarray]] = []
        for name, encoded in fields:
            ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
            datasets += [(name, np.frombuffer(b"".join(encoded), np.uint8)),
                         (S.offsets_name(name), np.concatenate([[0], ends]).astype(np.int64))]
        if raw is not None:
            datasets.append((S.VOCAB_SPECIAL, np.asarray(sorted(special or ()), np.int32)))
        # Uncompressed and resizable like the other datasets: Debian's h5dump fails on files with
        # gzip-compressed datasets written by this h5py (checked in tests/test_capture.py).
        for name, data in datasets:
            self.f.create_dataset(name, data=data, maxshape=(None,), chunks=(max(1, min(len(data), 1 << 16)),))

    # --- appending ----------------------------------------------------------------------------

    def _put(self, name: str, start: int, values: np.ndarray) -> h5py.Dataset:
        """Write ``values`` at row ``start`` and make the dataset end there (an activation
        dataset written by a :class:`ChunkAppender` may extend further: see
        :meth:`ChunkAppender.reserve`). Every start is derived from what is committed (plus,
        for activations, the rows written for batches awaiting their commit)."""
        ds = self._open[name]
        appender = self._direct.get(name)
        if appender is None:
            ds.resize(start + len(values), axis=0)
            if len(values):
                ds[start:] = values
        else:
            appender.reserve(start + len(values))
            if len(values):
                appender.write(start, values)
        self.bytes_written += values.nbytes
        return ds

    def _flush(self, name: str) -> None:
        """Make everything written to dataset ``name`` reach the file."""
        appender = self._direct.get(name)
        if appender is not None:
            appender.flush()
        self._open[name].flush()

    def _put_offsets(self, name: str, committed_entries: int, ends: list[int]) -> h5py.Dataset:
        return self._put(name, committed_entries, np.asarray(ends, dtype=np.int64))

    def _act_start(self, h: S.HookSpec) -> int:
        return self._elements[h.name] if h.layout == "square" else self.n_tokens[h.stream_of_rows()]

    def _sync_now_and_then(self) -> None:
        """Every :data:`WRITEBACK_EVERY` bytes, ask the kernel to start writing the file's dirty
        pages to disk, without waiting: the disk works while the model computes, and the final
        fsync finds little left to do. (A blocking fdatasync here stalled the writer, which
        stalled the forward pass behind it.)"""
        if self.bytes_written - self._unsynced >= WRITEBACK_EVERY:
            self._unsynced = self.bytes_written
            try:
                start_writeback(self.f.id.get_vfd_handle())
            except (OSError, ValueError, TypeError):
                pass  # no plain file descriptor: the final fsync still makes everything durable

    def write_act(self, name: str, values: np.ndarray) -> None:
        """Write one hook's values for the next batch (data only; committed by :meth:`commit`).
        Lets the capture hand over each hook as soon as it fires. Values of several batches in a
        row may be written before one commit covers them all (see :meth:`BatchRecord.merge`)."""
        self._put(f"{S.ACTS}/{name}", self._act_start(self._hook[name]) + self._pending[name], values)
        self._pending[name] += len(values)

    def append(self, batch: BatchRecord) -> None:
        """Write one batch and commit it (see the module docstring for the order)."""
        for name, values in batch.acts.items():
            self.write_act(name, values)
        self.commit(batch)

    def commit(self, batch: BatchRecord) -> None:
        """Write the batch's tokens and per-token fields, then flush, then commit: its
        activations must already be written (by :meth:`write_act` or :meth:`append`)."""
        committed = {h.name: sum(batch.square_sizes[h.name]) if h.layout == "square"
                     else sum(len(t) for t in batch.tokens[h.stream_of_rows()]) for h in self.hooks}
        short = [n for n, rows in committed.items() if rows > self._pending[n]]
        if short:
            raise RuntimeError(f"committing a batch whose activations were not all written: {short}")
        data_sets: list[h5py.Dataset] = []
        # 1. data
        ragged_ends: dict[str, list[int]] = {}
        for name, items in ((S.PROMPT_TEXT, batch.texts), (S.PROMPT_ID, batch.prompt_ids),
                            (S.PROMPT_META, batch.metas)):
            encoded = [s.encode("utf-8") for s in items]
            ragged_ends[name] = _ends(self._ragged_bytes[name], [len(e) for e in encoded])
            data_sets.append(self._put(name, self._ragged_bytes[name],
                                       np.frombuffer(b"".join(encoded), np.uint8)))
        data_sets.append(self._put(S.N_INPUT, self.n_prompts, np.asarray(batch.n_input, dtype=np.int64)))
        str_ends: dict[str, list[int]] = {}
        for stream in self.streams:
            data_sets.append(self._put(S.ids_name(stream), self.n_tokens[stream],
                                       np.concatenate(batch.tokens[stream]).astype(np.int32)))
            pieces = [t.encode("utf-8", errors="surrogatepass")
                      for toks in batch.str_tokens[stream] for t in toks]
            str_ends[stream] = _ends(self._str_bytes[stream], [len(p) for p in pieces])
            data_sets.append(self._put(S.str_name(stream), self._str_bytes[stream],
                                       np.frombuffer(b"".join(pieces), np.uint8)))
        for tf in self.token_fields:
            data_sets.append(self._put(tf.path, self.n_tokens[tf.stream], batch.fields[tf.path]))
        for ds in data_sets:
            ds.flush()
        for h in self.hooks:
            self._flush(f"{S.ACTS}/{h.name}")
        # 2. per-field offsets
        per_prompt = self.n_prompts + 1  # committed entries of every per-prompt offsets dataset
        offset_sets = []
        for name, ends in ragged_ends.items():
            offset_sets.append(self._put_offsets(S.offsets_name(name), per_prompt, ends))
        token_ends: dict[str, list[int]] = {}
        for stream in self.streams:
            offset_sets.append(self._put_offsets(S.offsets_name(S.str_name(stream)),
                                                 self.n_tokens[stream] + 1, str_ends[stream]))
            token_ends[stream] = _ends(self.n_tokens[stream], [len(t) for t in batch.tokens[stream]])
            if stream != S.MAIN:
                offset_sets.append(self._put_offsets(S.stream_offsets(stream), per_prompt,
                                                     token_ends[stream]))
        square_ends = {h.name: _ends(self._elements[h.name], batch.square_sizes[h.name])
                       for h in self.hooks if h.layout == "square"}
        for name, ends in square_ends.items():
            offset_sets.append(self._put_offsets(f"{S.ACTS_OFFSETS}/{name}", per_prompt, ends))
        for ds in offset_sets:
            ds.flush()
        # 3. the commit marker; then the cursors move past the committed batch
        self._put_offsets(S.TOKEN_OFFSETS, per_prompt, token_ends[S.MAIN]).flush()
        self._sync_now_and_then()
        for name, ends in ragged_ends.items():
            self._ragged_bytes[name] = ends[-1]
        for stream in self.streams:
            self.n_tokens[stream] = token_ends[stream][-1]
            if str_ends[stream]:
                self._str_bytes[stream] = str_ends[stream][-1]
        for name, ends in square_ends.items():
            self._elements[name] = ends[-1]
        for name, rows in committed.items():
            self._pending[name] -= rows
        self.n_prompts += len(batch.texts)

    # --- resume ------------------------------------------------------------------------------

    def copy_committed(self, old: h5py.File, n_prompts: int, step_bytes: int = 64 << 20) -> None:
        """Copy the first ``n_prompts`` committed prompts of ``old`` (a run opened read-only) into
        this (empty) file, committing them with the same ordering rules as :meth:`commit`."""
        if n_prompts == 0:
            return
        tokens = {s: int(old[S.stream_offsets(s)][n_prompts]) for s in self.streams}
        plan: list[tuple[str, int]] = []  # (data dataset, rows to copy)
        offsets_plan: list[tuple[str, int]] = []  # (offsets dataset, entries to copy)
        for name in S.RAGGED_BYTES:
            plan.append((name, int(old[S.offsets_name(name)][n_prompts])))
            offsets_plan.append((S.offsets_name(name), n_prompts + 1))
        plan.append((S.N_INPUT, n_prompts))
        for stream in self.streams:
            str_offsets = S.offsets_name(S.str_name(stream))
            plan.append((S.ids_name(stream), tokens[stream]))
            plan.append((S.str_name(stream), int(old[str_offsets][tokens[stream]])))
            offsets_plan.append((str_offsets, tokens[stream] + 1))
            if stream != S.MAIN:
                offsets_plan.append((S.stream_offsets(stream), n_prompts + 1))
        plan += [(tf.path, tokens[tf.stream]) for tf in self.token_fields]
        for h in self.hooks:
            if h.layout == "square":
                ends = int(old[f"{S.ACTS_OFFSETS}/{h.name}"][n_prompts])
                plan.append((f"{S.ACTS}/{h.name}", ends))
                offsets_plan.append((f"{S.ACTS_OFFSETS}/{h.name}", n_prompts + 1))
                self._elements[h.name] = ends
            else:
                plan.append((f"{S.ACTS}/{h.name}", tokens[h.stream_of_rows()]))
        for name, rows in plan:
            src = old[name]
            row_bytes = max(1, src.dtype.itemsize * int(np.prod(src.shape[1:], dtype=np.int64)))
            step = max(1, step_bytes // row_bytes)
            for start in range(0, rows, step):
                self._put(name, start, src[start : min(rows, start + step)])
            self._flush(name)
        for name, entries in offsets_plan:
            self._put(name, 1, old[name][1:entries]).flush()  # offsets[0] = 0 is already there
        self._put(S.TOKEN_OFFSETS, 1, old[S.TOKEN_OFFSETS][1 : n_prompts + 1]).flush()
        for name in S.RAGGED_BYTES:
            self._ragged_bytes[name] = int(old[S.offsets_name(name)][n_prompts])
        for stream in self.streams:
            self._str_bytes[stream] = int(old[S.offsets_name(S.str_name(stream))][tokens[stream]])
        self.n_tokens = tokens
        self.n_prompts = n_prompts

    def move_to(self, path: Path) -> None:
        """Rename the (open) file atomically, e.g. a resumed copy over the killed original."""
        os.replace(self.path, path)
        self.path = path

    # --- closing -----------------------------------------------------------------------------

    def _trim(self) -> None:
        """End every activation dataset at its committed rows (they may have been reserved past
        them). Best effort: if the file can no longer be written (a full disk), the extra rows
        stay, and readers, which go by the offsets, never see them."""
        for h in self.hooks:
            name = f"{S.ACTS}/{h.name}"
            if name in self._direct:
                try:
                    self._open[name].resize(self._act_start(h), axis=0)
                except (OSError, RuntimeError, ValueError):
                    return

    def close(self) -> None:
        """Close the file and make its bytes durable (a clean close clears the SWMR flags)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._trim()
        finally:
            self.f.close()
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())
