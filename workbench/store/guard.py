"""Damage checks for what a run file says about itself, so that a damaged or hostile file is one
clear error, never a crash, a hang or an absurd allocation.

HDF5 (``libver="latest"``) checksums its own metadata — superblock, object headers, B-trees — and
refuses a file whose checksums fail, but nothing checks that *our* structure agrees with itself:
offsets that decrease or point past their data, a hook's stated shape against its dataset, JSON
documents of the wrong kind. Those checks are here, written by hand because they are this
format's own invariants (``docs/store.md``, "Layout"); the reader applies them to every offsets
vector and every slice before it reads. Raw values are not checksummed (docs/store.md says what
that leaves undetected).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import UserError

MAX_FEATURE_DIM = 1 << 24
"""No hook has an axis longer than this (the largest vocabularies are ~2.6e5; d_mlp ~1e5)."""
MAX_ROW_ELEMENTS = 1 << 31
DEFLATE_MAX = 1100
"""More than deflate's best compression ratio (~1032:1): no stored dataset unpacks to more than
this many times the file's bytes."""
LARGE_READ = 64 << 20
READ_ERRORS = (OSError, ValueError, RuntimeError, OverflowError)
"""What h5py raises for a damaged file on a read (failed filter or checksum, a bad address, a
selection HDF5 refuses)."""


def damaged(path: Path | str, what: str) -> UserError:
    return UserError(f"{path} is a damaged workbench run ({what})")


def json_doc(path: Path | str, name: str, raw: Any, kind: type) -> Any:
    """Parse the JSON document ``name`` (bytes) and require it to be a ``kind`` (dict or list)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | np.bytes_) else str(raw)
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise damaged(path, f"{name} is not JSON: {exc}") from None
    if not isinstance(doc, kind):
        raise damaged(path, f"{name} is a JSON {type(doc).__name__}, not a {kind.__name__}")
    return doc


def text(path: Path | str, name: str, raw: bytes) -> str:
    """Stored UTF-8 (lone surrogates kept, as they were written) as text."""
    try:
        return raw.decode("utf-8", errors="surrogatepass")
    except UnicodeDecodeError as exc:
        raise damaged(path, f"{name} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


MODEL_FIELDS = {"name": str, "family": str, "architecture": str, "n_layers": int, "n_heads": int,
                "d_model": int, "d_vocab": int}
"""What every run's ``meta/model`` holds, and readers rely on."""


def check_model_info(path: Path | str, doc: dict[str, Any]) -> dict[str, Any]:
    for key, kind in MODEL_FIELDS.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise damaged(path, f"meta/model's {key!r} is {doc.get(key)!r}, not a {kind.__name__}")
    return doc


def check_spec(path: Path | str, spec: Any) -> None:
    """A stored hook's description is one this format can hold."""
    if spec.layout not in ("token", "square"):
        raise damaged(path, f"hook {spec.name}: unknown layout {spec.layout!r}")
    if spec.layout == "square" and len(spec.feature_shape) != 1:
        raise damaged(path, f"hook {spec.name}: a square layout has one feature axis, "
                            f"not {list(spec.feature_shape)}")
    if any(not 1 <= d <= MAX_FEATURE_DIM for d in spec.feature_shape) or \
            math.prod(spec.feature_shape) > MAX_ROW_ELEMENTS:
        raise damaged(path, f"hook {spec.name}: implausible shape {list(spec.feature_shape)}")


def check_hook_dataset(path: Path | str, spec: Any, ds: Any) -> None:
    """The dataset of hook ``spec`` has the shape and kind of values the spec says."""
    want = 1 if spec.layout == "square" else 1 + len(spec.feature_shape)
    if len(ds.shape) != want or (spec.layout != "square" and tuple(ds.shape[1:]) != spec.feature_shape):
        raise damaged(path, f"acts/{spec.name} has shape {tuple(ds.shape)}, which its hook "
                            f"description ({spec.layout}, {list(spec.feature_shape)}) contradicts")
    enc = ds.attrs.get("encoding", "")
    kinds = "iu" if spec.kind == "int" else ("u" if isinstance(enc, str) and enc == "bfloat16" else "f")
    if ds.dtype.kind not in kinds:
        raise damaged(path, f"acts/{spec.name} holds {ds.dtype}, not the {spec.kind} values its hook stores")


def check_dtype(path: Path | str, name: str, ds: Any) -> None:
    """The format's own datasets hold what the writer writes: offsets and token ids as integers
    of 8 and 4 bytes or more, text and token strings as bytes, losses and probabilities as
    floats."""
    kind, size = ds.dtype.kind, ds.dtype.itemsize
    if name.endswith("offsets") or name.startswith("acts_offsets/"):
        ok = kind in "iu" and size >= 8
    elif name.endswith(("/ids", "topk_ids", "/special")):
        ok = kind in "iu" and size >= 4
    elif name in ("prompts/text", "prompts/id", "prompts/meta") or name.endswith("/str") or name.startswith("vocab/"):
        ok = kind == "u" and size == 1
    elif name.endswith(("/loss", "/topk_logprobs", "_prob", "_entropy")):
        ok = kind == "f"
    else:
        return
    if not ok:
        raise damaged(path, f"{name} holds {ds.dtype}, which the format never writes there")


def offsets(path: Path | str, name: str, values: Any, count: int, limit: int) -> np.ndarray:
    """An offsets vector read from the file: ``count`` integers from 0 (or more), never
    decreasing, the last no more than ``limit`` (the length of the data they index)."""
    a = np.asarray(values)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise damaged(path, f"{name} holds {a.dtype} of {a.ndim} dimensions, not integer offsets")
    if len(a) < count:
        raise damaged(path, f"{name} has {len(a)} entries; {count} are committed")
    a = a[:count].astype(np.int64)
    if count and (a[0] < 0 or a[-1] > limit or (count > 1 and bool(np.any(np.diff(a) < 0)))):
        raise damaged(path, f"{name} does not rise from 0 to at most {limit:,}")
    return a


def bounds(path: Path | str, name: str, ds: Any, start: int, end: int,
           file_bytes: Callable[[], int] | None = None) -> None:
    """``start:end`` lies within the first axis of ``ds``, and reading it would not allocate more
    than the file's bytes could hold at deflate's best ratio (~1032:1): a dataset that claims
    terabytes it does not have (chunks never written read as zeros) is damage, not a request to
    allocate them. ``file_bytes`` tells the file's size (asked only for reads over 64 MB)."""
    if not 0 <= start <= end <= ds.shape[0]:
        raise damaged(path, f"{name}: rows {start:,}..{end:,} lie outside its {ds.shape[0]:,} rows")
    nbytes = (end - start) * math.prod(int(d) for d in ds.shape[1:]) * ds.dtype.itemsize
    if nbytes > LARGE_READ and file_bytes is not None and nbytes > DEFLATE_MAX * file_bytes() + LARGE_READ:
        raise damaged(path, f"{name}: rows {start:,}..{end:,} would be {nbytes:,} bytes, more than "
                            "the file could hold")


def read(path: Path | str, name: str, ds: Any, start: int, end: int,
         file_bytes: Callable[[], int] | None = None) -> np.ndarray:
    """``ds[start:end]`` after :func:`bounds`; HDF5's read errors (a failed filter, a bad chunk
    address) become one damage line."""
    bounds(path, name, ds, start, end, file_bytes)
    try:
        return ds[start:end]  # type: ignore[no-any-return]
    except READ_ERRORS as exc:
        raise damaged(path, f"{name}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


def dataset(path: Path | str, f: Any, name: str) -> Any:
    """``f[name]``, where a missing part is damage, not a KeyError."""
    try:
        obj = f[name]
    except KeyError as exc:
        what = "is missing" if "doesn't exist" in str(exc) else str(exc).strip("'\"").splitlines()[0]
        raise damaged(path, f"{name} {what}") from None
    except READ_ERRORS as exc:
        raise damaged(path, f"{name}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if not (hasattr(obj, "shape") and hasattr(obj, "dtype")):
        raise damaged(path, f"{name} is a {type(obj).__name__}, not a dataset")
    return obj
