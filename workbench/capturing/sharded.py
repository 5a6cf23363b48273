"""A capture across many workers on Ray: :func:`capture_sharded` (``capture(..., workers=N)``,
``workbench capture --workers N [--ray ADDRESS]``).

The driver (this process) loads the model once to plan — tokenize, probe the hooks, estimate —
exactly as a single-process capture does, splits the prompts into *units* of whole batches
balanced by token count (:func:`~workbench.store.shards.split_units`; several per worker, so a
fast worker takes more), records them in ``RUN.h5.shards/units.json``, and hands them out to
Ray actors (:class:`~workbench.capturing.worker.UnitWorker`), one unit at a time per worker.
Each worker loads the model itself; its weights' fingerprint must equal the driver's. When
every unit is complete, the driver writes ``RUN.h5``, the index over the unit files
(:func:`~workbench.store.shards.write_index`).

Faults:

* a worker process killed (``kill -9``, out of memory): Ray restarts the actor and runs its
  unit again, which continues from the unit file's last commit;
* a unit that fails (an exception in a batch) is tried again; failing twice with the same error
  stops the capture naming the failing batch's first prompt;
* the driver killed: the unit files and ``units.json`` stay; ``--resume`` (same prompts, same
  settings) continues the unfinished units;
* Ctrl-C: every worker commits its finished batches and stops; ``--resume`` continues.

Ray is imported only here, and only for a capture with ``workers > 1`` or a Ray address: the
single-process path and ``workbench --help`` never import it. A local Ray runtime listens on
127.0.0.1 only (:func:`ray_runtime`); joining a real cluster is the user's explicit address.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.capturing.entry import CaptureInterrupted, CaptureResult
from workbench.capturing.plan import build_settings, make_plan
from workbench.capturing.prompts import Prompt
from workbench.capturing.sampling import Generation
from workbench.capturing.worker import UnitJob, UnitWorker, weights_fingerprint
from workbench.errors import UserError
from workbench.store import shards
from workbench.store.transaction import (
    RESUME_KEYS,
    RunLock,
    check_free_space,
    complete_prompts,
    human_bytes,
)

if TYPE_CHECKING:
    from workbench.models.model import Model

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""Set wherever workbench starts Ray: without the first, Ray 2.60's servers bind the machine's
external address instead of 127.0.0.1; the second keeps usage statistics off."""
UNITS_PER_WORKER = 4
MAX_ATTEMPTS = 3
ACTOR_RESTARTS = 3
OBJECT_STORE_BYTES = 128 << 20  # prompts and small results only: the data go to files


@contextlib.contextmanager
def ray_runtime(address: str | None, num_cpus: float, num_gpus: float) -> Iterator[Any]:
    """Ray for one capture: a Ray already initialised in this process (a notebook, a test) is
    used as it is; else join the cluster at ``address``, or start a local runtime bound to
    127.0.0.1 with just the resources asked for, its temporary files in a fresh folder that is
    removed afterwards."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise UserError("--workers needs Ray: pip install 'workbench[ray]'") from None
    if ray.is_initialized():
        yield ray
        return
    tmp = None
    if address == "local":
        address = None  # Ray's name for a new local runtime
    if address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    else:
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: if it was imported
        # before the variable was set (a notebook, a test), bind loopback all the same.
        constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
        if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
            constants.ENABLE_RAY_CLUSTER = False
        tmp = tempfile.mkdtemp(prefix="wbray-")
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, _temp_dir=tmp,
                 object_store_memory=OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def capture_sharded(
    model: Model,
    loader: Callable[[], Model],
    items: list[Prompt],
    *,
    final: Path,
    hooks: list[str],
    workers: int,
    ray_address: str | None,
    worker_cpus: float,
    worker_gpus: float,
    units: int | None,
    storage_dtype: str,
    compression: str | None,
    predictions: int,
    batch_size: int,
    truncate: bool,
    generation: Generation | None,
    resume: bool,
    show_progress: bool,
    commit_seconds: float,
    chat: dict[str, Any] | None = None,
) -> CaptureResult:
    """The sharded capture (see the module docstring); arguments as
    :func:`~workbench.capturing.entry.capture`'s, already checked; ``model`` is the driver's
    (loaded by ``loader``, which every worker calls too)."""
    plan = make_plan(model, items, hooks, storage_dtype=storage_dtype, compression=compression,
                     predictions=predictions, batch_size=batch_size, truncate=truncate,
                     generation=generation, chat=chat)
    for line in plan.summary():
        print(f"workbench: {line}", file=sys.stderr)
    settings = build_settings(plan, hooks, truncate).to_dict()
    lock = RunLock(final)
    done = False
    try:
        if resume and final.exists() and shards.read_units_file(final) is None:
            n_done = complete_prompts(final, len(items))
            done = True
            return CaptureResult(final, n_done, 0, 0, 0.0, n_done, plan)
        unit_list, settings = _units(final, plan, settings, workers, units, resume)
        if not resume:  # (a resumed unit checks its own room when it starts)
            check_free_space(final.parent, plan.estimated_bytes())
        print(f"workbench: {len(unit_list)} units over {workers} workers into {shards.shards_dir(final)}/",
              file=sys.stderr)
        t0 = time.monotonic()
        with ray_runtime(ray_address, workers * worker_cpus, workers * worker_gpus) as ray:
            pool = _Pool(ray, loader, workers, worker_cpus, worker_gpus, weights_fingerprint(model))
            t_ready = time.monotonic()
            results = pool.run(final, plan, unit_list, hooks, settings, commit_seconds, show_progress)
            seconds = time.monotonic() - t_ready
        shards.write_index(final, unit_list, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           settings=settings)
        (shards.shards_dir(final) / shards.UNITS_FILE).unlink(missing_ok=True)
        done = True
    except BaseException:
        _forget_if_empty(final)
        raise
    finally:
        lock.release(remove=done)
    n_tokens = sum(r.get("tokens", 0) for r in results.values())
    written = sum(r.get("bytes", 0) for r in results.values())
    print(f"workbench: wrote {final} ({len(items):,} prompts in {len(unit_list)} units, "
          f"{human_bytes(written)} in {seconds:.1f} s, after {t_ready - t0:.1f} s starting Ray "
          f"and {workers} workers)", file=sys.stderr)
    resumed = sum(int(r.get("resumed_from", 0)) for r in results.values())
    return CaptureResult(final, len(items), n_tokens, written, seconds, resumed, plan,
                         startup_seconds=t_ready - t0)


def _forget_if_empty(final: Path) -> None:
    """A capture stopped before any unit file was written (a worker could not load the model,
    other weights, Ctrl-C during start-up) leaves nothing behind: no plan to resume."""
    folder = shards.shards_dir(final)
    if folder.is_dir() and not any(folder.glob("unit-*")):
        shutil.rmtree(folder, ignore_errors=True)


def _units(final: Path, plan: Any, settings: dict[str, Any], workers: int, units: int | None,
           resume: bool) -> tuple[list[shards.Unit], dict[str, Any]]:
    """The units (and the settings document every unit records): a resumed capture's, checked
    against this one, or new ones, recorded in ``units.json``."""
    digest = shards.prompts_digest([(p.id, p.text) for p in plan.prompts])
    old = shards.read_units_file(final) if resume else None
    if old is not None:
        where = shards.shards_dir(final) / shards.UNITS_FILE
        if old.get("prompts_sha256") != digest:
            raise UserError(f"cannot resume {where}: the prompts differ from the interrupted capture's")
        for key in RESUME_KEYS:
            if old["settings"].get(key) != settings.get(key):
                raise UserError(f"cannot resume {where}: setting {key!r} differs from the "
                                "interrupted capture")
        print(f"workbench: resuming the sharded capture {old['run_id'][:8]}", file=sys.stderr)
        return [shards.Unit(**u) for u in old["units"]], dict(old["settings"])
    counts = [sum(plan.lengths(i).values()) for i in range(len(plan.prompts))]
    unit_list = shards.split_units(counts, plan.batch_size, units or workers * UNITS_PER_WORKER)
    shards.write_units_file(final, {"run_id": settings["run_id"], "settings": settings,
                                    "prompts_sha256": digest, "workers": workers,
                                    "units": [u.to_dict() for u in unit_list]})
    return unit_list, settings


class _Pool:
    """The workers (Ray actors) and the loop handing out units."""

    def __init__(self, ray: Any, loader: Callable[[], Model], workers: int, cpus: float,
                 gpus: float, expected: dict[str, Any]) -> None:
        self.ray = ray
        remote = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
                            max_concurrency=4)(UnitWorker)
        threads = max(1, int(cpus)) if cpus >= 1 else 1
        self.actors = [remote.options(num_cpus=cpus, num_gpus=gpus).remote(loader, threads)
                       for _ in range(workers)]
        try:
            prints = ray.get([a.fingerprint.remote() for a in self.actors])
        except Exception as exc:  # noqa: BLE001 - whatever the loader raised, in a worker
            self.kill()
            raise UserError(f"a worker could not load the model: {_first_line(exc)}") from None
        for i, got in enumerate(prints):
            if got != expected:
                self.kill()
                key = next(k for k in expected if got.get(k) != expected.get(k))
                raise UserError(f"worker {i} loaded different weights than the driver ({key}: "
                                f"{str(got.get(key))[:16]} vs {str(expected.get(key))[:16]}); "
                                "every worker must see the same model files")

    def kill(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)

    def run(self, final: Path, plan: Any, unit_list: list[shards.Unit], hooks: list[str],
            settings: dict[str, Any], commit_seconds: float, show: bool) -> dict[int, dict[str, Any]]:
        def job(u: shards.Unit) -> UnitJob:
            return UnitJob(final=str(final), unit=u, prompts=plan.prompts[u.start : u.stop],
                           hooks=hooks, settings=settings, storage_dtype=plan.storage_dtype,
                           compression=plan.compression, predictions=plan.predictions,
                           batch_size=plan.batch_size, truncate=bool(settings.get("truncate")),
                           generation=plan.generation, commit_seconds=commit_seconds)

        pending = collections.deque(unit_list)
        errors: dict[int, list[str]] = collections.defaultdict(list)
        running: dict[Any, tuple[Any, shards.Unit]] = {}
        idle = list(self.actors)
        results: dict[int, dict[str, Any]] = {}
        bar = _Progress(len(plan.prompts), show)
        try:
            with bar:
                while pending or running:
                    while idle and pending:
                        actor, unit = idle.pop(), pending.popleft()
                        running[actor.run_unit.remote(job(unit))] = (actor, unit)
                    ready, _ = self.ray.wait(list(running), num_returns=1, timeout=0.5)
                    for ref in ready:
                        actor, unit = running.pop(ref)
                        out = self._outcome(ref)
                        if out["status"] != "died":
                            idle.append(actor)
                        if out["status"] == "done":
                            results[unit.index] = out
                            bar.unit_done(unit.stop - unit.start, out)
                        elif out["status"] == "interrupted":
                            raise KeyboardInterrupt
                        else:
                            self._failed(unit, out, errors)
                            pending.appendleft(unit)
                    if not idle and not running and pending:
                        raise UserError("every worker died; the committed units are kept "
                                        "(--resume continues)")
                    bar.update(self._live())
        except KeyboardInterrupt:
            for a in self.actors:
                with contextlib.suppress(Exception):
                    a.stop.remote()
            with contextlib.suppress(Exception):
                self.ray.wait(list(running), num_returns=len(running), timeout=120)
            raise CaptureInterrupted(
                f"interrupted: the finished batches are committed in {shards.shards_dir(final)}/; "
                "run the same command with --resume to continue") from None
        finally:
            if pending or running:
                self.kill()
        return results

    def _outcome(self, ref: Any) -> dict[str, Any]:
        try:
            return dict(self.ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - the actor died more often than Ray restarts it
            return {"status": "died", "error": f"worker died: {_first_line(exc)}"}

    def _failed(self, unit: shards.Unit, out: dict[str, Any], errors: dict[int, list[str]]) -> None:
        """Record a failed attempt; stop when the unit failed twice the same way (or too often)."""
        seen = errors[unit.index]
        seen.append(out["error"])
        where = (f"prompt {out['prompt_id']!r} (index {out['prompt_index']})" if "prompt_id" in out
                 else f"unit {unit.index}")
        if (len(seen) >= 2 and seen[-1] == seen[-2]) or len(seen) >= MAX_ATTEMPTS:
            if out.get("traceback"):
                print(out["traceback"], file=sys.stderr)
            raise UserError(f"{where} failed {len(seen)} times: {seen[-1]}")
        print(f"workbench: {where} failed ({out['error']}); trying again", file=sys.stderr)

    def _live(self) -> list[dict[str, int]]:
        refs = [a.progress.remote() for a in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0.2)
        out = []
        for ref in ready:
            with contextlib.suppress(Exception):
                p = self.ray.get(ref)
                if p:
                    out.append(p)
        return out


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


class _Progress:
    """One progress bar across workers: prompts committed, tokens per second, bytes written."""

    def __init__(self, total: int, show: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.t0 = time.monotonic()
        self.done_prompts = self.done_tokens = self.done_bytes = 0
        self.progress = Progress(
            TextColumn("capturing"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
            TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[written]}"),
            TimeRemainingColumn(), disable=not show, transient=False)
        self.total = total

    def __enter__(self) -> _Progress:  # noqa: PYI034 - not meant to be subclassed
        self.progress.__enter__()
        self.task = self.progress.add_task("capture", total=self.total, rate="", written="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def unit_done(self, prompts: int, out: dict[str, Any]) -> None:
        self.done_prompts += prompts
        self.done_tokens += int(out.get("tokens", 0))
        self.done_bytes += int(out.get("bytes", 0))

    def update(self, live: list[dict[str, int]]) -> None:
        prompts = self.done_prompts + sum(p["prompts"] for p in live)
        tokens = self.done_tokens + sum(p["tokens"] for p in live)
        written = self.done_bytes + sum(p["bytes"] for p in live)
        elapsed = max(1e-9, time.monotonic() - self.t0)
        self.progress.update(self.task, completed=prompts, rate=f"{tokens / elapsed:,.0f} tok/s",
                             written=f"{written / 1e6:,.1f} MB written")
