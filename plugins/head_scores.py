"""Scores of attention patterns: the head-role scores of one prompt's pattern, the detection masks
they use, the mechanics checks (numpy), and induction on repeated random tokens run through the
live model (torch, imported inside). What each score means is in ``attention.py``'s docstring, whose analyses
(``head-roles``, ``attends-to``) use them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from workbench.hooknames import matches

SCORES = ("previous_token", "next_token", "duplicate_token", "induction", "first_token",
          "mean_distance", "entropy")

TL_SCORES = ("previous_token_tl", "duplicate_token_tl", "induction_tl")

DESCRIPTIONS = {
    "previous_token": "weight on the previous token",
    "next_token": "weight on the next token (bidirectional attention)",
    "duplicate_token": "weight on other occurrences of the same token",
    "induction": "weight on the token after the earlier occurrence (repeated random tokens)",
    "first_token": "weight on the first token (attention sink)",
    "mean_distance": "mean |query - key| distance, weighted by attention",
    "entropy": "entropy of the attention distribution (nats)",
}


# --- scores of one pattern -----------------------------------------------------------------------


def row_mean(weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean over the selected query rows of per-row values ``weights`` (heads, q)."""
    if not rows.any():
        return np.full(weights.shape[0], np.nan)
    return weights[:, rows].mean(axis=1)


def duplicate_mask(q_tokens: np.ndarray, k_tokens: np.ndarray, *, causal: bool, cross: bool) -> np.ndarray:
    """(q, k) True where key k holds the query's token at another position (earlier, if causal)."""
    same = q_tokens[:, None] == k_tokens[None, :]
    if not cross:
        np.fill_diagonal(same, False)
        if causal:
            same &= np.tri(len(q_tokens), len(k_tokens), -1, dtype=bool)
    return same


def induction_mask(tokens: np.ndarray) -> np.ndarray:
    """(q, k) True where k is the position right after an earlier occurrence of token q
    (TransformerLens' ``get_induction_head_detection_pattern``)."""
    dup = duplicate_mask(tokens, tokens, causal=True, cross=False)
    out = np.zeros_like(dup)
    out[:, 1:] = dup[:, :-1]
    return out & np.tri(len(tokens), dtype=bool)


def mask_scores(pattern: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row-mean score, TransformerLens "mul" score) per head for a detection mask."""
    p = pattern.astype(np.float64)
    on = (p * mask[None]).sum(axis=2)  # heads, q
    rows = np.asarray(mask.any(axis=1))
    tl = on.sum(axis=1) / p.sum(axis=(1, 2))
    return row_mean(on, rows), tl


def pattern_scores(pattern: np.ndarray, q_tokens: np.ndarray, k_tokens: np.ndarray, *,
                   causal: bool, cross: bool) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` (but induction) that applies, per head, for one prompt's
    pattern ``(heads, q, k)``; inapplicable ones are NaN."""
    p = pattern.astype(np.float64)
    h, nq, nk = p.shape
    nan = np.full(h, np.nan)
    out: dict[str, np.ndarray] = {}
    qi = np.arange(nq)
    total = p.sum(axis=(1, 2))
    if not cross:
        # one cell per row: read the off-diagonals instead of multiplying by a mask
        prev = p[:, qi[1:], qi[1:] - 1]  # heads, q - 1
        out["previous_token"] = prev.mean(axis=1) if nq > 1 else nan
        out["previous_token_tl"] = prev.sum(axis=1) / total
        if causal:
            out["next_token"] = nan
        else:
            out["next_token"] = p[:, qi[:-1], qi[:-1] + 1].mean(axis=1) if nq > 1 else nan
            out["previous_token_tl"] = nan
    else:
        out["previous_token"] = out["next_token"] = out["previous_token_tl"] = nan
    dup = duplicate_mask(q_tokens, k_tokens, causal=causal, cross=cross)
    out["duplicate_token"], out["duplicate_token_tl"] = mask_scores(p, dup)
    if not causal:
        out["duplicate_token_tl"] = nan
    rows = qi >= 1 if causal else np.ones(nq, dtype=bool)
    out["first_token"] = row_mean(p[:, :, 0], rows)
    if cross:
        out["mean_distance"] = nan
    else:
        dist = np.abs(qi[:, None] - np.arange(nk)[None, :])
        out["mean_distance"] = (p * dist[None]).sum(axis=2).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    out["entropy"] = -plogp.sum(axis=2).mean(axis=1)
    return out


def check_pattern(pattern: np.ndarray, *, causal: bool) -> dict[str, float]:
    """Mechanics of one stored pattern: the largest |row sum - 1|, and for causal attention the
    largest |value| above the diagonal and how many such values are not exactly zero."""
    p = pattern.astype(np.float64)
    out = {"max_row_sum_error": float(np.abs(p.sum(axis=2) - 1.0).max()) if p.size else 0.0}
    if causal:
        upper = np.triu(np.ones(p.shape[1:], dtype=bool), 1)
        above = p[:, upper]
        out["max_above_diagonal"] = float(np.abs(above).max()) if above.size else 0.0
        out["nonzero_above_diagonal"] = int(np.count_nonzero(above))
    return out


# --- induction on the live model -----------------------------------------------------------------


def repeated_sequences(model: Any, n: int, length: int, seed: int) -> tuple[np.ndarray, int]:
    """``n`` seeded sequences ``prefix + r + r`` (r: ``length`` random non-special token ids),
    the prefix being what the model's BOS policy puts before a text; returns (tokens, prefix
    length)."""
    rng = np.random.default_rng(seed)
    specials = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    vocab = int(model.info.d_vocab)
    pool = np.array([i for i in range(min(vocab, len(model.tokenizer))) if i not in specials])
    prefix_tokens = list(model.info.bos.prefix)
    prefix = [int(i) for i in model.tokenizer.convert_tokens_to_ids(prefix_tokens)] if prefix_tokens else []
    seqs = []
    for _ in range(n):
        r = rng.choice(pool, size=length, replace=len(pool) < length)
        seqs.append(np.concatenate([np.array(prefix, dtype=np.int64), r, r]))
    return np.stack(seqs).astype(np.int64), len(prefix)


def induction_scores(model: Any, n: int, length: int, seed: int,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Induction scores per (pattern hook, head) on repeated random tokens, with the loss on each
    half (in-context learning: the second half is predictable)."""
    import torch

    tokens, n_prefix = repeated_sequences(model, n, length, seed)
    names = [h for h in model.hook_names if matches("blocks.*.*attn.hook_pattern", h)]
    row: dict[str, list[np.ndarray]] = {h: [] for h in names}
    tl: dict[str, list[np.ndarray]] = {h: [] for h in names}
    first, second = [], []
    for s, seq in enumerate(tokens):
        t = torch.as_tensor(seq[None], device=model.device)
        with torch.inference_mode():
            logits, cache = model.bridge.run_with_cache(t, names_filter=names)
        logp = torch.log_softmax(logits[0].double(), -1)[:-1].gather(-1, t[0, 1:, None])[:, 0].cpu().numpy()
        # prediction of token j+1 at position j; the first copy's tokens are unpredictable
        first.append(-logp[n_prefix : n_prefix + length - 1].mean())
        second.append(-logp[n_prefix + length :].mean())
        mask = induction_mask(seq)
        for h in names:
            pattern = cache[h][0].float().cpu().numpy()
            r, t_ = mask_scores(pattern, mask)
            row[h].append(r)
            tl[h].append(t_)
        if progress:
            progress(s + 1, len(tokens))
    return {
        "row": {h: np.mean(v, axis=0) for h, v in row.items()},
        "tl": {h: np.mean(v, axis=0) for h, v in tl.items()},
        "loss_first_half": float(np.mean(first)), "loss_second_half": float(np.mean(second)),
        "n_prefix": n_prefix, "tokens": tokens,
    }
