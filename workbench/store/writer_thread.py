"""The writer thread of a capture: all HDF5 work of a run in one thread, fed through a queue
bounded in bytes.

The forward passes run in the calling thread. Each hook hands its (already sliced and converted)
values to the writer thread as soon as it fires (:meth:`WriterThread.put_act`); the batch's
tokens follow (:meth:`WriterThread.put_commit`). The thread does all HDF5 work (h5py serialises
every call behind one lock anyway) and commits batches once their tokens arrive. Writing thus
overlaps the rest of the forward pass and the next batch, and memory stays flat in the number of
prompts.

Numpy and h5py only (the run store's layer): no torch, no model.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from typing import Any

import numpy as np

from workbench.store.batch import BatchRecord
from workbench.store.writer import RunWriter

WRITE_BUDGET = 256 << 20  # bytes of activations waiting for the writer before hooks block
COMMIT_SECONDS = 2.0  # batches are committed together at most this often (see WriterThread)


def _lower_priority(niceness: int = 10) -> None:
    """Make the calling thread yield the CPU to the forward pass. torch's intra-op threads wait
    for one another at the end of every parallel region, so a writer competing with them for a
    core stalls whole operations; at a lower priority it runs in their gaps instead (Linux sets
    niceness per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class WriterThread(threading.Thread):
    """All HDF5 work happens here. Hooks hand over activations as they fire (``put_act``); the
    batch's tokens follow (``put_commit``). The queue is bounded in bytes, so a slow disk holds
    the forward pass back instead of filling memory.

    Batches are committed together, at most every ``commit_seconds`` (the first one at once):
    every commit flushes each dataset's partly filled last chunk, so with short batches one
    commit per batch wrote most bytes twice. A crash loses at most the batches of the last
    ``commit_seconds``; an interrupt (Ctrl-C) or the end of the capture commits every batch
    that is complete."""

    def __init__(self, writer: RunWriter, budget: int | None = None,
                 commit_seconds: float = COMMIT_SECONDS) -> None:
        super().__init__(name="workbench-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self.error: BaseException | None = None
        self.budget = WRITE_BUDGET if budget is None else budget
        self.commit_seconds = commit_seconds
        self.pending = 0
        self.cond = threading.Condition()
        self.uncommitted: list[BatchRecord] = []
        self.last_commit = -math.inf

    def _commit(self) -> None:
        if self.uncommitted:
            self.writer.commit(BatchRecord.merge(self.uncommitted))
            self.uncommitted = []
            self.last_commit = time.monotonic()

    def run(self) -> None:
        _lower_priority()
        while True:
            kind, a, b = self.queue.get()
            size = b.nbytes if kind == "act" else 0
            try:
                if self.error is None:
                    if kind == "act":
                        self.writer.write_act(a, b)
                    elif kind == "commit":
                        self.uncommitted.append(a)
                        if time.monotonic() - self.last_commit >= self.commit_seconds:
                            self._commit()
                    else:  # the end: commit every finished batch
                        self._commit()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised there
                self.error = exc
            finally:
                with self.cond:
                    self.pending -= size
                    self.cond.notify_all()
            if kind == "end":
                return

    def check(self) -> None:
        """Raise the error the thread met, if any (once it failed, it writes nothing more)."""
        if self.error is not None:
            raise self.error

    def put_act(self, name: str, values: np.ndarray) -> None:
        with self.cond:
            while self.pending and self.pending + values.nbytes > self.budget and self.error is None:
                self.cond.wait(0.2)
            self.check()
            self.pending += values.nbytes
        self.queue.put(("act", name, values))

    def put_commit(self, record: BatchRecord) -> None:
        self.check()
        self.queue.put(("commit", record, None))

    def finish(self) -> None:
        self.queue.put(("end", None, None))
        self.join()
