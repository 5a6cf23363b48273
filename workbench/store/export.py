"""Exporting a run's per-token hooks to files other tools read: :func:`export` (``workbench
export``). Every format is written a batch at a time, so memory stays flat however large the run
(peak RSS measured in tests/test_export.py), into a hidden partial file or folder beside the
output that is renamed into place only when complete (``force`` replaces an existing output, and
only then).

``arrow``: a Hugging Face ``datasets`` folder (``datasets.load_from_disk``) in exactly the layout
SAELens' ``CacheActivationsRunner`` writes and its ``ActivationsStore`` reads as cached
activations (``cached_activations_path``): one ``Array2D(shape=(context, d_in))`` column per hook,
named by the hook, and ``token_ids``, ``Sequence(Value("int32"), length=context)``; files
``data-NNNNN-of-NNNNN.arrow`` (at most ~500 MB each, as ``save_to_disk`` cuts them),
``dataset_info.json`` and ``state.json``. A row is ``context`` tokens. SAELens trains on full
rows and has no mask, so rows are never padded:

- ``rows="pack"`` (default): the run's tokens, in capture order, are cut into rows of
  ``context`` tokens, across prompt boundaries; the last, partial row is left out. Each token's
  activation is still the one its own prompt's forward pass produced, so a row may join the end
  of one prompt to the start of the next (as SAELens' own packed contexts join documents, but
  without attention across them). Nothing else is lost: SAELens flattens rows into tokens.
- ``rows="prompt"``: one row per prompt of at least ``context`` tokens, its first ``context``
  tokens; shorter prompts are skipped (counted in the result). For analyses where a row must be
  one prompt from its start.

A hook of several feature axes (``hook_z``: ``(head, d_head)``) is flattened in C order to
``d_in = heads * d_head``, as SAELens flattens ``hook_z``. ``workbench_export.json`` beside the
data records the run, the hooks' stored names and shapes, and the prompts of ``rows="prompt"``.

``npy``: a folder of ``HOOK.npy`` ``(tokens, *feature)`` per hook, ``token_ids.npy`` ``(tokens,)``
int32, ``offsets.npy`` ``(prompts + 1,)`` int64 (prompt ``i`` is tokens ``offsets[i]`` to
``offsets[i+1] - 1``) and ``workbench_export.json``; every token of the run, no rows. The
``.npy`` files are written as a header then sequential writes rather than through
``numpy.lib.format.open_memmap``: pages written through a shared mapping count in the process's
resident memory until the kernel writes them back, so a memory map grows RSS with the output;
plain writes keep it flat. Read them with ``numpy.load(path, mmap_mode="r")``.

``safetensors``: one file with the same tensors (each hook by name, ``token_ids``, ``offsets``) and
the run's description as ``__metadata__``, for ``safetensors.safe_open`` (numpy or torch). The
safetensors library's ``save_file`` needs every tensor in memory at once, so the file is written
here by hand, streamed: an 8-byte little-endian header length, the JSON header (tensor dtypes,
shapes and byte ranges, known before any data is read), then each tensor's raw little-endian bytes
in header order.

Values are exactly those :meth:`Run.activation` returns: float32 for float32 runs, float16 for
float16 runs, and float32 for bfloat16 runs (the stored bfloat16 widened, which is exact; neither
numpy nor ``datasets``' ``Array2D`` has a bfloat16 type, so one rule serves every format). Attention
patterns (stored per prompt, ``(head, q, k)``) have no token rows: use :meth:`Run.to_xarray`.

``datasets``/``pyarrow`` are imported lazily (extra ``export``); nothing here imports torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from workbench.errors import UserError
from workbench.store.labelled import select_hooks

FORMATS = ("arrow", "npy", "safetensors")
ROWS = ("pack", "prompt")
DEFAULT_CONTEXT = 128  # SAELens' default context_size
BATCH_BYTES = 64 << 20  # values read and written at a time, all hooks together
SHARD_BYTES = 500 * 10**6  # datasets' save_to_disk default max_shard_size ("500MB")
META_FILE = "workbench_export.json"
INSTALL = "pip install 'workbench[export]'"
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64",
                      "int32": "I32"}


@dataclass
class ExportResult:
    path: Path
    format: str
    columns: dict[str, str]
    """Column (or tensor, or file) name -> the hook's stored name."""
    tokens: int
    """Tokens exported (``rows * context`` for arrow)."""
    rows: int = 0
    context: int = 0
    dropped_tokens: int = 0
    """``rows="pack"``: the last, partial row's tokens; ``rows="prompt"``: tokens of skipped
    prompts and past each row."""
    skipped_prompts: int = 0
    bytes: int = 0
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


def _columns(run: Any, hooks: list[str] | tuple[str, ...]) -> dict[str, Any]:
    names, _ = select_hooks(run, list(hooks))
    out: dict[str, Any] = {}
    for name in names:
        spec = run.resolve(name)
        if spec.layout == "square":
            raise UserError(f"{name} is stored per prompt as (head, query, key), not per token: it "
                            "has no token rows to export (Run.to_xarray gives it labelled)")
        if any(out[c].name == spec.name for c in out):
            continue  # an alias of a hook already chosen
        out[name] = spec
    streams = {spec.stream_of_rows() for spec in out.values()}
    if len(streams) > 1:
        raise UserError(f"the hooks chosen belong to different token streams ({', '.join(sorted(streams))}); "
                        "export each stream's hooks separately")
    return out


def _value_dtype(run: Any, spec: Any) -> np.dtype:
    if spec.kind != "float":
        return np.dtype(np.int64)
    return np.dtype(np.float16 if run.storage_dtype == "float16" else np.float32)


def _check_out(run: Any, out: Path, force: bool) -> None:
    if out.resolve() == Path(run.path).resolve() or out.resolve() == Path(run.final_path).resolve():
        raise UserError(f"{out} is the run itself; export to another path")
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out} exists; use --force to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder")


def _sync(tmp: Path) -> None:
    """Make the written files durable before they take the output's name (which may replace an
    earlier export)."""
    for path in ([p for p in tmp.iterdir() if p.is_file()] if tmp.is_dir() else [tmp]):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _replace(tmp: Path, out: Path) -> None:
    """Move the complete ``tmp`` to ``out``; an existing ``out`` goes only once ``tmp`` is there."""
    _sync(tmp)
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def export(run: Any, hooks: list[str] | tuple[str, ...] | str, out: str | os.PathLike[str], *,
           format: str = "arrow", context: int | None = None, rows: str = "pack",
           force: bool = False, batch_bytes: int = BATCH_BYTES,
           progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write the per-token ``hooks`` of ``run`` (an open :class:`~workbench.store.reader.Run`;
    names, aliases or globs) to ``out`` in ``format`` (module docstring). ``context`` and
    ``rows`` shape arrow's rows (default 128, ``pack``); ``progress(done, total)`` is called with
    tokens after each batch. Raises :class:`UserError` for a bad hook, format or output."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if rows not in ROWS:
        raise UserError(f"unknown row layout {rows!r}; choose one of {', '.join(ROWS)}")
    if format != "arrow" and (context is not None or rows != "pack"):
        raise UserError("--context and --rows shape arrow rows; npy and safetensors export every token")
    if context is not None and context < 1:
        raise UserError("--context must be at least 1 token")
    if isinstance(hooks, str):
        hooks = [hooks]
    columns = _columns(run, hooks)
    out = Path(out).expanduser()
    _check_out(run, out, force)
    if format == "arrow":
        _require("datasets", "pyarrow")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    t0 = time.monotonic()
    meta = {"run": str(run.final_path), "run_id": run.run_id, "model": run.model_name,
            "storage_dtype": run.storage_dtype, "format": format,
            "hooks": {c: {"stored": s.name, "feature_shape": list(s.feature_shape),
                          "axes": list(s.axes), "dtype": str(_value_dtype(run, s))}
                      for c, s in columns.items()}}
    try:
        if format == "arrow":
            result = _ArrowExport(run, columns, tmp, context or DEFAULT_CONTEXT, rows, batch_bytes,
                                  progress, meta).write()
        else:
            result = _flat_export(run, columns, tmp, format, batch_bytes, progress, meta)
        _replace(tmp, out)
    except OSError as exc:
        _remove(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"the disk is full: {out} was not written (nothing else changed)") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot write {out}: {exc.strerror}") from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    result.path, result.seconds = out, time.monotonic() - t0
    return result


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"exporting to arrow needs {' and '.join(missing)} ({INSTALL})")


def _fingerprint(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


# --- arrow -------------------------------------------------------------------------------------

class _ArrowExport:
    def __init__(self, run: Any, columns: dict[str, Any], tmp: Path, context: int, rows: str,
                 batch_bytes: int, progress: Callable[[int, int], None] | None,
                 meta: dict[str, Any]) -> None:
        self.run, self.columns, self.tmp, self.context = run, columns, tmp, context
        self.mode, self.progress, self.meta = rows, progress, meta
        stream = next(iter(columns.values())).stream_of_rows()
        self.stream = stream
        self.offsets = run.token_offsets(stream)
        self.widths = {c: int(np.prod(s.feature_shape, dtype=np.int64)) for c, s in columns.items()}
        self.dtypes = {c: _value_dtype(run, s) for c, s in columns.items()}
        self.row_bytes = context * (4 + sum(self.widths[c] * self.dtypes[c].itemsize for c in columns))
        self.batch_rows = max(1, batch_bytes // self.row_bytes)
        total = int(self.offsets[-1])
        if rows == "pack":
            self.n_rows = total // context
            self.prompts: list[int] = []
            self.dropped = total - self.n_rows * context
            self.skipped = 0
        else:
            lengths = np.diff(self.offsets)
            self.prompts = [int(i) for i in np.flatnonzero(lengths >= context)]
            self.n_rows = len(self.prompts)
            self.dropped = total - self.n_rows * context
            self.skipped = len(lengths) - self.n_rows
        if self.n_rows == 0:
            why = (f"the run has {total:,} tokens, fewer than one row of {context}" if rows == "pack"
                   else f"no prompt has {context} tokens (the longest has "
                        f"{int(np.diff(self.offsets).max(initial=0))})")
            raise UserError(f"nothing to export: {why}; choose a smaller --context")

    def features(self) -> Any:
        from datasets import Array2D, Features, Sequence, Value

        feats: dict[str, Any] = {c: Array2D(shape=(self.context, self.widths[c]), dtype=str(self.dtypes[c]))
                                 for c in self.columns}
        feats["token_ids"] = Sequence(Value("int32"), length=self.context)
        return Features(feats)

    def batches(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(rows, columns)`` a batch at a time, in row order."""
        ctx = self.context
        for r0 in range(0, self.n_rows, self.batch_rows):
            r1 = min(self.n_rows, r0 + self.batch_rows)
            if self.mode == "pack":
                a, b = r0 * ctx, r1 * ctx
                batch = {c: self.run.token_rows(c, a, b).reshape(r1 - r0, ctx, self.widths[c])
                         for c in self.columns}
                batch["token_ids"] = self.run.token_ids_between(a, b, self.stream).reshape(r1 - r0, ctx)
            else:
                starts = [int(self.offsets[i]) for i in self.prompts[r0:r1]]
                batch = {c: np.stack([self.run.token_rows(c, s, s + ctx).reshape(ctx, self.widths[c])
                                      for s in starts]) for c in self.columns}
                batch["token_ids"] = np.stack([self.run.token_ids_between(s, s + ctx, self.stream)
                                               for s in starts])
            batch["token_ids"] = batch["token_ids"].astype(np.int32, copy=False)
            yield r1 - r0, batch

    def write(self) -> ExportResult:
        from datasets import DatasetInfo
        from datasets.arrow_writer import ArrowWriter

        features = self.features()
        rows_per_shard = max(1, SHARD_BYTES // self.row_bytes)
        n_shards = -(-self.n_rows // rows_per_shard)
        names = [f"data-{k:05d}-of-{n_shards:05d}.arrow" for k in range(n_shards)]
        self.tmp.mkdir()
        writer, shard, in_shard, done, nbytes = None, -1, 0, 0, 0
        try:
            for n, batch in self.batches():
                start = 0
                while start < n:  # a batch may straddle two shards
                    if writer is None or in_shard == rows_per_shard:
                        if writer is not None:
                            nbytes += writer.finalize()[1]
                            writer.close()
                        shard, in_shard = shard + 1, 0
                        writer = ArrowWriter(features=features, path=str(self.tmp / names[shard]))
                    take = min(n - start, rows_per_shard - in_shard)
                    writer.write_batch({k: v[start : start + take] for k, v in batch.items()})
                    start, in_shard = start + take, in_shard + take
                done += n
                if self.progress is not None:
                    self.progress(done * self.context, self.n_rows * self.context)
            assert writer is not None
            nbytes += writer.finalize()[1]
        finally:
            if writer is not None:
                writer.close()
        meta = {**self.meta, "rows": self.mode, "context": self.context, "n_rows": self.n_rows,
                "dropped_tokens": self.dropped, "skipped_prompts": self.skipped,
                "row_prompts": self.prompts if self.mode == "prompt" else None,
                "row_tokens": "row r is the run's tokens r*context .. (r+1)*context - 1"
                              if self.mode == "pack" else "row r is prompt row_prompts[r]'s first context tokens"}
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": _fingerprint(meta),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        info = asdict(DatasetInfo(
            description=f"workbench export of {self.meta['run']} ({self.meta['model']}): "
                        f"{', '.join(self.columns)}; {self.mode} rows of {self.context} tokens",
            features=features))
        (self.tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (self.tmp / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
        (self.tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return ExportResult(self.tmp, "arrow", {c: s.name for c, s in self.columns.items()},
                            tokens=self.n_rows * self.context, rows=self.n_rows, context=self.context,
                            dropped_tokens=self.dropped, skipped_prompts=self.skipped, bytes=nbytes,
                            meta=meta)


# --- npy and safetensors -----------------------------------------------------------------------

def _tensors(run: Any, columns: dict[str, Any]) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """Every tensor of a flat export, in file order: each hook, then token ids and offsets."""
    stream = next(iter(columns.values())).stream_of_rows()
    total, n = int(run.token_offsets(stream)[-1]), len(run)
    out = [(c, _value_dtype(run, s), (total, *s.feature_shape)) for c, s in columns.items()]
    return out + [("token_ids", np.dtype(np.int32), (total,)), ("offsets", np.dtype(np.int64), (n + 1,))]


def _chunks(run: Any, name: str, columns: dict[str, Any], batch_bytes: int) -> Iterator[np.ndarray]:
    """Tensor ``name``'s values in order, a batch of tokens at a time, little-endian."""
    stream = next(iter(columns.values())).stream_of_rows()
    offsets = run.token_offsets(stream)
    if name == "offsets":
        yield offsets.astype("<i8")
        return
    total = int(offsets[-1])
    if name == "token_ids":
        step = max(1, batch_bytes // 4)
        for a in range(0, total, step):
            yield run.token_ids_between(a, min(total, a + step), stream).astype("<i4", copy=False)
        return
    spec = columns[name]
    dtype = _value_dtype(run, spec)
    step = max(1, batch_bytes // max(1, int(np.prod(spec.feature_shape, dtype=np.int64)) * dtype.itemsize))
    for a in range(0, total, step):
        yield run.token_rows(name, a, min(total, a + step)).astype(dtype.newbyteorder("<"), copy=False)


def _write_all(fh: BinaryIO, chunks: Iterator[np.ndarray], tick: Callable[[int], None]) -> int:
    n = 0
    for chunk in chunks:
        data = np.ascontiguousarray(chunk)
        fh.write(memoryview(data).cast("B"))
        n += data.nbytes
        tick(len(chunk))
    return n


def _flat_export(run: Any, columns: dict[str, Any], tmp: Path, fmt: str, batch_bytes: int,
                 progress: Callable[[int, int], None] | None, meta: dict[str, Any]) -> ExportResult:
    tensors = _tensors(run, columns)
    total = tensors[-2][2][0]
    work = total * len(columns)
    done = [0]

    def tick_for(name: str) -> Callable[[int], None]:
        def tick(n: int) -> None:
            if name in columns:
                done[0] += n
                if progress is not None:
                    progress(done[0], work)
        return tick

    meta = {**meta, "tokens": total, "prompts": len(run),
            "files" if fmt == "npy" else "tensors": [t[0] + (".npy" if fmt == "npy" else "") for t in tensors]}
    nbytes = 0
    if fmt == "npy":
        tmp.mkdir()
        for name, dtype, shape in tensors:
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(
                    dtype.newbyteorder("<")), "fortran_order": False, "shape": shape})
                nbytes += _write_all(fh, _chunks(run, name, columns, batch_bytes), tick_for(name))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    else:
        header: dict[str, Any] = {"__metadata__": {k: v if isinstance(v, str) else json.dumps(v)
                                                   for k, v in meta.items()}}
        pos = 0
        for name, dtype, shape in tensors:
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype)], "shape": list(shape),
                            "data_offsets": [pos, pos + size]}
            pos += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(tmp, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for name, _, _ in tensors:
                nbytes += _write_all(fh, _chunks(run, name, columns, batch_bytes), tick_for(name))
        if nbytes != pos:
            raise RuntimeError(f"wrote {nbytes} bytes of tensor data; the header says {pos}")
    return ExportResult(tmp, fmt, {c: s.name for c, s in columns.items()}, tokens=total,
                        bytes=nbytes, meta=meta)


def result_summary(result: ExportResult) -> dict[str, Any]:
    """A JSON-ready description of an export (``workbench export --json``)."""
    doc = asdict(result)
    doc["path"] = str(result.path)
    doc.pop("meta")
    return doc
