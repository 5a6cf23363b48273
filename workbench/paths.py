"""Where workbench keeps per-user files, and small file-system helpers shared by the core."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

CACHE_ENV = "WORKBENCH_CACHE_DIR"


def cache_dir() -> Path:
    """The per-user cache folder: ``$WORKBENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/workbench``,
    else ``~/.cache/workbench``. Not created here."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "workbench"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read through ``mmap`` (hashlib releases the GIL on big buffers,
    so this can run in a thread beside other work)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            step = 256 << 20
            for start in range(0, size, step):
                digest.update(m[start : start + step])
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a (possibly large) file, remembered by (path, size, mtime) in the cache folder so
    that provenance costs nothing on later loads of an unchanged file."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir() / "fingerprints.json"
    memo: dict[str, str] = {}
    try:
        loaded = json.loads(memo_path.read_text())
        if isinstance(loaded, dict):
            memo = {str(k): str(v) for k, v in loaded.items()}
    except (OSError, ValueError):
        pass
    if key in memo:
        return memo[key]
    digest = sha256_file(p)
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{p}|")}
    memo[key] = digest
    try:
        atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    except OSError:
        pass  # a read-only cache folder only costs a re-hash next time
    return digest


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers see the old
    content or the new one, never a torn write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
