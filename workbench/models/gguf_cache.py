"""GGUF loading through a converted-weights cache.

Converting a GGUF takes 22-54 s on two cores (SmolLM2, Gemma 3), so the first load saves the
converted model (float32 safetensors + config + tokenizer) under
``<cache>/converted/<stem>-<sha256[:16]>/`` and later loads read that in about a second.

Safety:
- An entry is written in a temporary folder beside its final place and renamed into place only when
  complete (a rename is atomic), so a crash never leaves a half-written entry under the final name.
- ``manifest.json`` records every file's size and SHA-256. A load checks the sizes first and the
  checksums in a thread while the model loads; any mismatch (truncation, bit rot, a missing file)
  discards the entry and converts again. A damaged entry is never used.
- The converting process holds an exclusive flock on its temporary folder; the kernel releases it
  when the process dies, even by SIGKILL. Before converting, ``sweep_stale`` removes the temporary
  folders nobody holds any more (and discarded entries), so killed conversions do not pile up.
- Two processes may convert the same model at once: the first rename wins; the loser checks the
  winner's entry (sizes and checksums) and drops its own copy, or replaces a damaged one.

Speed: transformers parses the GGUF's header three times (tokenizer, config, weights) and the
quantisation label needs it once more. gguf-py parses a header field by field in Python, which for
Gemma 3's 262,144-token vocabulary took about 20 s each time on two cores, against 8-10 s for
de-quantising every tensor. Within a conversion, :func:`_one_reader_per_file` lets all four share
one parsed reader (it is only read: its fields and memory-mapped tensors).
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.paths import cache_dir, fsync_dir, sha256_file

# Bump when the layout of an entry changes: old entries are then simply not found.
CACHE_FORMAT = 1
MANIFEST = "manifest.json"


@dataclass
class ConvertedModel:
    hf_model: Any
    tokenizer: Any
    entry: Path
    quantization: str | None
    from_cache: bool


class DamagedEntry(Exception):
    pass


def converted_root() -> Path:
    return cache_dir() / "converted"


def entry_path(stem: str, sha256: str) -> Path:
    return converted_root() / f"{stem}-{sha256[:16]}"


def is_cached(stem: str, sha256: str) -> bool:
    return (entry_path(stem, sha256) / MANIFEST).is_file()


def gguf_quantization(gguf_path: Path) -> str:
    """The quantisation of a GGUF file, e.g. ``GGUF Q4_1 (210 Q4_1, 61 F32, 1 Q8_0 tensors)``."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    file_type = None
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            file_type = gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            file_type = None
    if file_type is None:
        file_type = counts.most_common(1)[0][0] if counts else "unknown"
    detail = ", ".join(f"{n} {t}" for t, n in counts.most_common())
    return f"GGUF {file_type} ({detail} tensors)"


def load_converted(
    *,
    stem: str,
    sha256: str,
    materialize: Callable[[], Path],
    label: str,
    architecture: str | None = None,
    progress: bool = True,
) -> ConvertedModel:
    """Load the converted model for the GGUF with this ``sha256``, converting it first if the
    cache has no sound entry. ``materialize()`` returns the GGUF's path (it may assemble the file)
    and is only called when a conversion is needed. ``architecture`` fills in
    ``config.architectures`` when the GGUF does not say (Gemma 3)."""
    entry = entry_path(stem, sha256)
    if (entry / MANIFEST).exists() or entry.exists():
        try:
            hf_model, tokenizer, manifest = _load_entry(entry)
            return ConvertedModel(hf_model, tokenizer, entry, manifest.get("quantization"), True)
        except DamagedEntry as exc:
            print(
                f"workbench: warning: converted-weights cache entry {entry} is damaged ({exc}); "
                "converting again",
                file=sys.stderr,
            )
            _discard(entry)
    gguf_path = materialize()
    if progress:
        print(
            f"workbench: converting {label} from GGUF to float32 (first load only; "
            f"cached in {entry.parent})",
            file=sys.stderr,
        )
    with _one_reader_per_file():
        hf_model, tokenizer, quantization = _convert(gguf_path, architecture, progress)
    _save_entry(entry, hf_model, tokenizer, sha256=sha256, quantization=quantization, label=label)
    return ConvertedModel(hf_model, tokenizer, entry, quantization, False)


@contextmanager
def _one_reader_per_file() -> Iterator[None]:
    """While inside, ``gguf.GGUFReader(path)`` (which transformers imports from ``gguf`` when it
    loads a GGUF) returns one reader per file and mode, parsed once (see the module's docstring)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert(gguf_path: Path, architecture: str | None, progress: bool) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    start = time.monotonic()
    folder, name = str(gguf_path.parent), gguf_path.name
    if progress:
        hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, attn_implementation="eager", dtype=torch.float32
        )
    finally:
        hf_logging.disable_progress_bar()
    hf_model.eval()
    if architecture and not hf_model.config.architectures:
        hf_model.config.architectures = [architecture]
    quantization = gguf_quantization(gguf_path)
    if progress:
        print(f"workbench: converted in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return hf_model, tokenizer, quantization


def _save_entry(
    entry: Path, hf_model: Any, tokenizer: Any, *, sha256: str, quantization: str, label: str
) -> None:
    import transformers
    from safetensors.torch import save_model

    entry.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale()
    tmp, lock = _staging_folder(entry)
    try:
        # save_model drops the tied copy of shared tensors (SmolLM2, Gemma tie their embeddings);
        # from_pretrained ties them again from the config.
        save_model(hf_model, str(tmp / "model.safetensors"))
        config = copy.deepcopy(hf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved weights are plain float32
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        files = {}
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())
        manifest = {
            "format": CACHE_FORMAT,
            "label": label,
            "source_sha256": sha256,
            "quantization": quantization,
            "transformers": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        fsync_dir(tmp)
        _publish(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _publish(tmp: Path, entry: Path) -> None:
    """Rename the finished ``tmp`` to ``entry``. If another process converting the same model got
    there first (the rename fails: ``entry`` exists and is not empty), its entry is verified, sizes
    and checksums, and used when sound (this process's identical copy is dropped); a damaged one
    is discarded and replaced by this copy."""
    for _attempt in range(3):
        try:
            os.rename(tmp, entry)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        else:
            fsync_dir(entry.parent)
            return
        try:
            problem = _verify_checksums(entry, _read_manifest(entry))
        except (DamagedEntry, OSError) as exc:  # OSError: it vanished while being read
            problem = str(exc) or type(exc).__name__
        if problem is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _discard(entry)
    raise OSError(f"cannot rename {tmp} to {entry}: another entry keeps taking its place")


def _staging_folder(entry: Path) -> tuple[Path, int]:
    """A new temporary folder beside ``entry`` and a descriptor holding an exclusive flock on it,
    which tells ``sweep_stale`` that its owner is alive."""
    while True:
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: sweep_stale then never takes this folder
        if tmp.is_dir():
            return tmp, fd
        os.close(fd)  # a sweep took it in the instant before the lock: take another name


def sweep_stale() -> int:
    """Remove what interrupted conversions left under ``converted/``: temporary folders
    (``.NAME.tmp-PID-XXXX``) whose flock no process holds (their converter died: SIGKILL, the
    OOM killer, a power cut) and discarded entries (``.NAME.trash-…``), which nobody reads. A
    temporary folder that is locked, or that cannot be locked (a file system without flock), is
    left alone. Called before every conversion; returns how many folders were removed."""
    try:
        folders = list(converted_root().iterdir())
    except OSError:
        return 0
    removed = 0
    for folder in folders:
        name = folder.name
        if not name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        if ".trash-" in name:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        elif ".tmp-" in name and _remove_if_abandoned(folder):
            removed += 1
    return removed


def _remove_if_abandoned(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # its converter is alive (or locks are not supported here)
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _read_manifest(entry: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        raise DamagedEntry("manifest.json is missing") from None
    except (OSError, ValueError) as exc:
        raise DamagedEntry(f"manifest.json is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise DamagedEntry("manifest.json has an unknown format")
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise DamagedEntry("manifest.json lists no weights")
    for name, meta in files.items():
        path = entry / name
        if not path.is_file():
            raise DamagedEntry(f"{name} is missing")
        if path.stat().st_size != meta.get("size"):
            raise DamagedEntry(f"{name} has {path.stat().st_size} bytes, expected {meta.get('size')}")
    return manifest


def _verify_checksums(entry: Path, manifest: dict[str, Any]) -> str | None:
    for name, meta in manifest["files"].items():
        if sha256_file(entry / name) != meta.get("sha256"):
            return f"{name} fails its checksum"
    return None


def _load_entry(entry: Path) -> tuple[Any, Any, dict[str, Any]]:
    manifest = _read_manifest(entry)  # sizes: catches truncation before anything reads the file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The checksum (0.3 s per 500 MB) runs beside the load; the loaded model is only returned if
    # it passes, so a damaged entry is never used.
    with ThreadPoolExecutor(max_workers=1) as pool:
        verdict = pool.submit(_verify_checksums, entry, manifest)
        load_error: Exception | None = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(entry))
            hf_model = AutoModelForCausalLM.from_pretrained(str(entry), attn_implementation="eager")
            hf_model.eval()
        except Exception as exc:  # noqa: BLE001 - re-raised below unless the entry is damaged
            load_error = exc
        problem = verdict.result()
    if problem:
        raise DamagedEntry(problem)
    if load_error is not None:
        raise load_error
    return hf_model, tokenizer, manifest


def _discard(entry: Path) -> None:
    trash = entry.with_name(f".{entry.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def list_entries() -> list[dict[str, Any]]:
    """Every entry in the converted-weights cache, with its size and whether it looks sound."""
    root = converted_root()
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        try:
            manifest = _read_manifest(entry)
            status, label = "ok", manifest.get("label", "")
        except DamagedEntry as exc:
            status, label = f"damaged: {exc}", ""
        out.append({"entry": str(entry), "label": label, "bytes": size, "status": status})
    return out


def clear() -> int:
    """Remove every converted entry; returns how many were removed."""
    root = converted_root()
    if not root.is_dir():
        return 0
    n = 0
    for entry in root.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            n += 1
    return n
