"""Running a model over prompts and streaming the chosen activations into a run file.

The forward passes run in the calling thread. Each hook hands its (already sliced and converted)
values to one writer thread as soon as it fires, through a queue bounded in bytes; the writer does
all HDF5 work (h5py serialises every call behind one lock anyway) and commits the batch once its
tokens arrive. Writing thus overlaps the rest of the forward pass and the next batch, and memory
stays flat in the number of prompts.

Batches are right-padded. Decoders run without an attention mask: a real position never attends to
a later (padding) one. Encoders and encoder-decoders get the attention mask (their attention is
bidirectional; T5's cross-attention also uses it). Only real positions — and, for attention, the
real query x key block — are stored.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import queue
import secrets
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.capturing.hooks import HookPlan, gates_enabled, plan_hooks, select
from workbench.capturing.malloc import freed_memory_kept
from workbench.capturing.prompts import Prompt, normalize
from workbench.capturing.sampling import SamplingSettings, entropy, sampling_distribution
from workbench.errors import UserError
from workbench.paths import fsync_dir
from workbench.store import schema as S
from workbench.store.reader import lock_path, partial_path, read_ragged
from workbench.store.writer import BatchRecord, RunWriter, TokenField

if TYPE_CHECKING:
    from workbench.models.model import Model

COMPRESSIONS = ("none", "gzip", "lzf")
# Settings a resumed capture must share with the capture it continues.
RESUME_KEYS = ("model", "family", "hooks", "storage_dtype", "compression", "top_k", "batch_size",
               "bos", "truncate", "gates", "generation")
WRITE_BUDGET = 256 << 20  # bytes of activations waiting for the writer before hooks block
COMMIT_SECONDS = 2.0  # batches are committed together at most this often (see _WriterThread)


class CaptureInterrupted(UserError):
    """Ctrl-C: everything committed so far is kept; ``--resume`` continues."""

    exit_code = 130


@dataclass(frozen=True)
class Generation:
    """``--generate N``: sample N tokens after each prompt before capturing."""

    n: int
    sampling: SamplingSettings
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, **self.sampling.to_dict()}


@dataclass
class CapturePlan:
    """Everything decided before the first forward pass (what ``--dry-run`` prints)."""

    model: Model
    prompts: list[Prompt]
    token_ids: list[list[int]]
    """Main-stream input of each prompt (an encoder-decoder's encoder input)."""
    hooks: HookPlan
    storage_dtype: str
    compression: str | None
    predictions: int
    batch_size: int
    truncated: list[str] = field(default_factory=list)
    dec_ids: list[list[int]] | None = None
    """Encoder-decoders: the decoder input of each prompt (start token + target shifted right)."""
    targets: list[list[int]] | None = None
    """Encoder-decoders: the target at each decoder position (-1 where none was given)."""
    generation: Generation | None = None

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def streams(self) -> tuple[str, ...]:
        return (S.MAIN, S.DEC) if self.family == "encoder-decoder" else (S.MAIN,)

    @property
    def lm_stream(self) -> str:
        return S.DEC if self.family == "encoder-decoder" else S.MAIN

    @property
    def lm_target(self) -> str:
        return "same" if self.family == "encoder" else "next"

    @property
    def has_lm_outputs(self) -> bool:
        return self.model.info.has_lm_head

    def lengths(self, i: int) -> dict[str, int]:
        out = {S.MAIN: len(self.token_ids[i])}
        if self.dec_ids is not None:
            out[S.DEC] = len(self.dec_ids[i])
        if self.generation is not None:
            out[self.lm_stream] += self.generation.n
        return out

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths(i)[S.MAIN] for i in range(len(self.prompts)))

    def tokens_per_stream(self) -> dict[str, int]:
        return {s: sum(self.lengths(i)[s] for i in range(len(self.prompts))) for s in self.streams}

    def token_fields(self) -> tuple[TokenField, ...]:
        fields: list[TokenField] = []
        lm = self.lm_stream
        if self.has_lm_outputs:
            fields += [TokenField(lm, S.LOSS, "float32"),
                       TokenField(lm, S.TOPK_IDS, "int32", self.predictions),
                       TokenField(lm, S.TOPK_LOGPROBS, "float32", self.predictions)]
            if self.family == "encoder-decoder":
                fields.append(TokenField(lm, S.TARGET, "int32"))
        if self.generation is not None:
            fields += [TokenField(lm, name, "float32") for name in S.GEN_FIELDS]
        return tuple(fields)

    def _itemsize(self, kind: str) -> int:
        return 8 if kind == "int" else S.storage_numpy_dtype(self.storage_dtype).itemsize

    def prompt_bytes(self, i: int) -> int:
        lengths = self.lengths(i)
        total = sum(h.bytes_for(lengths, self._itemsize(h.kind)) for h in self.hooks.specs)
        total += sum(n * (4 + 8 + 6) for n in lengths.values())  # ids, str offsets, ~str bytes
        for tf in self.token_fields():
            total += lengths[tf.stream] * 4 * max(1, tf.width)
        return total + len(self.prompts[i].text.encode()) + 64

    def estimated_bytes(self, start: int = 0) -> int:
        return sum(self.prompt_bytes(i) for i in range(start, len(self.prompts)))

    def summary(self) -> list[str]:
        names = sum(1 + len(h.aliases) for h in self.hooks.specs)
        counts = ", ".join(f"{n:,} {s.replace('_', ' ')}" for s, n in self.tokens_per_stream().items())
        lines = [
            (f"capture: {len(self.prompts):,} prompts, {counts}, model "
             f"{self.model.name} (BOS policy '{self.model.bos}')"),
            (f"hooks: {len(self.hooks.specs)} distinct tensors stored ({names} hook names answer "
             f"to them), {self.storage_dtype}"
             + (f", {self.compression} compression" if self.compression else "")),
            f"estimated size: {_human(self.estimated_bytes())}",
        ]
        if self.generation is not None:
            g = self.generation
            lines.insert(1, f"generation: {g.n} tokens per prompt, temperature {g.sampling.temperature}, "
                            f"top-k {g.sampling.top_k}, top-p {g.sampling.top_p}, seed {g.seed}")
        if self.truncated:
            lines.append(f"truncated to {self.model.info.n_ctx} tokens: {len(self.truncated)} prompts")
        return lines

    def hook_table(self) -> list[str]:
        lines = []
        for h in self.hooks.specs:
            size = sum(h.bytes_for(self.lengths(i), self._itemsize(h.kind)) for i in range(len(self.prompts)))
            if h.layout == "square":
                shape = f"(heads, {h.axes[1]}, {h.axes[2]})"
            else:
                shape = "(" + ", ".join([h.axes[0], *map(str, h.feature_shape)]) + ")"
            alias = f"  = {', '.join(h.aliases[:3])}{' ...' if len(h.aliases) > 3 else ''}" if h.aliases else ""
            lines.append(f"  {h.name:45} {shape:28} {_human(size):>10}{alias}")
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


def _tokenize(model: Model, prompts: list[Prompt], truncate: bool, extra: int
              ) -> tuple[list[list[int]], list[str]]:
    """Token ids of every prompt; ``extra`` tokens (generation) must fit in the context too."""
    n_ctx = model.info.n_ctx
    out, truncated = [], []
    for p in prompts:
        ids = model.tokenize(p.text)
        if n_ctx and len(ids) + extra > n_ctx:
            room = n_ctx - extra
            if not truncate or room < 1:
                more = f" plus {extra} generated" if extra else ""
                raise UserError(
                    f"prompt {p.id!r} has {len(ids)} tokens{more}; {model.name} takes at most {n_ctx}"
                    + (" (--truncate keeps the first tokens)" if room >= 1 else "")
                )
            ids = ids[:room]
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


def _decoder_sequences(model: Model, prompts: list[Prompt]) -> tuple[list[list[int]], list[list[int]]]:
    """Teacher forcing for encoder-decoders: the decoder reads the start token followed by the
    target shifted right, and position t is scored on target[t]. The target text is the prompt's
    ``target`` field, else its ``answer``; without one the decoder reads only the start token."""
    start = int(model.bridge.original_model.config.decoder_start_token_id)
    dec_ids, targets = [], []
    for p in prompts:
        text = p.metadata.get("target", p.metadata.get("answer"))
        if text is None:
            dec_ids.append([start])
            targets.append([-1])
            continue
        if not isinstance(text, str) or not text:
            raise UserError(f"prompt {p.id!r}: 'target' must be a non-empty string")
        target = [int(t) for t in model.tokenizer(text, add_special_tokens=True)["input_ids"]]
        dec_ids.append([start, *target[:-1]])
        targets.append(target)
    return dec_ids, targets


def make_plan(
    model: Model,
    prompts: list[Prompt],
    hooks: list[str] | tuple[str, ...],
    *,
    storage_dtype: str,
    compression: str | None,
    predictions: int,
    batch_size: int,
    truncate: bool,
    generation: Generation | None = None,
) -> CapturePlan:
    if generation is not None and model.family != "decoder":
        raise UserError(f"--generate works with decoder models; {model.name} is an {model.family}")
    if generation is not None and not model.info.has_lm_head:
        raise UserError(f"{model.name} has no trained language-model head to generate with")
    token_ids, truncated = _tokenize(model, prompts, truncate, generation.n if generation else 0)
    dec_ids = targets = None
    if model.family == "encoder-decoder":
        dec_ids, targets = _decoder_sequences(model, prompts)
    hook_plan = plan_hooks(model, select(model, list(hooks)))
    if truncated:
        print(f"workbench: warning: {len(truncated)} prompts truncated to {model.info.n_ctx} tokens "
              f"(first: {truncated[0]!r})", file=sys.stderr)
    return CapturePlan(model=model, prompts=prompts, token_ids=token_ids, hooks=hook_plan,
                       storage_dtype=storage_dtype, compression=compression,
                       predictions=predictions, batch_size=batch_size, truncated=truncated,
                       dec_ids=dec_ids, targets=targets, generation=generation)


def _settings(plan: CapturePlan, hooks_requested: list[str], truncate: bool) -> dict[str, Any]:
    import torch
    import transformer_lens
    import transformers

    from workbench import __version__

    info = plan.model.info
    padding = ("right-padded batches, no attention mask (causal); only real positions stored"
               if plan.family == "decoder" else
               "right-padded batches with an attention mask; only real positions stored")
    bridge = plan.model.bridge
    all_names = list(bridge.hook_dict)
    return {
        "run_id": uuid.uuid4().hex,
        "model": {"name": info.name, "provenance": info.provenance.to_dict(), "dtype": info.dtype},
        "family": plan.family,
        # Every hook name of the model, so that whether a run holds what an analysis needs can
        # be decided later without the model (``workbench.analysis.missing_hooks``).
        "model_hooks": all_names,
        "gated_hooks": [n for n in all_names if bridge._gated_hook_reason(n) is not None],
        "unstorable_hooks": [name for name, _ in plan.hooks.skipped],
        "hooks": [h.to_dict() for h in plan.hooks.specs],
        "hooks_requested": hooks_requested,
        "gates": plan.hooks.gates,
        "storage_dtype": plan.storage_dtype,
        "compression": plan.compression,
        "top_k": plan.predictions,
        "lm_target": plan.lm_target,
        "batch_size": plan.batch_size,
        "bos": plan.model.bos,
        "truncate": truncate,
        "generation": plan.generation.to_dict() if plan.generation else None,
        "padding": padding,
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


def _padded(seqs: list[list[int]], pad: int, device: str) -> tuple[Any, Any]:
    import torch

    n_max = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n_max), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n_max), dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return tokens.to(device), mask.to(device)


def _generator(seed: int, index: int) -> Any:
    """The random stream of prompt ``index``: independent of batching and of resuming."""
    import torch

    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
    return g


def _generate(plan: CapturePlan, indices: list[int], pad: int) -> tuple[list[list[int]], list[dict[str, list[float]]]]:
    """Sample ``plan.generation.n`` tokens after each prompt of the batch. Rows are right-padded
    and each row's next token is read at its own last real position (causal: padding after it is
    never seen), so a batch generates exactly what each prompt would alone, up to rounding."""
    import torch

    gen = plan.generation
    assert gen is not None
    model = plan.model
    seqs = [list(plan.token_ids[i]) for i in indices]
    rngs = [_generator(gen.seed, i) for i in indices]
    stats: list[dict[str, list[float]]] = [{f: [] for f in S.GEN_FIELDS} for _ in indices]
    with torch.inference_mode():
        for _ in range(gen.n):
            tokens, _ = _padded(seqs, pad, model.device)
            logits = model.forward(tokens)
            for row, seq in enumerate(seqs):
                last = logits[row, len(seq) - 1]
                model_p = torch.softmax(last.to(torch.float64), dim=-1)
                p = sampling_distribution(last, gen.sampling)
                token = int(torch.multinomial(p.cpu(), 1, generator=rngs[row]))
                s = stats[row]
                s["sample_prob"].append(float(p[token]))
                s["sample_entropy"].append(entropy(p))
                s["model_prob"].append(float(model_p[token]))
                s["model_entropy"].append(entropy(model_p))
                seq.append(token)
    return seqs, stats


def run_batch(plan: CapturePlan, indices: list[int],
              on_act: Callable[[str, np.ndarray], None] | None = None) -> BatchRecord:
    """Run one batch through the model. Each hook's values go to ``on_act`` as soon as they are
    computed (or into the returned record's ``acts`` without one)."""
    import torch

    model = plan.model
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    gen_stats = None
    if plan.generation is not None:
        main, gen_stats = _generate(plan, indices, pad)
    else:
        main = [plan.token_ids[i] for i in indices]
    seqs = {S.MAIN: main}
    if plan.dec_ids is not None:
        seqs[S.DEC] = [plan.dec_ids[i] for i in indices]
    lengths = {s: [len(t) for t in v] for s, v in seqs.items()}
    tokens, mask = _padded(seqs[S.MAIN], pad, model.device)
    kwargs: dict[str, Any] = {}
    if plan.family != "decoder":
        kwargs["attention_mask"] = mask
    if S.DEC in seqs:
        kwargs["decoder_input"] = _padded(seqs[S.DEC], pad, model.device)[0]
    record = BatchRecord(
        prompt_ids=[plan.prompts[i].id for i in indices],
        texts=[plan.prompts[i].text for i in indices],
        metas=[S.dumps(plan.prompts[i].metadata) for i in indices],
        tokens={s: [np.asarray(t, dtype=np.int32) for t in v] for s, v in seqs.items()},
        str_tokens={s: [model.str_tokens(t) for t in v] for s, v in seqs.items()},
        n_input=[len(plan.token_ids[i]) for i in indices] if plan.lm_stream == S.MAIN
        else [len(plan.dec_ids[i]) for i in indices],  # type: ignore[index]
    )
    sink = on_act if on_act is not None else record.acts.__setitem__
    fired: set[str] = set()
    # Real (unpadded) rows of each stream in a (batch * width) flattening: one index_select per
    # hook gathers them. Where no padding is to be removed (all lengths equal, e.g. batch size 1)
    # the hooked tensor itself is handed over, without a copy, and the reference keeps it alive
    # until written. Like TransformerLens' own cache, this relies on the model not changing a
    # hooked activation in place afterwards; the oracle tests would catch one that did.
    rows = {s: _real_rows(lengths[s], max(lengths[s]), model.device) for s in seqs}
    unpadded = {s: len(set(v)) == 1 for s, v in lengths.items()}

    def make(spec: S.HookSpec):  # type: ignore[no-untyped-def]
        def fn(t: Any, hook: Any) -> None:
            if spec.layout == "square":
                q, k = spec.square_streams()
                record.square_sizes[spec.name] = [
                    t.shape[1] * nq * nk for nq, nk in zip(lengths[q], lengths[k])]
                if unpadded[q] and unpadded[k]:
                    values = t.reshape(-1)
                else:
                    values = torch.cat([t[b, :, :nq, :nk].reshape(-1)
                                        for b, (nq, nk) in enumerate(zip(lengths[q], lengths[k]))])
            elif unpadded[spec.stream_of_rows()]:
                values = t.flatten(0, 1)
            else:
                values = t.flatten(0, 1).index_select(0, rows[spec.stream_of_rows()])
            sink(spec.name, _to_storage(values, plan.storage_dtype, spec.name))
            fired.add(spec.name)

        return fn

    with torch.inference_mode():
        with model.bridge.hooks(fwd_hooks=[(s.name, make(s)) for s in plan.hooks.specs]):
            logits = model.forward(tokens, **kwargs)
        missing = [s.name for s in plan.hooks.specs if s.name not in fired]
        if missing:
            raise RuntimeError(f"hooks did not fire during capture: {missing}")
        if plan.has_lm_outputs:
            record.fields.update(_lm_outputs(plan, logits, seqs, indices))
    if gen_stats is not None:
        for name in S.GEN_FIELDS:
            values = [np.concatenate([np.full(lengths[S.MAIN][r] - len(s[name]), np.nan, np.float32),
                                      np.asarray(s[name], np.float32)]) for r, s in enumerate(gen_stats)]
            record.fields[f"{plan.lm_stream}/{name}"] = np.concatenate(values)
    return record


def _real_rows(lengths: list[int], width: int, device: str) -> Any:
    """Flat indices of the real positions of a right-padded (batch, width) block."""
    import torch

    return torch.cat([torch.arange(n) + b * width for b, n in enumerate(lengths)]).to(device)


LM_BLOCK = 16  # positions per block of the LM outputs' reductions (16 x vocab floats: cache-sized)
TOPK_GROUP = 64  # vocabulary entries per group in _topk_by_groups


def _topk_by_groups(x: Any, k: int) -> Any:
    """``torch.topk(x, k, -1)`` of a 2-D CPU tensor, 3x faster for a large vocabulary (SmolLM2's
    49,152: 0.33 ms against 1.08 ms per 16 positions; Gemma's 262,144: 0.57 against 3.2 ms).
    The maxima of groups of :data:`TOPK_GROUP` entries are one cheap vectorised pass; the ``k``
    groups with the largest maxima hold a top ``k`` (an element outside them has ``k`` group
    maxima at least as large), so the exact top ``k`` is taken among those groups' entries only.
    The values are the same; among equal values the index may differ (``torch.topk`` does not
    define it either)."""
    import torch

    n, vocab = x.shape
    groups = vocab // TOPK_GROUP
    if 4 * k * TOPK_GROUP > vocab:
        return torch.topk(x, k, dim=-1)
    maxima = x[:, : groups * TOPK_GROUP].reshape(n, groups, TOPK_GROUP).amax(-1)
    best = torch.topk(maxima, k, dim=-1).indices
    idx = (best[:, :, None] * TOPK_GROUP + torch.arange(TOPK_GROUP)).reshape(n, k * TOPK_GROUP)
    if groups * TOPK_GROUP < vocab:  # the last, partial group is always a candidate
        idx = torch.cat([idx, torch.arange(groups * TOPK_GROUP, vocab).expand(n, -1)], dim=-1)
    top = torch.topk(x.gather(-1, idx), k, dim=-1)
    return top.values, idx.gather(-1, top.indices)


def _lm_outputs(plan: CapturePlan, logits: Any, seqs: dict[str, list[list[int]]],
                indices: list[int]) -> dict[str, np.ndarray]:
    """Per-token loss and top-k log-probabilities at the real positions of the LM stream:
    ``log p = logit - logsumexp(logits)``. The reductions read the logits in place, a few
    positions at a time (no copy of a vocabulary-sized tensor, no full log-softmax, no work on
    padding): a block of 16 x vocabulary floats stays in the CPU cache through logsumexp's
    several passes, about 2.7x faster on a CPU than one call over the batch, with the same
    values (every position's reduction is its own)."""
    import torch

    lm = plan.lm_stream
    k = min(plan.predictions, logits.shape[-1])
    # On an accelerator, small blocks would only multiply kernel launches: one block per row.
    on_cpu = logits.device.type == "cpu"
    block = LM_BLOCK if on_cpu else max(1, logits.shape[1])
    nll, top_ids, top_lp, targets = [], [], [], []
    for b, seq in enumerate(seqs[lm]):
        if plan.lm_target == "same":
            t = seq
        elif plan.family == "encoder-decoder":
            assert plan.targets is not None
            t = plan.targets[indices[b]]
        else:  # the next token; none after the prompt's last position
            t = seq[1:]
        n = len(seq)
        target = torch.full((n,), -1, dtype=torch.long)
        target[: len(t)] = torch.tensor(t[:n], dtype=torch.long)
        target = target.to(logits.device)
        targets.append(target)
        for i in range(0, n, block):
            x = logits[b, i : min(n, i + block)]
            x = x if x.dtype == torch.float32 else x.float()
            tgt = target[i : i + x.shape[0]]
            lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, tgt.clamp(min=0)[:, None])[:, 0]
            nll.append(torch.where(tgt >= 0, lse - picked, torch.full_like(lse, float("nan"))))
            values, ids = _topk_by_groups(x, k) if on_cpu else torch.topk(x, k=k, dim=-1)
            top_ids.append(ids.to(torch.int32))
            top_lp.append(values - lse[:, None])

    def cat(parts: list[Any]) -> np.ndarray:
        return torch.cat(parts).cpu().numpy()

    out = {f"{lm}/{S.LOSS}": cat(nll), f"{lm}/{S.TOPK_IDS}": cat(top_ids),
           f"{lm}/{S.TOPK_LOGPROBS}": cat(top_lp)}
    if plan.family == "encoder-decoder":
        out[f"{lm}/{S.TARGET}"] = cat([t.to(torch.int32) for t in targets])
    return out


# --- the writer thread ---------------------------------------------------------------------


def _lower_priority(niceness: int = 10) -> None:
    """Make the calling thread yield the CPU to the forward pass. torch's intra-op threads wait
    for one another at the end of every parallel region, so a writer competing with them for a
    core stalls whole operations; at a lower priority it runs in their gaps instead (Linux sets
    niceness per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class _WriterThread(threading.Thread):
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

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put_act(self, name: str, values: np.ndarray) -> None:
        with self.cond:
            while self.pending and self.pending + values.nbytes > self.budget and self.error is None:
                self.cond.wait(0.2)
            self._check()
            self.pending += values.nbytes
        self.queue.put(("act", name, values))

    def put_commit(self, record: BatchRecord) -> None:
        self._check()
        self.queue.put(("commit", record, None))

    def finish(self) -> None:
        self.queue.put(("end", None, None))
        self.join()


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


def check_output(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse, before anything is loaded or written, an output that would clobber a run."""
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
) -> CaptureResult:
    """Capture activations of ``model`` on ``prompts`` into the run file ``out``.

    :param model: a loaded :class:`~workbench.models.model.Model` or a model name.
    :param prompts: strings, dicts (``{"prompt", "id", "answer", "wrong", "corrupted", "target",
        ...}``), :class:`Prompt` objects, or the path of a ``.txt`` / ``.jsonl`` file.
    :param hooks: TransformerLens hook names, globs (``blocks.*.hook_resid_post``) or presets
        (``residual``, ``attention``, ``attention-full``, ``mlp``, ``lens``, ``all``).
    :param dtype: storage dtype: ``float32`` (exact), ``float16`` or ``bfloat16`` (raw bits).
    :param compression: ``None``/``"none"``, ``"gzip"`` or ``"lzf"``.
    :param predictions: top-k next-token predictions stored per position.
    :param generate: sample this many tokens after each prompt (decoders) and capture the whole
        sequence; ``temperature`` (0 = greedy), ``top_k``, ``top_p`` and ``seed`` shape the sampling.
    :param overwrite: replace an existing run (the old one stays until the new one is complete).
    :param resume: continue an interrupted capture of the same prompts and settings.
    :param commit_seconds: commit finished batches together at most this often (0: every batch);
        a killed capture loses at most the batches of the last ``commit_seconds``, Ctrl-C none.
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
    if not 1 <= predictions <= 1000:
        raise UserError("predictions (top-k stored per position) must be between 1 and 1000")
    if generate < 0:
        raise UserError("--generate must be 0 or more")
    if not commit_seconds >= 0:
        raise UserError("--commit-every must be 0 or more seconds")
    generation = None
    if generate:
        # A seed is always recorded, so every run can be reproduced from its own settings.
        generation = Generation(generate, SamplingSettings(temperature, top_k, top_p),
                                seed if seed is not None else secrets.randbelow(2**31))
    elif top_k is not None or top_p is not None or seed is not None or temperature != 1.0:
        raise UserError("--temperature, --top-k, --top-p and --seed shape --generate N; give N")
    final: Path | None = Path(out).expanduser().absolute() if out is not None else None
    if final is None and not dry_run:
        raise UserError("an output file is needed (--out RUN.h5)")
    if final is not None and not dry_run:
        check_output(final, overwrite, resume)
    items = normalize(prompts)
    if isinstance(model, str):
        model = load_model(model, device=device, bos=bos)  # type: ignore[arg-type]
    elif bos is not None and bos != model.bos:
        raise UserError(f"the model was loaded with BOS policy {model.bos!r}; load it with bos={bos!r}")
    hook_items = list(hooks)
    plan = make_plan(model, items, hook_items, storage_dtype=dtype, compression=compression,
                     predictions=predictions, batch_size=batch_size, truncate=truncate,
                     generation=generation)
    show = sys.stderr.isatty() if progress is None else progress
    if dry_run:
        return CaptureResult(final or Path(), 0, 0, 0, 0.0, 0, plan)
    assert final is not None
    for line in plan.summary():
        print(f"workbench: {line}", file=sys.stderr)
    settings = _settings(plan, hook_items, truncate)
    return _execute(plan, final, settings, resume=resume, show_progress=show,
                    commit_seconds=commit_seconds)


def _execute(plan: CapturePlan, final: Path, settings: dict[str, Any], *, resume: bool,
             show_progress: bool, commit_seconds: float) -> CaptureResult:
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
            settings["run_id"] = json.loads(old[S.META_SETTINGS][()].decode()).get("run_id",
                                                                                   settings["run_id"])
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
            storage_dtype=plan.storage_dtype, compression=plan.compression,
            tool_version=__version__, streams=plan.streams, token_fields=plan.token_fields(),
            expected_tokens=plan.tokens_per_stream(),
            expected_batches=-(-len(plan.prompts) // plan.batch_size),
            expected_elements={h.name: sum(h.elements_for(plan.lengths(i)) for i in range(len(plan.prompts)))
                               for h in plan.hooks.specs if h.layout == "square"},
            vocab=plan.model.vocab_strings(),
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
        with gates_enabled(plan.model, plan.hooks.gates), freed_memory_kept():
            result = _stream(plan, writer, start_at, show_progress, commit_seconds)
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
    return list(json.loads(old[S.META_SETTINGS][()].decode()).get("resumed", []))


def _check_resumable(old: Any, plan: CapturePlan, settings: dict[str, Any], partial: Path) -> int:
    try:
        old_settings = json.loads(old[S.META_SETTINGS][()].decode())
        n_done = int(old[S.TOKEN_OFFSETS].shape[0]) - 1
    except (KeyError, ValueError) as exc:
        raise UserError(f"{partial} is not a resumable workbench run ({exc})") from None
    for key in RESUME_KEYS:
        if old_settings.get(key) != settings.get(key):
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


def _stream(plan: CapturePlan, writer: RunWriter, start_at: int, show_progress: bool,
            commit_seconds: float) -> CaptureResult:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    n_total = len(plan.prompts)
    thread = _WriterThread(writer, commit_seconds=commit_seconds)
    thread.start()
    t0 = time.monotonic()
    tokens_done = 0
    progress = Progress(
        TextColumn("capturing"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[written]}"),
        TimeRemainingColumn(), disable=not show_progress, transient=False,
    )
    # Batches start at the resume point, which is always a batch boundary: the resumed capture
    # forms exactly the batches an uninterrupted one would (the same padding, the same numerics).
    batches = [list(range(s, min(s + plan.batch_size, n_total)))
               for s in range(start_at, n_total, plan.batch_size)]

    def stop(discard: bool) -> None:
        thread.finish()
        writer.close()
        if discard:
            _discard_if_empty(writer, start_at)

    try:
        with progress:
            task = progress.add_task("capture", total=n_total, completed=start_at, rate="", written="")
            for idx in batches:
                record = run_batch(plan, idx, on_act=thread.put_act)
                thread.put_commit(record)
                tokens_done += sum(len(t) for t in record.tokens[S.MAIN])
                elapsed = max(1e-9, time.monotonic() - t0)
                progress.update(
                    task, completed=idx[-1] + 1,
                    rate=f"{tokens_done / elapsed:,.0f} tok/s",
                    written=f"{writer.bytes_written / 1e6:,.1f} MB written",
                )
        thread.finish()
    except KeyboardInterrupt:
        stop(discard=True)
        raise CaptureInterrupted(
            f"interrupted: {writer.n_prompts} prompts are committed in {writer.path}; "
            "run the same command with --resume to continue"
        ) from None
    except BaseException:
        stop(discard=True)
        raise
    if thread.error is not None:
        writer.close()
        _discard_if_empty(writer, start_at)
        raise thread.error
    seconds = time.monotonic() - t0
    if writer.n_prompts != n_total:
        raise RuntimeError(f"wrote {writer.n_prompts} prompts, expected {n_total}")
    return CaptureResult(writer.path, writer.n_prompts, writer.n_tokens[S.MAIN], writer.bytes_written,
                         seconds, start_at, plan)
