"""A run written without a model: seeded random numbers with the shapes and invariants of a real
capture (attention rows that are causal softmaxes, a residual stream, loss and top-k predictions,
a vocabulary). For tests of the reader and the UI that must not depend on torch's numerics, for
benchmarks of opening big runs, and to watch a live run grow (``delay``).

    python -m workbench.store.synthetic OUT.h5 --prompts 50 --delay 0.2

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.store import schema as S
from workbench.store.files import partial_path
from workbench.store.settings import RecordedModel, RunSettings
from workbench.store.transaction import RunLock
from workbench.store.writer import BatchRecord, RunWriter, TokenField

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "park", "when",
         "Mary", "John", "went", "store", "gave", "drink", "Paris", "is", "capital", "of",
         "France", "it", "was", "tired", ".", ","]


def _vocab() -> list[str]:
    return ["<s>"] + [" " + w if w not in ".," else w for w in WORDS]


def synthetic_prompts(n: int, seed: int, lo: int = 4, hi: int = 12) -> list[list[int]]:
    """Token ids (BOS first) of ``n`` prompts of ``lo``..``hi`` tokens."""
    rng = np.random.default_rng(seed)
    return [[0, *rng.integers(1, len(WORDS) + 1, size=int(rng.integers(lo - 1, hi))).tolist()]
            for _ in range(n)]


@dataclass
class PlantedDictionary:
    """Ground truth for dictionary learning: every token's ``hook`` activation is a sparse,
    non-negative combination of known unit ``directions`` (``active`` of them, chosen uniformly,
    each with a magnitude uniform in ``scale``) plus Gaussian noise of standard deviation
    ``noise`` per dimension. Deterministic per prompt (``seed``, prompt index)."""

    directions: np.ndarray
    """``(n_features, d_model)``, unit rows (:func:`random_directions`)."""
    hook: str = "blocks.0.hook_resid_post"
    active: int = 3
    scale: tuple[float, float] = (1.0, 3.0)
    noise: float = 0.01
    seed: int = 0

    def edit(self, i: int, hook: str, acts: np.ndarray) -> np.ndarray:
        if hook != self.hook:
            return acts
        rng = np.random.default_rng((self.seed, i))
        n, d = acts.shape
        out = rng.normal(scale=self.noise, size=(n, d))
        chosen = np.argsort(rng.random((n, len(self.directions))), axis=1)[:, : self.active]
        coef = rng.uniform(*self.scale, size=(n, self.active))
        out += np.einsum("ta,tad->td", coef, self.directions[chosen])
        return out.astype(np.float32)


def random_directions(n: int, d_model: int, seed: int = 0) -> np.ndarray:
    """``n`` random unit vectors in ``d_model`` dimensions, ``(n, d_model)``."""
    v = np.random.default_rng(seed).normal(size=(n, d_model))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_synthetic_run(path: str | os.PathLike[str], *, n_prompts: int = 8, n_layers: int = 2,
                        n_heads: int = 2, d_model: int = 16, lengths: tuple[int, int] = (4, 12),
                        seed: int = 0, top_k: int = 5, batch_size: int = 1, delay: float = 0.0,
                        keep_partial: bool = False, metadata: list[dict[str, Any]] | None = None,
                        edit: Callable[[int, str, np.ndarray], np.ndarray] | None = None,
                        commit_every: int = 1, extra_tokens: tuple[bytes, ...] = (),
                        specials: tuple[str, ...] = (),
                        prompts: list[list[int]] | None = None,
                        planted: PlantedDictionary | None = None) -> Path:
    """Write a decoder run at ``path`` and return it. Stores ``hook_embed``,
    ``blocks.L.hook_resid_post`` and ``blocks.L.attn.hook_pattern`` for every layer, loss and
    top-k predictions, and a vocabulary. With ``delay``, sleeps that long after each committed
    batch while holding the run's lock, so readers see a capture in progress.

    ``metadata`` gives each prompt's JSONL fields (e.g. ``{"label": "positive"}``); ``edit(i,
    hook, acts)`` returns prompt ``i``'s ``(tokens, d_model)`` activations of ``hook`` to store in
    place of the random ones (to plant a known structure, such as a direction). ``commit_every``
    batches are written, then committed together (as a capture does with ``--commit-every``).

    The vocabulary is ``<s>`` (special), the words, then ``extra_tokens`` (raw bytes, such as
    byte-level pieces; each decoded on its own, ``�`` where it is not UTF-8, as a tokenizer does)
    and ``specials`` (special tokens that decode to ``''``, as some tokenizers' do); ``prompts``
    gives the prompts' token ids instead of random ones. ``planted`` replaces one hook's
    activations with sparse combinations of known directions (applied before ``edit``)."""
    if planted is not None:
        user_edit = edit

        def edit(i: int, hook: str, acts: np.ndarray) -> np.ndarray:
            acts = planted.edit(i, hook, acts)
            return user_edit(i, hook, acts) if user_edit is not None else acts

    final = Path(path)
    partial = partial_path(final)
    rng = np.random.default_rng(seed)
    raw = [v.encode() for v in _vocab()] + list(extra_tokens) + [name.encode() for name in specials]
    vocab = _vocab() + [p.decode("utf-8", "replace") for p in extra_tokens] + [""] * len(specials)
    special_ids = [0, *range(len(raw) - len(specials), len(raw))]
    if prompts is None:
        prompts = synthetic_prompts(n_prompts, seed, *lengths)
    n_prompts = len(prompts)
    hooks = [S.HookSpec("hook_embed", "token", (d_model,), ("pos", "d_model"))]
    for layer in range(n_layers):
        hooks.append(S.HookSpec(f"blocks.{layer}.attn.hook_pattern", "square", (n_heads,),
                                ("head", "query_pos", "key_pos")))
        hooks.append(S.HookSpec(f"blocks.{layer}.hook_resid_post", "token", (d_model,),
                                ("pos", "d_model"), aliases=(f"blocks.{layer + 1}.hook_resid_pre",)
                                if layer + 1 < n_layers else ()))
    model_hooks = sorted({n for h in hooks for n in (h.name, *h.aliases)})
    settings = RunSettings(
        run_id=f"synthetic-{seed}", family="decoder",
        model=RecordedModel(name="synthetic", provenance={"source": "synthetic", "seed": seed},
                            dtype="float32"),
        model_hooks=model_hooks, gated_hooks=[], unstorable_hooks=[],
        hooks=[h.to_dict() for h in hooks], hooks_requested=["synthetic"],
        storage_dtype="float32", compression=None, top_k=top_k, lm_target="next",
        batch_size=batch_size, bos="prepend", truncate=False, generation=None,
        versions={"workbench": "synthetic"}, resumed=[],
    )
    model_info = {"name": "synthetic", "family": "decoder", "architecture": "synthetic",
                  "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_heads,
                  "d_model": d_model, "d_vocab": len(vocab), "n_ctx": 64,
                  "provenance": settings.model.provenance, "bos": {"policy": "prepend"}}
    fields = (TokenField(S.MAIN, S.LOSS, "float32"), TokenField(S.MAIN, S.TOPK_IDS, "int32", top_k),
              TokenField(S.MAIN, S.TOPK_LOGPROBS, "float32", top_k))
    lock = RunLock(final)
    writer = RunWriter(partial, model_info=model_info, settings=settings, hooks=hooks,
                       planned_prompts=n_prompts, storage_dtype="float32", compression=None,
                       tool_version="synthetic", token_fields=fields, vocab=vocab,
                       vocab_bytes=raw, special_ids=special_ids)
    waiting: list[BatchRecord] = []  # batches written, to be committed together
    try:
        for start in range(0, n_prompts, batch_size):
            batch = prompts[start : start + batch_size]
            record = BatchRecord(
                prompt_ids=[S.default_prompt_id(start + j) for j in range(len(batch))],
                texts=[b"".join(raw[t] for t in ids[1:]).decode("utf-8", "replace").strip()
                       for ids in batch],
                metas=[json.dumps(metadata[start + j] if metadata else {}) for j in range(len(batch))],
                tokens={S.MAIN: [np.asarray(ids, np.int32) for ids in batch]},
                str_tokens={S.MAIN: [[vocab[t] for t in ids] for ids in batch]},
                n_input=[len(ids) for ids in batch])
            n_tok = sum(len(ids) for ids in batch)
            for h in hooks:
                if h.layout == "square":
                    blocks = []
                    for ids in batch:
                        n = len(ids)
                        scores = rng.normal(size=(n_heads, n, n)) * 2
                        scores[:, np.triu(np.ones((n, n), bool), 1)] = -np.inf
                        p = np.exp(scores - scores.max(-1, keepdims=True))
                        blocks.append((p / p.sum(-1, keepdims=True)).astype(np.float32).reshape(-1))
                    record.square_sizes[h.name] = [len(b) for b in blocks]
                    writer.write_act(h.name, np.concatenate(blocks))
                else:
                    acts = rng.normal(size=(n_tok, d_model)).astype(np.float32)
                    if edit is not None:
                        ends = np.cumsum([len(ids) for ids in batch])
                        acts = np.concatenate([edit(start + j, h.name, part).astype(np.float32)
                                               for j, part in enumerate(np.split(acts, ends[:-1]))])
                    writer.write_act(h.name, acts)
            logits = rng.normal(size=(n_tok, len(vocab))) * 3
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            order = np.argsort(-logp, axis=-1)[:, :top_k]
            nxt = np.concatenate([np.append(np.asarray(ids[1:]), -1) for ids in batch])
            loss = np.where(nxt >= 0, -logp[np.arange(n_tok), np.maximum(nxt, 0)], np.nan)
            record.fields = {f"{S.MAIN}/{S.LOSS}": loss.astype(np.float32),
                             f"{S.MAIN}/{S.TOPK_IDS}": order.astype(np.int32),
                             f"{S.MAIN}/{S.TOPK_LOGPROBS}":
                                 np.take_along_axis(logp, order, -1).astype(np.float32)}
            waiting.append(record)
            if len(waiting) == commit_every or start + batch_size >= n_prompts:
                writer.commit(BatchRecord.merge(waiting))
                waiting = []
            if delay:
                time.sleep(delay)
        writer.close()
        if not keep_partial:
            os.replace(partial, final)
    finally:
        writer.close()
        lock.release(remove=True)
    return partial if keep_partial else final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--d-model", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args(argv)
    write_synthetic_run(a.out, n_prompts=a.prompts, n_layers=a.layers, n_heads=a.heads,
                        d_model=a.d_model, lengths=(a.min_tokens, a.max_tokens), seed=a.seed,
                        delay=a.delay)


if __name__ == "__main__":
    main()
