"""The measures of a run diff, in numpy (float64), and how prompts of two runs are paired.

- relative L2 per token: ``||a - b|| / ||a||`` (run A is the reference; 0 where both are 0);
- cosine similarity per token: ``a·b / (||a|| ||b||)`` (1 where both are 0);
- Jensen–Shannon divergence per attention row, in nats (0 to ln 2):
  ``JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m)``, ``m = ½ (p + q)``;
- KL between next-token distributions, in nats: exact from full log-probabilities, or, from the
  top-k a run stores, over the tokens both top-k lists name with the rest of each distribution
  pooled into one outcome — a lower bound of the true KL (merging outcomes never raises KL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TINY = 1e-300


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: ``||a - b|| / ||a||``; rows are the first axis, the rest is flattened."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = np.linalg.norm(a - b, axis=1)
    den = np.linalg.norm(a, axis=1)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    out[(den == 0) & (num > 0)] = np.inf
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: cosine similarity (1 where both rows are zero, 0 where one is)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    out = np.divide(dot, na * nb, out=np.zeros_like(dot), where=(na * nb) > 0)
    out[(na == 0) & (nb == 0)] = 1.0
    return np.clip(out, -1.0, 1.0)


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x * log(y)`` with 0 where ``x == 0``."""
    return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``KL(p‖q)`` along the last axis, in nats (``p`` and ``q`` are distributions)."""
    p = p.astype(np.float64)
    q = np.maximum(q.astype(np.float64), TINY)
    return np.sum(_xlogy(p, p) - _xlogy(p, q), axis=-1)


def js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence along the last axis, in nats."""
    p, q = p.astype(np.float64), q.astype(np.float64)
    m = 0.5 * (p + q)
    return np.maximum(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)


def kl_from_logprobs(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """Exact ``KL(A‖B)`` per row from full log-probabilities ``(n, vocab)``."""
    la, lb = la.astype(np.float64), lb.astype(np.float64)
    return np.maximum(np.sum(np.exp(la) * (la - lb), axis=-1), 0.0)


def kl_topk(ids_a: np.ndarray, lp_a: np.ndarray, ids_b: np.ndarray, lp_b: np.ndarray) -> np.ndarray:
    """Per position, a lower bound of ``KL(A‖B)`` from each run's top-k ids and log-probabilities
    ``(n, k)``: the tokens both lists name, and one outcome for the rest of each distribution."""
    out = np.zeros(len(ids_a))
    for t in range(len(ids_a)):
        pb = dict(zip(ids_b[t].tolist(), np.exp(lp_b[t].astype(np.float64)).tolist(), strict=True))
        common = [(float(np.exp(la)), pb[i]) for i, la in zip(ids_a[t].tolist(), lp_a[t].tolist(), strict=True)
                  if i in pb]
        p = np.array([c[0] for c in common] + [0.0])
        q = np.array([c[1] for c in common] + [0.0])
        p[-1], q[-1] = max(0.0, 1.0 - p[:-1].sum()), max(0.0, 1.0 - q[:-1].sum())
        out[t] = max(0.0, float(kl(p, q)))
    return out


@dataclass
class Pair:
    a: int
    b: int
    id: str
    n_tokens: int
    same_tokens: bool


def pair_prompts(ids_a: list[str], ids_b: list[str], texts_a: list[str], texts_b: list[str]
                 ) -> tuple[str, list[tuple[int, int, str]]]:
    """Pair the prompts of two runs: by id where both runs' ids are unique and some are shared,
    else by text (the first unused occurrence). Returns ``("id" | "text", [(i, j, label)])`` in
    run A's order."""
    if len(set(ids_a)) == len(ids_a) and len(set(ids_b)) == len(ids_b):
        where = {x: j for j, x in enumerate(ids_b)}
        pairs = [(i, where[x], x) for i, x in enumerate(ids_a) if x in where]
        if pairs:
            return "id", pairs
    free: dict[str, list[int]] = {}
    for j, t in enumerate(texts_b):
        free.setdefault(t, []).append(j)
    pairs = []
    for i, t in enumerate(texts_a):
        if free.get(t):
            pairs.append((i, free[t].pop(0), ids_a[i]))
    return "text", pairs


def summary(values: np.ndarray) -> dict[str, Any]:
    """Mean, max (and where) of a measure, finite values only."""
    v = values[np.isfinite(values)]
    if not len(v):
        return {"mean": None, "max": None, "min": None, "n": 0}
    return {"mean": float(v.mean()), "max": float(v.max()), "min": float(v.min()), "n": len(v)}
