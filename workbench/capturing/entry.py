"""The public entry point, :func:`capture`, which reads top to bottom: check the arguments, plan,
open the run, run the batches, finish.

Each step has its own home: planning and the settings document in :mod:`workbench.capturing.plan`,
a batch's forward pass and LM outputs in :mod:`workbench.capturing.forward`, sampling in
:mod:`workbench.capturing.sampling`; the writer thread (:mod:`workbench.store.writer_thread`) and
the file transaction — lock, resume, disk check, atomic rename
(:mod:`workbench.store.transaction`) — belong to the run store.

(The module is not named ``capture``: a submodule ``workbench.capturing.capture`` and the function
the package exports under that name would replace each other.)
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.capturing.forward import run_batch
from workbench.capturing.hooks import gates_enabled
from workbench.capturing.malloc import freed_memory_kept
from workbench.capturing.plan import CapturePlan, build_settings, make_plan
from workbench.capturing.prompts import chat_prompts, normalize, refuse_messages
from workbench.capturing.sampling import Generation, SamplingSettings
from workbench.errors import UserError
from workbench.models.chat import chat_record
from workbench.store import codecs
from workbench.store import schema as S
from workbench.store.settings import RunSettings
from workbench.store.transaction import RunTransaction, check_output, human_bytes
from workbench.store.writer import RunWriter
from workbench.store.writer_thread import COMMIT_SECONDS, WriterThread

if TYPE_CHECKING:
    from workbench.models.model import Model

COMPRESSIONS = codecs.COMPRESSIONS


class CaptureInterrupted(UserError):
    """Ctrl-C: everything committed so far is kept; ``--resume`` continues."""

    exit_code = 130


@dataclass
class CaptureResult:
    path: Path
    n_prompts: int
    n_tokens: int
    bytes_written: int
    seconds: float
    resumed_from: int
    plan: CapturePlan
    startup_seconds: float = 0.0
    """A sharded capture: starting Ray and its workers (loading the model); not in ``seconds``."""


def capture(
    model: Model | str | Callable[[], Model],
    prompts: Any,
    *,
    hooks: list[str] | tuple[str, ...] = ("residual",),
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    device: str | None = "auto",
    dtype: str = "float32",
    compression: str | None = None,
    predictions: int = 10,
    bos: str | None = None,
    truncate: bool = False,
    generate: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
    commit_seconds: float = COMMIT_SECONDS,
    workers: int = 1,
    ray_address: str | None = None,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    units: int | None = None,
    chat: bool = False,
) -> CaptureResult:
    """Capture activations of ``model`` on ``prompts`` into the run file ``out``.

    :param model: a loaded :class:`~workbench.models.model.Model`, a model name, or a function
        that loads one, called once the arguments and the output are checked (so that a mistake
        is reported before a slow load).
    :param prompts: strings, dicts (``{"prompt", "id", "answer", "wrong", "corrupted", "target",
        ...}``), :class:`Prompt` objects, or the path of a ``.txt`` / ``.jsonl`` file.
    :param hooks: TransformerLens hook names, globs (``blocks.*.hook_resid_post``) or presets
        (``residual``, ``attention``, ``attention-full``, ``mlp``, ``lens``, ``all``).
    :param dtype: storage dtype: ``float32`` (exact), ``float16`` or ``bfloat16`` (raw bits).
    :param compression: ``None``/``"none"``, ``"gzip"``, ``"lzf"``, or (extra ``export``, through
        hdf5plugin) ``"blosc2-zstd"`` or ``"zstd"`` (docs/store.md, "Compression").
    :param predictions: top-k next-token predictions stored per position; 0 stores no LM
        outputs at all (no loss, no predictions: the capture does the forward pass and the writes
        only, and analyses that need LM outputs say so).
    :param generate: sample this many tokens after each prompt (decoders) and capture the whole
        sequence; ``temperature`` (0 = greedy), ``top_k``, ``top_p`` and ``seed`` shape the sampling.
    :param overwrite: replace an existing run (the old one stays until the new one is complete).
    :param resume: continue an interrupted capture of the same prompts and settings.
    :param commit_seconds: commit finished batches together at most this often (0: every batch);
        a killed capture loses at most the batches of the last ``commit_seconds``, Ctrl-C none.
    :param dry_run: plan and estimate only; nothing is written.
    :param workers: capture on this many Ray workers (each loads the model) into a sharded run
        (``out`` is an index over unit files in ``out.shards/``; :mod:`workbench.capturing.sharded`).
        1 (the default) captures in this process, without Ray.
    :param ray_address: join the Ray cluster at this address (default: start a local runtime on
        127.0.0.1 for the capture).
    :param worker_cpus: CPUs per worker (its torch threads); ``worker_gpus``: GPUs per worker
        (with ``device="cuda"``).
    :param units: work units to split the prompts into (default: 4 per worker).
    :param chat: lay every prompt out with the model's chat template, the assistant's turn
        opened (:func:`~workbench.capturing.prompts.chat_prompts`); prompts may then be
        conversations (``{"messages": [{"role", "content"}, ...]}``). The run records the template.
    :raises UserError: bad input (nothing is written).
    """
    # 1. check: the arguments and the output, before anything is loaded
    compression = None if compression == "none" else compression
    generation = _check_arguments(batch_size, dtype, compression, predictions, generate,
                                  temperature, top_k, top_p, seed, commit_seconds)
    final: Path | None = Path(out).expanduser().absolute() if out is not None else None
    if final is None and not dry_run:
        raise UserError("an output file is needed (--out RUN.h5)")
    sharded = (workers > 1 or ray_address is not None) and not dry_run
    if final is not None and not dry_run:
        check_output(final, overwrite, resume, sharded=sharded)
    if sharded:
        loader = _sharded_check(model, device, bos, workers, worker_cpus, worker_gpus, units)
    if chat and bos not in (None, "none"):
        raise UserError(f"--chat lays prompts out with the chat template, which writes its own special tokens: "
                        f"drop --bos {bos}")
    items = normalize(prompts)
    if not chat:
        refuse_messages(items)
    model = _load(model, device, bos)
    chat_doc = None
    if chat:
        chat_doc = chat_record(model.tokenizer, model.name)
        items = chat_prompts(model, items)
    if sharded:
        from workbench.capturing.sharded import capture_sharded

        assert final is not None
        return capture_sharded(
            model, loader, items, final=final, hooks=list(hooks), workers=workers,
            ray_address=ray_address, worker_cpus=worker_cpus, worker_gpus=worker_gpus,
            units=units, storage_dtype=dtype, compression=compression, predictions=predictions,
            batch_size=batch_size, truncate=truncate, generation=generation, resume=resume,
            show_progress=sys.stderr.isatty() if progress is None else progress,
            commit_seconds=commit_seconds, chat=chat_doc)

    # 2. plan
    hook_items = list(hooks)
    plan = make_plan(model, items, hook_items, storage_dtype=dtype, compression=compression,
                     predictions=predictions, batch_size=batch_size, truncate=truncate,
                     generation=generation, chat=chat_doc)
    show = sys.stderr.isatty() if progress is None else progress
    if dry_run:
        return CaptureResult(final or Path(), 0, 0, 0, 0.0, 0, plan)
    assert final is not None
    for line in plan.summary():
        print(f"workbench: {line}", file=sys.stderr)
    settings = build_settings(plan, hook_items, truncate)

    # 3-5. open, the batches, finish
    return write_run(plan, final, settings, resume=resume, show_progress=show,
                     commit_seconds=commit_seconds)


def write_run(plan: CapturePlan, final: Path, settings: RunSettings, *, resume: bool,
              show_progress: bool, commit_seconds: float, stop: threading.Event | None = None,
              attrs: dict[str, Any] | None = None,
              on_writer: Callable[[RunWriter], None] | None = None) -> CaptureResult:
    """Write ``plan`` into the run ``final`` (a single-process capture, or one unit of a sharded
    one): open it (lock, resume, disk space, writer with root ``attrs``; ``on_writer`` is told
    the writer), run the batches (:func:`write_batches`, ``stop`` checked between them), close it
    durably and rename it. A finished run that ``resume`` finds complete is left as it is."""
    # 3. open the run: lock, resume, disk space, writer
    with RunTransaction(final, resume=resume) as tx:
        n_done = tx.already_complete(len(plan.prompts))
        if n_done is not None:
            return CaptureResult(final, n_done, 0, 0, 0.0, n_done, plan)
        settings = tx.resume_point(settings, [(p.id, p.text) for p in plan.prompts])
        tx.check_space(plan.estimated_bytes(tx.start_at))
        writer = tx.open_writer(settings, attrs=attrs, **plan.writer_layout())
        if on_writer is not None:
            on_writer(writer)

        # 4. the batches
        with gates_enabled(plan.model, plan.hooks.gates), freed_memory_kept():
            result = write_batches(plan, writer, tx.start_at, show_progress=show_progress,
                                   commit_seconds=commit_seconds, stop=stop)

        # 5. finish: close durably, rename
        tx.finish()
        print(f"workbench: wrote {final} ({result.n_prompts:,} prompts, "
              f"{human_bytes(final.stat().st_size)} in {result.seconds:.1f} s)", file=sys.stderr)
    result.path = final
    return result


def _check_arguments(batch_size: int, dtype: str, compression: str | None, predictions: int,
                     generate: int, temperature: float, top_k: int | None, top_p: float | None,
                     seed: int | None, commit_seconds: float) -> Generation | None:
    """Refuse bad arguments; the generation settings (``None`` without ``generate``)."""
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    if dtype not in S.STORAGE_DTYPES:
        raise UserError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(S.STORAGE_DTYPES)}")
    codecs.check(compression)  # a plugin codec without hdf5plugin: refused before the model loads
    if not 0 <= predictions <= 1000:
        raise UserError("predictions (top-k stored per position) must be between 0 (no LM outputs) and 1000")
    if generate < 0:
        raise UserError("--generate must be 0 or more")
    if not commit_seconds >= 0:
        raise UserError("--commit-every must be 0 or more seconds")
    if generate:
        # A seed is always recorded, so every run can be reproduced from its own settings.
        return Generation(generate, SamplingSettings(temperature, top_k, top_p),
                          seed if seed is not None else secrets.randbelow(2**31))
    if top_k is not None or top_p is not None or seed is not None or temperature != 1.0:
        raise UserError("--temperature, --top-k, --top-p and --seed shape --generate N; give N")
    return None


def _sharded_check(model: Model | str | Callable[[], Model], device: str | None, bos: str | None,
                   workers: int, worker_cpus: float, worker_gpus: float,
                   units: int | None) -> Callable[[], Model]:
    """Refuse what a sharded capture cannot do; the loader every worker calls."""
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if worker_cpus <= 0 or worker_gpus < 0:
        raise UserError("--worker-cpus must be more than 0 and --worker-gpus 0 or more")
    if units is not None and units < 1:
        raise UserError("--units must be at least 1")
    if isinstance(model, str):
        import functools

        from workbench.models import load_model

        return functools.partial(load_model, model, device=device, bos=bos)  # type: ignore[arg-type]
    if callable(model):
        return model
    raise UserError("a capture on several workers loads the model in each worker: pass its name "
                    "or a function that loads it, not a loaded model")


def _load(model: Model | str | Callable[[], Model], device: str | None, bos: str | None) -> Model:
    """The model to capture with: loaded by name (among the models that ship with workbench;
    ``workbench.capture`` passes a loader that knows every plugin's), by the function given, or
    as given."""
    if isinstance(model, str):
        from workbench.models import load_model

        return load_model(model, device=device, bos=bos)  # type: ignore[arg-type]
    if callable(model):
        model = model()
    if bos is not None and bos != model.bos:
        raise UserError(f"the model was loaded with BOS policy {model.bos!r}; load it with bos={bos!r}")
    return model


def write_batches(plan: CapturePlan, writer: RunWriter, start_at: int, *, show_progress: bool,
                  commit_seconds: float, stop: threading.Event | None = None) -> CaptureResult:
    """Run the batches from prompt ``start_at`` on and hand everything to ``writer``'s thread
    (:class:`~workbench.store.writer_thread.WriterThread`): each hook's values as they are
    computed, then the batch's commit. On Ctrl-C (or ``stop`` set, checked between batches)
    every finished batch is committed, then :class:`CaptureInterrupted` says how to continue.
    An error in a batch carries the batch's prompt indices (in the plan) as ``exc.batch``."""
    n_total = len(plan.prompts)
    thread = WriterThread(writer, commit_seconds=commit_seconds)
    thread.start()
    t0 = time.monotonic()
    try:
        with _ProgressBar(n_total, start_at, writer, show_progress) as bar:
            for idx in plan.batches(start_at):
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                try:
                    record = run_batch(plan, idx, on_act=thread.put_act)
                except Exception as exc:
                    exc.batch = idx  # type: ignore[attr-defined]
                    raise
                thread.put_commit(record)
                bar.batch_done(idx[-1] + 1, sum(len(t) for t in record.tokens[S.MAIN]))
        thread.finish()
    except KeyboardInterrupt:
        thread.finish()
        raise CaptureInterrupted(
            f"interrupted: {writer.n_prompts} prompts are committed in {writer.path}; "
            "run the same command with --resume to continue"
        ) from None
    except BaseException:
        thread.finish()
        raise
    thread.check()
    seconds = time.monotonic() - t0
    if writer.n_prompts != n_total:
        raise RuntimeError(f"wrote {writer.n_prompts} prompts, expected {n_total}")
    return CaptureResult(writer.path, writer.n_prompts, writer.n_tokens[S.MAIN], writer.bytes_written,
                         seconds, start_at, plan)


class _ProgressBar:
    """The capture's progress on stderr: prompts done, tokens per second, bytes written."""

    def __init__(self, n_total: int, start_at: int, writer: RunWriter, show: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.writer = writer
        self.t0 = time.monotonic()
        self.tokens_done = 0
        self.progress = Progress(
            TextColumn("capturing"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
            TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[written]}"),
            TimeRemainingColumn(), disable=not show, transient=False,
        )
        self.n_total, self.start_at = n_total, start_at

    def __enter__(self) -> _ProgressBar:
        self.progress.__enter__()
        self.task = self.progress.add_task("capture", total=self.n_total, completed=self.start_at,
                                           rate="", written="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def batch_done(self, completed: int, tokens: int) -> None:
        self.tokens_done += tokens
        elapsed = max(1e-9, time.monotonic() - self.t0)
        self.progress.update(
            self.task, completed=completed,
            rate=f"{self.tokens_done / elapsed:,.0f} tok/s",
            written=f"{self.writer.bytes_written / 1e6:,.1f} MB written",
        )
