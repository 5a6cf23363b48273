"""One worker of a sharded capture: a Ray actor (made from :class:`UnitWorker` by
:mod:`workbench.capturing.sharded`) that loads the model once and writes units.

A unit is written exactly as a single-process capture writes a run — planned with the same
settings, the same batches, the same writer thread and file transaction — into its own file
``RUN.h5.shards/unit-NNNNN.h5``. It is always opened with ``resume``: if the worker process was
killed mid-unit (Ray restarts the actor and runs the task again), the unit continues from its
last commit (the killed SWMR file's committed prompts are copied into a fresh one), and a unit
that is already complete is left as it is. So a unit's task can run any number of times and
the file holds each of its prompts once.

Nothing here imports Ray: the class is an ordinary class; ``ray.remote`` wraps it in the driver.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.capturing.entry import CaptureInterrupted, write_run
from workbench.capturing.hooks import gates_enabled
from workbench.capturing.plan import make_plan
from workbench.capturing.prompts import Prompt
from workbench.capturing.sampling import Generation
from workbench.errors import UserError
from workbench.store import schema as S
from workbench.store.settings import RunSettings
from workbench.store.shards import ATTR_SHARD_RUN, ATTR_SHARD_UNIT, Unit, unit_file

if TYPE_CHECKING:
    from workbench.models.model import Model


@dataclass(frozen=True)
class UnitJob:
    """What a worker needs to write one unit: the run, the unit's prompts, the capture's
    options and its settings document (shared by every unit, so a resumed unit matches)."""

    final: str
    unit: Unit
    prompts: list[Prompt]
    hooks: list[str]
    settings: dict[str, Any]
    storage_dtype: str
    compression: str | None
    predictions: int
    batch_size: int
    truncate: bool
    generation: Generation | None
    commit_seconds: float


def weights_fingerprint(model: Model) -> dict[str, Any]:
    """What must agree between the driver and every worker: the provenance's SHA-256 of the
    weights file, and a SHA-256 of the loaded weights themselves."""
    return {"provenance_sha256": model.info.provenance.sha256, "weights_sha256": model.weights_sha256(),
            "name": model.name}


def _culprit(plan: Any, batch: list[int]) -> int:
    """The first prompt of a failed batch that fails alone (the batch's first if none does)."""
    from workbench.capturing.forward import run_batch

    if len(batch) > 1:
        with gates_enabled(plan.model, plan.hooks.gates):
            for i in batch:
                try:
                    run_batch(plan, [i])
                except Exception:  # noqa: BLE001 - looking for the prompt that fails
                    return i
    return batch[0]


class UnitWorker:
    """The body of one Ray actor. ``threads``: torch's intra-op threads (the worker's CPUs)."""

    def __init__(self, loader: Callable[[], Model], threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model = loader()
        self._stop = threading.Event()
        self._progress: tuple[int, Any] | None = None  # (unit, its writer) while one is written

    def pid(self) -> int:
        return os.getpid()

    def fingerprint(self) -> dict[str, Any]:
        return weights_fingerprint(self.model)

    def stop(self) -> None:
        """Stop after the batch in progress (committing it): Ctrl-C in the driver."""
        self._stop.set()

    def progress(self) -> dict[str, int] | None:
        """The unit being written: its index, committed prompts and tokens, bytes written."""
        current = self._progress
        if current is None:
            return None
        unit, writer = current
        return {"unit": unit, "prompts": writer.n_prompts, "tokens": writer.n_tokens[S.MAIN],
                "bytes": writer.bytes_written}

    def run_unit(self, job: UnitJob) -> dict[str, Any]:
        """Write ``job``'s unit (see the module docstring). Returns ``status``: ``done``,
        ``interrupted`` or ``failed`` (with ``error``, and, when a batch failed, the prompt that
        fails alone — else the batch's first — as ``prompt_index``/``prompt_id``)."""
        unit = job.unit
        path = Path(unit_file(Path(job.final), unit.index))
        out: dict[str, Any] = {"unit": unit.index, "pid": os.getpid()}
        plan = None
        try:
            plan = make_plan(self.model, job.prompts, job.hooks, storage_dtype=job.storage_dtype,
                             compression=job.compression, predictions=job.predictions,
                             batch_size=job.batch_size, truncate=job.truncate,
                             generation=job.generation, first_index=unit.start,
                             chat=job.settings.get("chat"))
            result = write_run(
                plan, path, RunSettings.from_dict(job.settings), resume=True, show_progress=False,
                commit_seconds=job.commit_seconds, stop=self._stop,
                attrs={ATTR_SHARD_RUN: job.settings["run_id"], ATTR_SHARD_UNIT: unit.index},
                on_writer=lambda writer: setattr(self, "_progress", (unit.index, writer)))
            return {**out, "status": "done", "resumed_from": result.resumed_from,
                    "tokens": result.n_tokens, "bytes": result.bytes_written}
        except CaptureInterrupted:
            return {**out, "status": "interrupted"}
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries or stops
            batch = getattr(exc, "batch", None)
            failed = {**out, "status": "failed", "user": isinstance(exc, UserError),
                      "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                      "traceback": "" if isinstance(exc, UserError) else traceback.format_exc()}
            if batch and plan is not None:
                i = _culprit(plan, batch)
                failed.update(prompt_index=unit.start + i, prompt_id=job.prompts[i].id)
            return failed
        finally:
            self._progress = None
