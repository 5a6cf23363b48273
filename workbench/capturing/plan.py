"""Planning a capture: everything decided before the first forward pass (what ``--dry-run``
prints). :func:`make_plan` tokenizes the prompts (and an encoder-decoder's decoder inputs),
resolves the hooks (:mod:`workbench.capturing.hooks`) into a :class:`CapturePlan`, which
estimates the run's size and lays out its datasets; :func:`build_settings` makes the run's
settings document (:class:`~workbench.store.settings.RunSettings`).
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.capturing.hooks import HookPlan, plan_hooks, select
from workbench.capturing.prompts import Prompt
from workbench.capturing.sampling import Generation
from workbench.errors import UserError
from workbench.store import schema as S
from workbench.store.batch import TokenField
from workbench.store.settings import RecordedModel, RunSettings
from workbench.store.transaction import human_bytes

if TYPE_CHECKING:
    from workbench.models.model import Model


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
    first_index: int = 0
    """The capture-wide index of ``prompts[0]``: a sharded capture's unit starts further on
    (each prompt's sampling seed follows its capture-wide index)."""
    chat: dict[str, Any] | None = None
    """A chat capture: the template recorded (:func:`workbench.models.chat.chat_record`); the
    prompts' texts are already laid out by it and are tokenized with the BOS policy ``none``."""

    @property
    def bos(self) -> str:
        """The BOS policy the prompts are tokenized with."""
        return "none" if self.chat else self.model.bos

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
        """Loss and top-k are computed and stored: the model has a trained LM head and
        ``predictions`` is not 0."""
        return self.model.info.has_lm_head and self.predictions > 0

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

    def batches(self, start: int = 0) -> list[list[int]]:
        """Prompt indices of each batch from prompt ``start`` on. A resumed capture starts at its
        resume point, which is always a batch boundary: it forms exactly the batches an
        uninterrupted one would (the same padding, the same numerics)."""
        n = len(self.prompts)
        return [list(range(s, min(s + self.batch_size, n))) for s in range(start, n, self.batch_size)]

    def writer_layout(self) -> dict[str, Any]:
        """The :class:`~workbench.store.writer.RunWriter` arguments that follow from the plan
        (all but the settings document and the version)."""
        n = len(self.prompts)
        return dict(
            model_info=self.model.info.to_dict(), hooks=self.hooks.specs, planned_prompts=n,
            storage_dtype=self.storage_dtype, compression=self.compression, streams=self.streams,
            token_fields=self.token_fields(), expected_tokens=self.tokens_per_stream(),
            expected_batches=-(-n // self.batch_size),
            expected_elements={h.name: sum(h.elements_for(self.lengths(i)) for i in range(n))
                               for h in self.hooks.specs if h.layout == "square"},
            vocab=self.model.vocab_strings(), vocab_bytes=self.model.vocab_bytes(),
            special_ids=self.model.special_ids(),
        )

    def summary(self) -> list[str]:
        names = sum(1 + len(h.aliases) for h in self.hooks.specs)
        counts = ", ".join(f"{n:,} {s.replace('_', ' ')}" for s, n in self.tokens_per_stream().items())
        lines = [
            (f"capture: {len(self.prompts):,} prompts, {counts}, model "
             f"{self.model.name} (BOS policy '{self.model.bos}')"),
            (f"hooks: {len(self.hooks.specs)} distinct tensors stored ({names} hook names answer "
             f"to them), {self.storage_dtype}"
             + (f", {self.compression} compression" if self.compression else "")),
            f"estimated size: {human_bytes(self.estimated_bytes())}",
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
            lines.append(f"  {h.name:45} {shape:28} {human_bytes(size):>10}{alias}")
        for name, why in self.hooks.skipped:
            lines.append(f"  skipped {name}: {why}")
        return lines


# --- planning -------------------------------------------------------------------------------------


def tokenize(model: Model, prompts: list[Prompt], truncate: bool, extra: int, bos: str | None = None
              ) -> tuple[list[list[int]], list[str]]:
    """Token ids of every prompt (under ``bos``, else the model's policy); ``extra`` tokens
    (generation) must fit in the context too."""
    n_ctx = model.info.n_ctx
    out, truncated = [], []
    for p in prompts:
        ids = model.tokenize(p.text, bos=bos)  # type: ignore[arg-type]
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
            n_corrupted = len(model.tokenize(corrupted, bos=bos))  # type: ignore[arg-type]
            if n_corrupted != len(ids):
                raise UserError(
                    f"prompt {p.id!r}: its corrupted prompt has {n_corrupted} tokens, the prompt "
                    f"{len(ids)}; patching needs equal lengths"
                )
        out.append(ids)
    return out, truncated


def decoder_sequences(model: Model, prompts: list[Prompt]) -> tuple[list[list[int]], list[list[int]]]:
    """Teacher forcing for encoder-decoders: the decoder reads the start token followed by the
    target shifted right, and position t is scored on target[t]. The target text is the prompt's
    ``target`` field, else its ``answer``; without one the decoder reads only the start token."""
    start = model.decoder_start_token_id
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
    first_index: int = 0,
    chat: dict[str, Any] | None = None,
) -> CapturePlan:
    if generation is not None and model.family != "decoder":
        raise UserError(f"--generate works with decoder models; {model.name} is an {model.family}")
    if generation is not None and not model.info.has_lm_head:
        raise UserError(f"{model.name} has no trained language-model head to generate with")
    token_ids, truncated = tokenize(model, prompts, truncate, generation.n if generation else 0,
                                    bos="none" if chat else None)
    dec_ids = targets = None
    if model.family == "encoder-decoder":
        dec_ids, targets = decoder_sequences(model, prompts)
    hook_plan = plan_hooks(model, select(model, list(hooks)))
    if truncated:
        print(f"workbench: warning: {len(truncated)} prompts truncated to {model.info.n_ctx} tokens "
              f"(first: {truncated[0]!r})", file=sys.stderr)
    return CapturePlan(model=model, prompts=prompts, token_ids=token_ids, hooks=hook_plan,
                       storage_dtype=storage_dtype, compression=compression,
                       predictions=predictions, batch_size=batch_size, truncated=truncated,
                       dec_ids=dec_ids, targets=targets, generation=generation,
                       first_index=first_index, chat=chat)


def package_version(distribution: str, module: Any = None) -> str:
    """The installed version of ``distribution``, from its package metadata (TransformerLens 4
    has no ``__version__``), else ``module.__version__``, else ``unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def build_settings(plan: CapturePlan, hooks_requested: list[str], truncate: bool) -> RunSettings:
    """The settings document of a new run of ``plan`` (a fresh ``run_id``)."""
    import torch
    import transformer_lens
    import transformers

    from workbench.version import __version__

    model = plan.model
    info = model.info
    padding = ("right-padded batches, no attention mask (causal); only real positions stored"
               if plan.family == "decoder" else
               "right-padded batches with an attention mask; only real positions stored")
    all_names = list(model.bridge.hook_dict)
    return RunSettings(
        run_id=uuid.uuid4().hex,
        model=RecordedModel(name=info.name, provenance=info.provenance.to_dict(), dtype=info.dtype),
        family=plan.family,
        # Every hook name of the model, so that whether a run holds what an analysis needs can
        # be decided later without the model (``workbench.analysis.missing_inputs``).
        model_hooks=all_names,
        gated_hooks=[n for n in all_names if model.gated_hook_reason(n) is not None],
        unstorable_hooks=[name for name, _ in plan.hooks.skipped],
        hooks=[h.to_dict() for h in plan.hooks.specs],
        hooks_requested=hooks_requested,
        gates=plan.hooks.gates,
        storage_dtype=plan.storage_dtype,
        compression=plan.compression,
        top_k=plan.predictions,
        lm_target=plan.lm_target,
        batch_size=plan.batch_size,
        bos=plan.bos,
        chat=plan.chat,
        truncate=truncate,
        generation=plan.generation.to_dict() if plan.generation else None,
        padding=padding,
        numerics=info.numerics,
        device=model.device,
        versions={
            "workbench": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformer_lens": package_version("transformer-lens", transformer_lens),
        },
        resumed=[],
    )
