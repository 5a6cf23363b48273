"""Analysis results, stored beside a run and never inside it.

HDF5 locks a file that any process has open, and rewriting a run risks what it recorded, so every
result is its own small HDF5 file in the folder ``RUN.h5.results/`` next to ``RUN.h5``::

    RUN.h5.results/NAME--VERSION--KEY.h5

``KEY`` is the first 16 hex digits of the SHA-256 of ``{"analysis", "version", "params"}`` as
canonical JSON, so a request with the same name, version and parameters finds its result again.
A file is written under a hidden temporary name in the same folder, flushed to disk, and renamed
over the final name: readers see the old result or the new one, never half of one. This works
while a capture is still writing the run and while other processes (the UI) have it open.

Layout of one result file (``docs/analyses.md`` documents each analysis's ``data`` and arrays):

- ``/meta``: UTF-8 JSON: ``analysis``, ``version``, ``params``, ``key``, ``status`` (``ok`` or
  ``error``), ``error`` and ``traceback`` (for errors), ``plugin``, ``run_id``, ``run``,
  ``n_prompts`` (prompts committed when it ran), ``created``, ``seconds``, ``workbench``;
- ``/data``: UTF-8 JSON, the result's ``data``;
- ``/arrays/NAME``: one dataset per array.

This module imports numpy, and h5py when a result file is read or written; never torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError
from workbench.paths import fsync_dir
from workbench.store import guard
from workbench.store.files import disk_full, final_name
from workbench.version import __version__

if TYPE_CHECKING:
    from workbench.store.reader import Run

MARKER = "workbench analysis result"
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
FORMAT = 1
SUFFIX = ".results"


def results_dir(run: Run | Path) -> Path:
    """The folder holding a run's results: ``RUN.h5.results`` beside the finished run's name
    (also for a run still being written as ``RUN.h5.partial``)."""
    final = run.final_path if not isinstance(run, Path) else run
    final = final_name(final)
    return final.with_name(final.name + SUFFIX)


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def result_key(name: str, version: str, params: dict[str, Any]) -> str:
    doc = {"analysis": name, "version": version, "params": params}
    return hashlib.sha256(canonical(doc).encode()).hexdigest()[:16]


@dataclass
class Result:
    """What an analysis returns: JSON-able ``data`` and named numpy ``arrays`` (stored as HDF5
    datasets; in JSON output as nested lists)."""

    data: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _file_name(name: str, version: str, key: str) -> str:
    return f"{name}--{re.sub(r'[^A-Za-z0-9.+_-]', '_', version)}--{key}.h5"


@dataclass
class StoredResult:
    """A result file beside a run. ``data`` and ``meta`` are read when it is opened; the arrays
    when first asked for."""

    path: Path
    meta: dict[str, Any]
    data: dict[str, Any]
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def analysis(self) -> str:
        return str(self.meta["analysis"])

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.meta.get("params") or {})

    @property
    def ok(self) -> bool:
        return self.meta.get("status") == "ok"

    @property
    def error(self) -> str | None:
        return self.meta.get("error")

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            import h5py

            try:
                with h5py.File(self.path, "r") as f:
                    group = f.get("arrays")
                    self._arrays = {k: _array(group[k], self.path) for k in group} if group is not None else {}
            except (OSError, KeyError, ValueError, TypeError, AttributeError, OverflowError, RuntimeError) as exc:
                raise UserError(f"{self.path} is a damaged analysis result ({exc})") from None
        return self._arrays

    def computed_on(self, run: Run) -> bool:
        """Whether this result was computed on this run, not on an earlier one captured to the
        same path (the one place that decides it)."""
        return self.meta.get("run_id") == run.run_id

    def current(self, run: Run) -> bool:
        """Whether this result was computed on this run over all of its prompts committed now."""
        return self.computed_on(run) and self.meta.get("n_prompts") == len(run)

    def result(self) -> Result:
        return Result(data=self.data, arrays=self.arrays)

    def record(self, run: Run | None = None) -> dict[str, Any]:
        """A JSON-able summary of the file (no data)."""
        m = self.meta
        out = {k: m.get(k) for k in ("analysis", "version", "params", "key", "status", "error",
                                     "plugin", "n_prompts", "created", "seconds")}
        out["file"] = str(self.path)
        if run is not None:
            out["current"] = self.current(run)
        return out


def _array(ds: Any, path: Path) -> np.ndarray:
    """A stored array, refused if it claims more than gzip could have packed into the file (a
    damaged or hostile shape must not allocate terabytes)."""
    limit = guard.DEFLATE_MAX * path.stat().st_size + (1 << 20)
    if getattr(ds, "size", 0) * ds.dtype.itemsize > limit:
        raise ValueError(f"array {ds.name} claims {ds.shape} of {ds.dtype}")
    return ds[()]  # type: ignore[no-any-return]


def _read_json(f: Any, name: str) -> Any:
    raw = f[name][()]
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))


def load(path: Path) -> StoredResult:
    """Open one result file (meta and data; arrays lazily)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            if f.attrs.get("workbench") != MARKER:
                raise UserError(f"{path} is not a workbench analysis result")
            if int(f.attrs.get("format", 0)) > FORMAT:
                raise UserError(f"{path} uses result format {f.attrs.get('format')}; upgrade workbench")
            meta, data = _read_json(f, "meta"), _read_json(f, "data")
            if not (isinstance(meta, dict) and isinstance(data, dict) and isinstance(meta.get("params", {}), dict)
                    and all(isinstance(meta.get(k), str) for k in ("analysis", "version"))):
                raise ValueError("its meta or data is not what a result holds")
            return StoredResult(path=path, meta=meta, data=data)
    except FileNotFoundError:
        raise UserError(f"no such result: {path}") from None
    except (OSError, KeyError, ValueError, TypeError, AttributeError, OverflowError, RuntimeError) as exc:
        raise UserError(f"{path} is a damaged analysis result ({exc})") from None


def list_results(run: Run) -> list[StoredResult]:
    """Every result file beside ``run`` (finished, still being written, or interrupted), newest
    first. Damaged files are skipped; a result computed on an earlier run at the same path is
    listed too (``StoredResult.current`` tells)."""
    folder = results_dir(run)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob("*.h5"):
        if path.name.startswith("."):
            continue
        try:
            out.append(load(path))
        except UserError:
            continue
    def written(r: StoredResult) -> int:  # ``created`` has whole seconds; the file's time breaks ties
        try:
            return r.path.stat().st_mtime_ns
        except OSError:
            return 0

    out.sort(key=lambda r: (str(r.meta.get("created", "")), written(r), r.path.name), reverse=True)
    return out


def results(run: Run) -> list[StoredResult]:
    """The analysis results stored beside ``run``, newest first (:func:`list_results`)."""
    return list_results(run)


def result(run: Run, analysis: str, **params: Any) -> StoredResult:
    """The newest stored result of ``analysis`` computed on this run whose parameters include
    ``params`` (``.data``, ``.arrays``, ``.meta``). Raises :class:`UserError` when there is none."""
    for r in list_results(run):
        if r.analysis == analysis and r.computed_on(run) and all(
            r.params.get(k) == v for k, v in params.items()
        ):
            return r
    raise UserError(f"no stored result of {analysis!r}"
                    + (f" with {params}" if params else "") + f" for {run.final_path.name} "
                    f"(run 'workbench analyze {run.final_path.name} {analysis}')")


def find(run: Run, name: str, version: str, key: str) -> StoredResult | None:
    path = results_dir(run) / _file_name(name, version, key)
    if not path.exists():
        return None
    try:
        return load(path)
    except UserError:
        return None


def check_storable(result: Result) -> None:
    """Fail early (as the analysis's error) if a result cannot be stored."""
    if not isinstance(result, Result):
        raise TypeError(f"compute() must return a Result or a dict, not {type(result).__name__}")
    try:
        canonical(result.data)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"result data is not JSON-able ({exc})") from None
    for name, arr in result.arrays.items():
        if not re.match(r"^[A-Za-z0-9_.-]+$", name):
            raise ValueError(f"array name {name!r}: use letters, digits, '_', '-', '.'")
        a = np.asarray(arr)
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; use numbers or fixed-width strings")


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries of result writes whose process is gone (``.NAME.HOST-PID-XXXX.tmp``:
    a write killed by SIGKILL or a power cut leaves one; nothing ever reads it). Only this host's
    are judged (a pid means nothing across machines sharing a folder). Returns them."""
    gone = []
    for tmp in folder.glob(".*.tmp"):
        m = re.search(r"\.([^./]+)-(\d+)-[0-9a-f]+\.tmp$", tmp.name)
        if m is None or m.group(1) != _HOST or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def save(run: Run, name: str, version: str, params: dict[str, Any], key: str, result: Result, *,
         plugin: str = "", n_prompts: int, seconds: float, error: str | None = None,
         traceback_text: str | None = None) -> StoredResult:
    """Write the result of analysis ``name`` (``version``, registered by ``plugin``) atomically
    (temporary name, fsync, rename) and return it."""
    folder = results_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "analysis": name, "version": version, "params": params, "key": key,
        "status": "error" if error else "ok", "error": error, "traceback": traceback_text,
        "plugin": plugin, "run_id": run.run_id, "run": run.final_path.name,
        "n_prompts": n_prompts, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 6), "workbench": __version__,
    }
    final = folder / _file_name(name, version, key)
    sweep_temporaries(folder)
    tmp = folder / f".{final.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        import h5py

        with h5py.File(tmp, "w") as f:
            f.attrs["workbench"] = MARKER
            f.attrs["format"] = FORMAT
            for name, doc in (("meta", meta), ("data", result.data)):
                raw = json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")
                f.create_dataset(name, data=np.array(raw, dtype=h5py.string_dtype("utf-8", len(raw))))
            group = f.create_group("arrays")
            for name, arr in result.arrays.items():
                a = np.asarray(arr)
                group.create_dataset(name, data=a, **({"compression": "gzip", "shuffle": True}
                                                      if a.nbytes > (1 << 20) else {}))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if disk_full(exc):
            raise UserError(f"no space left on {folder}: the result of {meta['analysis']!r} was not stored "
                            "(nothing half-written; an earlier result is untouched)") from None
        raise
    return StoredResult(path=final, meta=meta, data=result.data,
                        _arrays={k: np.asarray(v) for k, v in result.arrays.items()})
