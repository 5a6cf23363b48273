"""The files of a run, by name: ``NAME.h5`` when complete, ``NAME.h5.partial`` while written (or
after its writer died), ``NAME.h5.lock`` held by the writing process; and whether a writer is
alive; opening a run's file for reading. Shared by the reader (a run's status) and the file
transaction (lock, resume, rename).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.store import schema as S

if TYPE_CHECKING:
    import h5py


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


def open_readonly(path: Path, swmr: bool, wait: float = 5.0) -> h5py.File:
    """Open read-only. A partial run (being written, or whose writer was killed) needs SWMR mode:
    plain "r" refuses a file still marked open for writing. A finished run opens in plain mode,
    which also checks the file is not truncated (SWMR mode skips that check, as SWMR files grow).
    A writer holds an exclusive lock for the few milliseconds between creating the file and
    switching to SWMR mode; wait that out. (h5py is imported here: commands that only list
    results beside runs import this module without it.)"""
    import h5py

    deadline = time.monotonic() + wait
    delay = 0.005
    while True:
        try:
            return h5py.File(path, "r", swmr=swmr)
        except OSError as exc:
            if "unable to lock file" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(0.2, delay * 2)


def opened_twice(f: h5py.File) -> bool:
    """Whether this process also has the file behind ``f`` open as a SWMR reader (as
    ``NAME.h5.partial``, followed while its capture wrote it and then renamed). HDF5 then shares
    one open file between the two handles, with the reader's cached dataset extents, which each
    dataset of ``f`` must refresh. (Two plain handles share nothing stale, and refreshing there
    upsets the other handle's reads, so only a SWMR reader counts.)"""
    import h5py

    try:
        mine = os.fstat(f.id.get_vfd_handle())
        others = [i for i in h5py.h5f.get_obj_ids(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) if i.id != f.id.id]
        for fid in others:
            st = os.fstat(fid.get_vfd_handle())
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and fid.get_intent() & h5py.h5f.ACC_SWMR_READ:
                return True
    except (OSError, AttributeError, TypeError, ValueError):
        return False
    return False


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the disk is full (h5py's errors carry the errno only in their text)."""
    return isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "[Errno 28]" in str(exc)
                                         or "No space left" in str(exc))
