"""The file side of writing a run: one transaction from the lock to the atomic rename.

A run is written as ``NAME.h5.partial`` under an exclusive lock on ``NAME.h5.lock``
(:class:`RunLock`), and renamed to ``NAME.h5`` only once it is complete and durable.
:class:`RunTransaction` does every step of that around a capture's batches, in order:

1. :func:`check_output` (before anything is loaded): refuse an output that would clobber a run;
2. take the lock (:meth:`RunTransaction.__enter__`);
3. ``--resume``: a finished run with the same number of prompts is left as it is
   (:meth:`RunTransaction.already_complete`); an interrupted one is checked against the new
   capture's settings and prompts (:func:`check_resumable`, reading the old file's layout) and
   continues after its committed prompts (:meth:`RunTransaction.resume_point`);
4. check the free disk space (:meth:`RunTransaction.check_space`);
5. open the :class:`~workbench.store.writer.RunWriter` (:meth:`RunTransaction.open_writer`),
   first copying a resumed file's committed prompts into a fresh partial file;
6. close, ``fsync`` and rename (:meth:`RunTransaction.finish`); a capture that fails before
   committing anything leaves no file behind (the lock file stays while the run is unfinished).

Numpy and h5py only (the run store's layer): no torch, no model, no capture.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from workbench.errors import UserError
from workbench.paths import fsync_dir
from workbench.store import schema as S
from workbench.store.files import disk_full, lock_path, partial_path
from workbench.store.reader import read_ragged
from workbench.store.settings import RunSettings
from workbench.store.shards import read_units_file, shards_dir
from workbench.store.writer import RunWriter
from workbench.version import __version__

RESUME_KEYS = ("model", "family", "hooks", "storage_dtype", "compression", "top_k", "batch_size",
               "bos", "truncate", "gates", "generation", "chat")
"""Settings a resumed capture must share with the capture it continues."""


def human_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class RunLock:
    """An exclusive flock on ``NAME.h5.lock`` for the whole capture: two writers never share a
    run, and readers can tell a live capture from an interrupted one."""

    def __init__(self, final: Path) -> None:
        self.path = lock_path(final)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._holder()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            who = f" (pid {holder})" if holder else ""
            raise UserError(f"another capture{who} is writing {final} right now") from None
        if holder and holder != os.getpid():
            # the lock file outlived its capture (killed: the kernel released its flock)
            print(f"workbench: the capture that held {self.path.name} (pid {holder}) is gone; "
                  "taking its lock over", file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def _holder(self) -> int | None:
        """The pid written in the lock file by the capture that took it, if any."""
        try:
            text = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None

    def release(self, remove: bool) -> None:
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)


def check_output(out: Path, overwrite: bool, resume: bool, sharded: bool = False) -> None:
    """Refuse, before anything is loaded or written, an output that would clobber a run
    (``sharded``: for a capture on several workers, :mod:`workbench.store.shards`)."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if not out.parent.is_dir():
        raise UserError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"output {out} is a folder; give a file name such as {out / 'run.h5'}")
    folder = shards_dir(out)
    if folder.exists():
        if overwrite:
            raise UserError(f"{folder} holds the units of a sharded capture; remove {out.name} and "
                            f"{folder.name} to capture there again (--overwrite does not replace a "
                            "sharded run)")
        if read_units_file(out) is not None:
            if not sharded:
                raise UserError(f"an unfinished sharded capture exists in {folder}; continue it "
                                "with --workers N --resume")
            if not resume:
                raise UserError(f"an interrupted sharded capture exists in {folder}; --resume "
                                "continues it")
        elif not out.exists():
            raise UserError(f"{folder} exists without its index {out.name}; remove it or choose "
                            "another output")
    partial = partial_path(out)
    if sharded and partial.exists():
        raise UserError(f"an interrupted single-process capture exists at {partial}; continue it "
                        "with --resume and without --workers")
    if out.exists() and not (overwrite or resume):
        raise UserError(f"{out} exists; --overwrite replaces it (only once the new run is complete) "
                        "or --resume continues it")
    if partial.exists() and not (overwrite or resume):
        raise UserError(f"an interrupted capture exists at {partial}; --resume continues it, "
                        "--overwrite starts again")


def _settings_doc(old: Any) -> dict[str, Any]:
    return dict(json.loads(old[S.META_SETTINGS][()].decode()))


def check_resumable(old: Any, settings: dict[str, Any], prompts: Sequence[tuple[str, str]],
                    partial: Path) -> int:
    """How many prompts the interrupted run ``old`` (an open h5py file) has committed, once it is
    clear the capture can continue it: the same :data:`RESUME_KEYS` settings, and ``prompts``
    (``(id, text)`` of every prompt of the new capture) starting with the ones it holds."""
    try:
        old_settings = _settings_doc(old)
        n_done = int(old[S.TOKEN_OFFSETS].shape[0]) - 1
    except (KeyError, ValueError) as exc:
        raise UserError(f"{partial} is not a resumable workbench run ({exc})") from None
    for key in RESUME_KEYS:
        if old_settings.get(key) != settings.get(key):
            raise UserError(f"cannot resume {partial}: setting {key!r} differs from the interrupted "
                            f"capture ({S.dumps(old_settings.get(key))[:80]} vs "
                            f"{S.dumps(settings.get(key))[:80]})")
    if n_done > len(prompts):
        raise UserError(f"cannot resume {partial}: it already holds {n_done} prompts, more than "
                        f"the {len(prompts)} given")
    for i in range(n_done):
        old_id = read_ragged(old.__getitem__, S.PROMPT_ID, i, partial).decode("utf-8")
        old_text = read_ragged(old.__getitem__, S.PROMPT_TEXT, i, partial).decode("utf-8")
        if (old_id, old_text) != tuple(prompts[i]):
            raise UserError(f"cannot resume {partial}: prompt {i} ({prompts[i][0]!r}) is not the "
                            "one already captured; resume needs the same prompts in the same order")
    return n_done


def complete_prompts(final: Path, n_prompts: int) -> int:
    """``--resume`` of the finished run ``final``: its prompt count, when it holds ``n_prompts``
    (nothing is to be done); else :class:`UserError`."""
    from workbench.store.reader import open_run

    with open_run(final) as run:
        if len(run) == n_prompts:
            print(f"workbench: {final} is already complete ({len(run)} prompts)", file=sys.stderr)
            return len(run)
    raise UserError(f"{final} is complete with a different number of prompts; "
                    "use --overwrite to capture again")


def check_free_space(folder: Path, needed: int) -> None:
    """Warn when ``folder`` seems to have no room for ``needed`` bytes more. Not a refusal: the
    estimate can be high, and a disk that does fill is met with the committed prompts kept and
    ``--resume`` (:class:`RunTransaction`)."""
    free = shutil.disk_usage(folder).free
    if needed * 1.02 + (16 << 20) > free:
        print(f"workbench: warning: the run needs about {human_bytes(needed)} but {folder} has only "
              f"{human_bytes(free)} free; if the disk fills, the committed prompts are kept and "
              "--resume continues after space is freed", file=sys.stderr)


class RunTransaction:
    """Writing the run ``final`` (see the module docstring): a context manager that holds the
    lock, and on leaving releases it (removing the lock file once the run is complete). Leaving
    on an exception closes the writer, and deletes the file if nothing was committed to it."""

    def __init__(self, final: Path, *, resume: bool) -> None:
        self.final = final
        self.partial = partial_path(final)
        self.resume = resume
        self.start_at = 0
        """Prompts already committed by the interrupted capture this one continues."""
        self.writer: RunWriter | None = None
        self._old: Any = None  # the interrupted file, read-only, until its prompts are copied
        self._lock: RunLock | None = None
        self._done = False

    def __enter__(self) -> RunTransaction:
        self._lock = RunLock(self.final)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        full = disk_full(exc)
        committed = self.start_at
        try:
            if exc_type is not None and self.writer is not None:
                committed = self.writer.n_prompts
                try:
                    self.writer.close()
                except OSError:
                    if not full:  # on a full disk, closing may fail the same way: the
                        raise     # committed prompts are on disk already (offsets last)
                if self.writer.n_prompts == 0 and self.start_at == 0:
                    self.writer.path.unlink(missing_ok=True)
        finally:
            if self._old is not None and self._old.id.valid:
                self._old.close()
            if self._lock is not None:
                # no partial file: nothing to resume, so no lock file to leave behind either
                self._lock.release(remove=self._done or not self.partial.exists())
        if full:
            folder = self.final.parent
            if committed == 0:
                raise UserError(f"no space left on {folder}: nothing was committed; free space and "
                                "run the same command again") from None
            raise UserError(f"no space left on {folder}: {committed} prompts committed in "
                            f"{self.partial.name}; resume with --resume after freeing space") from None

    def already_complete(self, n_prompts: int) -> int | None:
        """With ``--resume`` and a finished run (no partial file): its prompt count when it holds
        ``n_prompts`` (nothing is to be done); else ``UserError``. ``None`` in every other case."""
        if not (self.resume and self.final.exists() and not self.partial.exists()):
            return None
        n_done = complete_prompts(self.final, n_prompts)
        self._done = True
        return n_done

    def resume_point(self, settings: RunSettings, prompts: Sequence[tuple[str, str]]) -> RunSettings:
        """With ``--resume`` and an interrupted run: check it (:func:`check_resumable`), set
        :attr:`start_at`, and return ``settings`` with the old run's ``run_id`` and one more
        ``resumed`` record. Otherwise ``settings`` as they are."""
        if not (self.resume and self.partial.exists()):
            return settings
        import h5py

        try:
            self._old = h5py.File(self.partial, "r", swmr=True)
        except (OSError, RuntimeError) as exc:  # h5py raises either, by the kind of damage
            # Killed before its switch to SWMR mode, which comes before the first commit, HDF5
            # cannot open it: nothing in it was committed. Kept aside all the same (a file
            # damaged otherwise is never deleted), and the capture starts again in its place.
            aside = self.partial.with_name(f"{self.partial.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.partial, aside)
            print(f"workbench: {self.partial.name} cannot be opened to resume ({str(exc).splitlines()[0]}); "
                  f"it was interrupted before its first commit or is damaged: kept as {aside.name}, "
                  "starting again", file=sys.stderr)
            return settings
        self.start_at = check_resumable(self._old, settings.to_dict(), prompts, self.partial)
        old = _settings_doc(self._old)
        resumed = [*old.get("resumed", []),
                   {"at_prompt": self.start_at, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        return replace(settings, run_id=old.get("run_id", settings.run_id), resumed=resumed)

    def check_space(self, new_bytes: int) -> None:
        """Refuse to start when the folder has no room for ``new_bytes`` more (plus the copy of a
        resumed file)."""
        check_free_space(self.final.parent,
                         new_bytes + (self.partial.stat().st_size if self._old is not None else 0))

    def open_writer(self, settings: RunSettings, **layout: Any) -> RunWriter:
        """The writer of the partial file (``layout``: :class:`RunWriter`'s other keyword
        arguments). A resumed run's committed prompts are copied into a fresh file first, which
        then replaces the killed one (a killed SWMR file opens only read-only)."""
        old = self._old
        target = self.partial if old is None else self.partial.with_name(self.partial.name + ".tmp")
        writer = RunWriter(target, settings=settings, tool_version=__version__, **layout)
        if old is not None:
            try:
                writer.copy_committed(old, self.start_at)
            except BaseException:
                writer.close()
                target.unlink(missing_ok=True)
                raise
            old.close()
            writer.move_to(self.partial)  # the copy holds everything the killed file committed
            fsync_dir(self.partial.parent)
            print(f"workbench: resuming after {self.start_at} committed prompts", file=sys.stderr)
        self.writer = writer
        return writer

    def finish(self) -> None:
        """Close the complete run durably and rename it to its final name."""
        assert self.writer is not None
        self.writer.close()
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        self._done = True
