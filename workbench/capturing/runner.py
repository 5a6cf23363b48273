"""Running a model over prompts and streaming the chosen activations into a run file.

The forward passes run in the calling thread; one writer thread, fed through a bounded queue,
does all HDF5 work (h5py serialises every call behind one lock anyway), so writing a batch
overlaps the next forward pass and memory stays flat in the number of prompts.

Batches are right-padded and run without an attention mask: in a causal decoder a real position
never attends to a later (padding) position, so padding cannot reach any stored value; only the
real positions (and, for attention patterns, the real query x key block) are stored.
"""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.capturing.hooks import HookPlan, gates_enabled, plan_hooks, select
from workbench.capturing.prompts import Prompt, normalize
from workbench.errors import UserError
from workbench.paths import fsync_dir
from workbench.store import schema as S
from workbench.store.reader import lock_path, partial_path, read_ragged
from workbench.store.writer import BatchRecord, RunWriter

if TYPE_CHECKING:
    from workbench.models.model import Model

COMPRESSIONS = ("none", "gzip", "lzf")
# Settings a resumed capture must share with the capture it continues.
RESUME_KEYS = ("model", "hooks", "storage_dtype", "compression", "top_k", "batch_size", "bos",
               "truncate", "gates")


class CaptureInterrupted(UserError):
    """Ctrl-C: everything committed so far is kept; ``--resume`` continues."""

    exit_code = 130


@dataclass
class CapturePlan:
    """Everything decided before the first forward pass (what ``--dry-run`` prints)."""

    model: Model
    prompts: list[Prompt]
    token_ids: list[list[int]]
    hooks: HookPlan
    storage_dtype: str
    compression: str | None
    top_k: int
    batch_size: int
    truncated: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def has_lm_outputs(self) -> bool:
        return self.model.info.has_lm_head

    def prompt_bytes(self, i: int) -> int:
        n = len(self.token_ids[i])
        item = S.storage_numpy_dtype(self.storage_dtype).itemsize
        total = sum(h.bytes_for(n, 8 if h.kind == "int" else item) for h in self.hooks.specs)
        total += n * (4 + 8 + 6)  # ids, str offsets, ~str bytes
        if self.has_lm_outputs:
            total += n * (4 + 8 * self.top_k)
        return total + len(self.prompts[i].text.encode()) + 64

    def estimated_bytes(self, start: int = 0) -> int:
        return sum(self.prompt_bytes(i) for i in range(start, len(self.prompts)))

    def summary(self) -> list[str]:
        names = sum(1 + len(h.aliases) for h in self.hooks.specs)
        lines = [
            (f"capture: {len(self.prompts):,} prompts, {self.n_tokens:,} tokens, model "
             f"{self.model.name} (BOS policy '{self.model.bos}')"),
            (f"hooks: {len(self.hooks.specs)} distinct tensors stored ({names} hook names answer "
             f"to them), {self.storage_dtype}"
             + (f", {self.compression} compression" if self.compression else "")),
            f"estimated size: {_human(self.estimated_bytes())}",
        ]
        if self.truncated:
            lines.append(f"truncated to {self.model.info.n_ctx} tokens: {len(self.truncated)} prompts")
        return lines

    def hook_table(self) -> list[str]:
        item = S.storage_numpy_dtype(self.storage_dtype).itemsize
        lines = []
        for h in self.hooks.specs:
            size = sum(h.bytes_for(len(t), 8 if h.kind == "int" else item) for t in self.token_ids)
            shape = ("(heads, q, k)" if h.layout == "square"
                     else "(" + ", ".join(["pos", *map(str, h.feature_shape)]) + ")")
            alias = f"  = {', '.join(h.aliases[:3])}{' ...' if len(h.aliases) > 3 else ''}" if h.aliases else ""
            lines.append(f"  {h.name:45} {shape:22} {_human(size):>10}{alias}")
        for name, why in self.hooks.skipped:
            lines.append(f"  skipped {name}: {why}")
        return lines


@dataclass
class CaptureResult:
    path: Path
    n_prompts: int
    n_tokens: int
    bytes_written: int
    seconds: float
    resumed_from: int
    plan: CapturePlan


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# --- planning ------------------------------------------------------------------------------------


def _tokenize(model: Model, prompts: list[Prompt], truncate: bool) -> tuple[list[list[int]], list[str]]:
    n_ctx = model.info.n_ctx
    out, truncated = [], []
    for p in prompts:
        ids = model.tokenize(p.text)
        if n_ctx and len(ids) > n_ctx:
            if not truncate:
                raise UserError(
                    f"prompt {p.id!r} has {len(ids)} tokens; {model.name} takes at most {n_ctx} "
                    "(--truncate keeps the first tokens)"
                )
            ids = ids[:n_ctx]
            truncated.append(p.id)
        corrupted = p.metadata.get("corrupted")
        if corrupted is not None:
            n_corrupted = len(model.tokenize(corrupted))
            if n_corrupted != len(ids):
                raise UserError(
                    f"prompt {p.id!r}: its corrupted prompt has {n_corrupted} tokens, the prompt "
                    f"{len(ids)}; patching needs equal lengths"
                )
        out.append(ids)
    return out, truncated


def make_plan(
    model: Model,
    prompts: list[Prompt],
    hooks: list[str] | tuple[str, ...],
    *,
    storage_dtype: str,
    compression: str | None,
    top_k: int,
    batch_size: int,
    truncate: bool,
) -> CapturePlan:
    if model.family != "decoder":
        raise UserError(
            f"capture supports decoder models so far; {model.name} is an {model.family}"
        )
    token_ids, truncated = _tokenize(model, prompts, truncate)
    hook_plan = plan_hooks(model, select(model, list(hooks)))
    if truncated:
        print(f"workbench: warning: {len(truncated)} prompts truncated to {model.info.n_ctx} tokens "
              f"(first: {truncated[0]!r})", file=sys.stderr)
    return CapturePlan(model=model, prompts=prompts, token_ids=token_ids, hooks=hook_plan,
                       storage_dtype=storage_dtype, compression=compression, top_k=top_k,
                       batch_size=batch_size, truncated=truncated)


def _settings(plan: CapturePlan, hooks_requested: list[str], truncate: bool) -> dict[str, Any]:
    import torch
    import transformer_lens
    import transformers

    from workbench import __version__

    info = plan.model.info
    return {
        "model": {"name": info.name, "provenance": info.provenance.to_dict(), "dtype": info.dtype},
        "hooks": [h.to_dict() for h in plan.hooks.specs],
        "hooks_requested": hooks_requested,
        "gates": plan.hooks.gates,
        "storage_dtype": plan.storage_dtype,
        "compression": plan.compression,
        "top_k": plan.top_k,
        "batch_size": plan.batch_size,
        "bos": plan.model.bos,
        "truncate": truncate,
        "padding": "right-padded batches, no attention mask; only real positions stored",
        "numerics": info.numerics,
        "device": plan.model.device,
        "versions": {
            "workbench": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
        },
        "resumed": [],
    }


# --- the forward pass ------------------------------------------------------------------------


def _to_storage(x: Any, storage: str, hook_name: str) -> np.ndarray:
    import torch

    if not x.is_floating_point():
        return x.to(torch.int64).cpu().numpy()
    if storage == "float32":
        return x.to(torch.float32).cpu().numpy()
    if storage == "float16":
        y = x.to(torch.float16)
        if bool((torch.isinf(y) & torch.isfinite(x)).any()):
            peak = float(x.abs().max())
            raise UserError(
                f"{hook_name} reaches {peak:.4g}, beyond float16's range (65,504): "
                "capture with --dtype bfloat16 or float32"
            )
        return y.cpu().numpy()
    # bfloat16: HDF5 has no such type; keep the raw bits as uint16.
    return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def run_batch(plan: CapturePlan, indices: list[int]) -> BatchRecord:
    """Run one batch through the model and return what is stored for it."""
    import torch

    model = plan.model
    ids = [plan.token_ids[i] for i in indices]
    lengths = [len(t) for t in ids]
    n_max = max(lengths)
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    tokens = torch.full((len(ids), n_max), pad, dtype=torch.long)
    for row, t in enumerate(ids):
        tokens[row, : len(t)] = torch.tensor(t)
    tokens = tokens.to(model.device)
    acts: dict[str, np.ndarray] = {}
    square_sizes: dict[str, list[int]] = {}

    def make(spec: S.HookSpec):  # type: ignore[no-untyped-def]
        def fn(t: Any, hook: Any) -> None:
            if spec.layout == "square":
                parts = [t[b, :, :n, :n].reshape(-1) for b, n in enumerate(lengths)]
                square_sizes[spec.name] = [p.numel() for p in parts]
            else:
                parts = [t[b, :n] for b, n in enumerate(lengths)]
            # torch.cat copies, so later in-place changes by the model cannot alter what is stored.
            acts[spec.name] = _to_storage(torch.cat(parts), plan.storage_dtype, spec.name)

        return fn

    with torch.inference_mode():
        with model.bridge.hooks(fwd_hooks=[(s.name, make(s)) for s in plan.hooks.specs]):
            logits = model.forward(tokens)
        loss = topk_ids = topk_lp = None
        if plan.has_lm_outputs:
            losses, tids, tlps = [], [], []
            for b, n in enumerate(lengths):
                lp = torch.log_softmax(logits[b, :n].float(), dim=-1)
                nll = torch.full((n,), float("nan"))
                if n > 1:
                    target = tokens[b, 1:n]
                    nll[: n - 1] = -lp[:-1].gather(-1, target[:, None])[:, 0].cpu()
                losses.append(nll)
                top = torch.topk(lp, k=min(plan.top_k, lp.shape[-1]), dim=-1)
                tids.append(top.indices.to(torch.int32).cpu())
                tlps.append(top.values.cpu())
            loss = torch.cat(losses).numpy()
            topk_ids = torch.cat(tids).numpy()
            topk_lp = torch.cat(tlps).numpy()
    missing = [s.name for s in plan.hooks.specs if s.name not in acts]
    if missing:
        raise RuntimeError(f"hooks did not fire during capture: {missing}")
    return BatchRecord(
        prompt_ids=[plan.prompts[i].id for i in indices],
        texts=[plan.prompts[i].text for i in indices],
        metas=[S.dumps(plan.prompts[i].metadata) for i in indices],
        token_ids=[np.asarray(t, dtype=np.int32) for t in ids],
        str_tokens=[model.str_tokens(t) for t in ids],
        acts=acts,
        square_sizes=square_sizes,
        loss=loss,
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
    )


# --- the writer thread ---------------------------------------------------------------------


class _WriterThread(threading.Thread):
    def __init__(self, writer: RunWriter, depth: int = 2) -> None:
        super().__init__(name="workbench-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue[BatchRecord | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            try:
                self.writer.append(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised there
                self.error = exc

    def put(self, item: BatchRecord | None) -> None:
        while True:
            if self.error is not None and item is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


# --- the public entry point --------------------------------------------------------------------


class _Lock:
    """An exclusive flock on ``NAME.h5.lock`` for the whole capture: two writers never share a
    run, and readers can tell a live capture from an interrupted one."""

    def __init__(self, final: Path) -> None:
        self.path = lock_path(final)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise UserError(f"another capture is writing {final} right now") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self, remove: bool) -> None:
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)


def _check_output(out: Path, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if not out.parent.is_dir():
        raise UserError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"output {out} is a folder; give a file name such as {out / 'run.h5'}")
    partial = partial_path(out)
    if out.exists() and not (overwrite or resume):
        raise UserError(f"{out} exists; --overwrite replaces it (only once the new run is complete) "
                        "or --resume continues it")
    if partial.exists() and not (overwrite or resume):
        raise UserError(f"an interrupted capture exists at {partial}; --resume continues it, "
                        "--overwrite starts again")


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in RESUME_KEYS:
        if old.get(key) != new.get(key):
            return key
    return None


def capture(
    model: Model | str,
    prompts: Any,
    *,
    hooks: list[str] | tuple[str, ...] = ("residual",),
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    device: str | None = "auto",
    dtype: str = "float32",
    compression: str | None = None,
    top_k: int = 10,
    bos: str | None = None,
    truncate: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
) -> CaptureResult:
    """Capture activations of ``model`` on ``prompts`` into the run file ``out``.

    :param model: a loaded :class:`~workbench.models.model.Model` or a model name.
    :param prompts: strings, dicts (``{"prompt", "id", "answer", "wrong", "corrupted", ...}``),
        :class:`Prompt` objects, or the path of a ``.txt`` (one prompt per line) / ``.jsonl`` file.
    :param hooks: TransformerLens hook names, globs (``blocks.*.hook_resid_post``) or presets
        (``residual``, ``attention``, ``attention-full``, ``mlp``, ``lens``, ``all``).
    :param dtype: storage dtype: ``float32`` (exact), ``float16`` or ``bfloat16`` (stored as raw bits).
    :param compression: ``None``/``"none"``, ``"gzip"`` or ``"lzf"``.
    :param overwrite: replace an existing run (the old one stays until the new one is complete).
    :param resume: continue an interrupted capture of the same prompts and settings.
    :param dry_run: plan and estimate only; nothing is written.
    :raises UserError: bad input (nothing is written).
    """
    from workbench.models import load_model

    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    if dtype not in S.STORAGE_DTYPES:
        raise UserError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(S.STORAGE_DTYPES)}")
    if compression == "none":
        compression = None
    if compression is not None and compression not in COMPRESSIONS:
        raise UserError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if not 1 <= top_k <= 1000:
        raise UserError("top-k must be between 1 and 1000")
    final: Path | None = Path(out).expanduser().absolute() if out is not None else None
    if final is None and not dry_run:
        raise UserError("an output file is needed (--out RUN.h5)")
    if final is not None and not dry_run:
        _check_output(final, overwrite, resume)
    items = normalize(prompts)
    if isinstance(model, str):
        model = load_model(model, device=device, bos=bos)  # type: ignore[arg-type]
    elif bos is not None and bos != model.bos:
        raise UserError(f"the model was loaded with BOS policy {model.bos!r}; load it with bos={bos!r}")
    hook_items = list(hooks)
    plan = make_plan(model, items, hook_items, storage_dtype=dtype, compression=compression,
                     top_k=top_k, batch_size=batch_size, truncate=truncate)
    show = sys.stderr.isatty() if progress is None else progress
    if dry_run:
        return CaptureResult(final or Path(), 0, 0, 0, 0.0, 0, plan)
    assert final is not None
    for line in plan.summary():
        print(f"workbench: {line}", file=sys.stderr)
    settings = _settings(plan, hook_items, truncate)
    return _execute(plan, final, settings, resume=resume, show_progress=show)


def _execute(plan: CapturePlan, final: Path, settings: dict[str, Any], *, resume: bool,
             show_progress: bool) -> CaptureResult:
    import h5py

    from workbench import __version__

    partial = partial_path(final)
    lock = _Lock(final)
    done = False
    old = None
    try:
        start_at = 0
        if resume and final.exists() and not partial.exists():
            from workbench.store import open_run

            with open_run(final) as run:
                if len(run) == len(plan.prompts):
                    print(f"workbench: {final} is already complete ({len(run)} prompts)", file=sys.stderr)
                    done = True
                    return CaptureResult(final, len(run), 0, 0, 0.0, len(run), plan)
            raise UserError(f"{final} is complete with a different number of prompts; "
                            "use --overwrite to capture again")
        if resume and partial.exists():
            old = h5py.File(partial, "r", swmr=True)
            start_at = _check_resumable(old, plan, settings, partial)
            settings["resumed"] = [*_old_resumes(old), {"at_prompt": start_at,
                                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        needed = plan.estimated_bytes(start_at) + (partial.stat().st_size if old is not None else 0)
        free = shutil.disk_usage(final.parent).free
        if needed * 1.02 + (16 << 20) > free:
            raise UserError(f"the run needs about {_human(needed)} but {final.parent} has only "
                            f"{_human(free)} free")
        target = partial if old is None else partial.with_name(partial.name + ".tmp")
        writer = RunWriter(
            target, model_info=plan.model.info.to_dict(), settings=settings,
            hooks=plan.hooks.specs, planned_prompts=len(plan.prompts),
            storage_dtype=plan.storage_dtype, top_k=plan.top_k,
            has_lm_head=plan.has_lm_outputs, compression=plan.compression,
            tool_version=__version__, expected_tokens=plan.n_tokens,
            expected_elements={h.name: sum(h.feature_shape[0] * len(t) ** 2 for t in plan.token_ids)
                               for h in plan.hooks.specs if h.layout == "square"},
        )
        if old is not None:
            try:
                writer.copy_committed(old, start_at)
            except BaseException:
                writer.close()
                target.unlink(missing_ok=True)
                raise
            old.close()
            writer.move_to(partial)  # the copy holds everything the killed file committed
            fsync_dir(partial.parent)
            print(f"workbench: resuming after {start_at} committed prompts", file=sys.stderr)
        with gates_enabled(plan.model, plan.hooks.gates):
            result = _stream(plan, writer, start_at, show_progress)
        writer.close()
        os.replace(partial, final)
        fsync_dir(final.parent)
        done = True
        print(f"workbench: wrote {final} ({result.n_prompts:,} prompts, {_human(final.stat().st_size)}"
              f" in {result.seconds:.1f} s)", file=sys.stderr)
        result.path = final
        return result
    finally:
        if old is not None and old.id.valid:
            old.close()
        lock.release(remove=done)


def _old_resumes(old: Any) -> list[Any]:
    import json

    return list(json.loads(old[S.META_SETTINGS][()].decode()).get("resumed", []))


def _check_resumable(old: Any, plan: CapturePlan, settings: dict[str, Any], partial: Path) -> int:
    import json

    try:
        old_settings = json.loads(old[S.META_SETTINGS][()].decode())
        n_done = int(old[S.TOKEN_OFFSETS].shape[0]) - 1
    except (KeyError, ValueError) as exc:
        raise UserError(f"{partial} is not a resumable workbench run ({exc})") from None
    key = _first_difference(old_settings, settings)
    if key is not None:
        raise UserError(f"cannot resume {partial}: setting {key!r} differs from the interrupted "
                        f"capture ({S.dumps(old_settings.get(key))[:80]} vs "
                        f"{S.dumps(settings.get(key))[:80]})")
    if n_done > len(plan.prompts):
        raise UserError(f"cannot resume {partial}: it already holds {n_done} prompts, more than "
                        f"the {len(plan.prompts)} given")
    for i in range(n_done):
        old_id = read_ragged(old.__getitem__, S.PROMPT_ID, i).decode("utf-8")
        old_text = read_ragged(old.__getitem__, S.PROMPT_TEXT, i).decode("utf-8")
        if old_id != plan.prompts[i].id or old_text != plan.prompts[i].text:
            raise UserError(f"cannot resume {partial}: prompt {i} ({plan.prompts[i].id!r}) is not the "
                            "one already captured; resume needs the same prompts in the same order")
    return n_done


def _discard_if_empty(writer: RunWriter, start_at: int) -> None:
    """A capture that failed before committing anything leaves no file behind."""
    if writer.n_prompts == 0 and start_at == 0:
        writer.path.unlink(missing_ok=True)


def _stream(plan: CapturePlan, writer: RunWriter, start_at: int, show_progress: bool) -> CaptureResult:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    n_total = len(plan.prompts)
    thread = _WriterThread(writer)
    thread.start()
    t0 = time.monotonic()
    tokens_done = 0
    progress = Progress(
        TextColumn("capturing"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[written]}"),
        TimeRemainingColumn(), disable=not show_progress, transient=False,
    )
    # Prefer filling whole batches from the resume point so batch boundaries match a run that was
    # never interrupted (the same padding, hence the same numerics).
    batches = [list(range(s, min(s + plan.batch_size, n_total)))
               for s in range(start_at, n_total, plan.batch_size)]
    try:
        with progress:
            task = progress.add_task("capture", total=n_total, completed=start_at, rate="", written="")
            for idx in batches:
                record = run_batch(plan, idx)
                thread.put(record)
                tokens_done += record.n_tokens
                elapsed = max(1e-9, time.monotonic() - t0)
                progress.update(
                    task, completed=idx[-1] + 1,
                    rate=f"{tokens_done / elapsed:,.0f} tok/s",
                    written=f"{writer.bytes_written / 1e6:,.1f} MB written",
                )
        thread.put(None)
        thread.join()
    except KeyboardInterrupt:
        thread.put(None)
        thread.join()
        writer.close()
        _discard_if_empty(writer, start_at)
        raise CaptureInterrupted(
            f"interrupted: {writer.n_prompts} prompts are committed in {writer.path}; "
            "run the same command with --resume to continue"
        ) from None
    except BaseException:
        thread.put(None)
        thread.join()
        writer.close()
        _discard_if_empty(writer, start_at)
        raise
    if thread.error is not None:
        writer.close()
        _discard_if_empty(writer, start_at)
        raise thread.error
    seconds = time.monotonic() - t0
    if writer.n_prompts != n_total:
        raise RuntimeError(f"wrote {writer.n_prompts} prompts, expected {n_total}")
    return CaptureResult(writer.path, writer.n_prompts, writer.n_tokens, writer.bytes_written,
                         seconds, start_at, plan)
