"""One batch of a capture through the model: :func:`run_batch` runs the hooked forward pass (after
sampling, with ``--generate``) and hands each hook's values on as soon as they are computed;
``_lm_outputs`` reduces the logits to per-token loss and top-k predictions.

Batches are right-padded. Decoders run without an attention mask: a real position never attends to
a later (padding) one. Encoders and encoder-decoders get the attention mask (their attention is
bidirectional; T5's cross-attention also uses it). Only real positions — and, for attention, the
real query x key block — are stored, in the storage dtype (``_to_storage``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.capturing.sampling import generate, padded, prompt_seed
from workbench.errors import UserError
from workbench.store import schema as S
from workbench.store.batch import BatchRecord

if TYPE_CHECKING:
    from workbench.capturing.plan import CapturePlan


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


def run_batch(plan: CapturePlan, indices: list[int],
              on_act: Callable[[str, np.ndarray], None] | None = None) -> BatchRecord:
    """Run one batch through the model. Each hook's values go to ``on_act`` as soon as they are
    computed (or into the returned record's ``acts`` without one)."""
    import torch

    model = plan.model
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    gen_stats = None
    main = [plan.token_ids[i] for i in indices]
    if plan.generation is not None:
        gen = plan.generation
        main, gen_stats = generate(model, main, gen.n, gen.sampling,
                                   [prompt_seed(gen.seed, plan.first_index + i) for i in indices], pad=pad)
    seqs = {S.MAIN: main}
    if plan.dec_ids is not None:
        seqs[S.DEC] = [plan.dec_ids[i] for i in indices]
    lengths = {s: [len(t) for t in v] for s, v in seqs.items()}
    tokens, mask = padded(seqs[S.MAIN], pad, model.device)
    kwargs: dict[str, Any] = {}
    if plan.family != "decoder":
        kwargs["attention_mask"] = mask
    if S.DEC in seqs:
        kwargs["decoder_input"] = padded(seqs[S.DEC], pad, model.device)[0]
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
    # Without LM outputs a decoder's pass can end once every stored hook has fired: the layers
    # after the deepest one, the final norm and the unembedding (a fifth of SmolLM2's work)
    # compute nothing that is kept.
    stop_early = plan.family == "decoder" and not plan.has_lm_outputs
    n_specs = len(plan.hooks.specs)
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
            if stop_early and len(fired) == n_specs:
                raise _AllStored

        return fn

    if plan.family == "decoder":
        kwargs["use_cache"] = False  # no key-value cache to build: nothing decodes from this pass
    logits = None
    with torch.inference_mode():
        with model.bridge.hooks(fwd_hooks=[(s.name, make(s)) for s in plan.hooks.specs]):
            try:
                logits = model.forward(tokens, **kwargs)
            except _AllStored:
                pass
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


class _AllStored(Exception):
    """Raised by the last stored hook of a pass whose remaining computation nothing keeps."""


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
