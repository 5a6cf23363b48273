"""The files of a run, by name: ``NAME.h5`` when complete, ``NAME.h5.partial`` while written (or
after its writer died), ``NAME.h5.lock`` held by the writing process; and whether a writer is
alive. Shared by the reader (a run's status) and the file transaction (lock, resume, rename).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from workbench.store import schema as S


def partial_path(path: Path) -> Path:
    """``NAME.h5.partial``: where the run ``path`` is written until it is complete."""
    return path.with_name(path.name + S.PARTIAL_SUFFIX)


def lock_path(path: Path) -> Path:
    """``NAME.h5.lock``: the file the writing process holds an exclusive flock on."""
    return path.with_name(path.name + S.LOCK_SUFFIX)


def writer_alive(final_path: Path) -> bool:
    """Whether a capture process holds the run's lock (flock is released when a process dies,
    even by ``kill -9``)."""
    lp = lock_path(final_path)
    try:
        fd = os.open(lp, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    finally:
        os.close(fd)
    return False


def final_name(path: Path) -> Path:
    """The finished run's name for a path that may name its partial file."""
    return path.with_name(path.name[: -len(S.PARTIAL_SUFFIX)]) if path.name.endswith(S.PARTIAL_SUFFIX) else path
