"""Attention step by step, from a run's stored hooks: one head, one query token.

What an introduction to transformers draws on the board, computed from what the model really
computed and checked against what it stored:

1. the query vector ``q`` of the focused token (after the rotary embedding where the model
   rotates: ``hook_rot_q`` / ``hook_rot_k``; the plain ``hook_q`` / ``hook_k`` are taken before it
   and do not give the model's scores),
2. each key's dot product ``q·k``,
3. the scaling by ``1/√d_head`` (T5 does not scale; it adds a learned relative position bias,
   shown as ``stored − q·k``),
4. the mask (future keys of causal attention: ``−∞``),
5. the softmax to weights,
6. the weighted sum of the value vectors, ``z = Σ w·v``.

Every computed row is compared with the stored hook it should equal (``hook_attn_scores``,
``hook_pattern``, ``hook_z``), and the largest difference is reported, so a learner sees the
numbers agree, not only that they are claimed to. Grouped-query heads read key/value head
``head // (n_heads // n_kv_heads)``. Where the TransformerLens bridge aliases
``hook_attn_scores`` to the pattern (the hook then holds post-softmax weights), the scores are
only computed, and the notes say so.

numpy and the run reader only: no model, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from workbench.errors import UserError
from workbench.hooknames import depth_key, part_of

if TYPE_CHECKING:
    from workbench.store.reader import Run

MASKED_BELOW = -1e30
"""A stored score at or below this is a masked one: the bridge fills masked cells with the dtype's
most negative finite value (−3.4e38 in float32) rather than −∞."""


def attention_blocks(run: Run) -> list[str]:
    """Prefixes of the attention modules whose query, key and value the run stores
    (``blocks.3.attn``, ``decoder_blocks.0.cross_attn``), in the order the forward pass reaches
    them."""
    found = []
    for name in run.aliases:
        if name.endswith(".hook_q"):
            prefix = name[: -len(".hook_q")]
            if all(f"{prefix}.{h}" in run.aliases for h in ("hook_k", "hook_v")):
                found.append(prefix)
    return sorted(set(found), key=lambda p: depth_key(p + ".hook_q"))


def is_scores_aliased(run: Run, prefix: str) -> bool:
    """Whether ``PREFIX.hook_attn_scores`` is the same stored tensor as ``PREFIX.hook_pattern``
    (the bridge aliases them on some models: the "scores" are then post-softmax weights)."""
    scores, pattern = run.aliases.get(f"{prefix}.hook_attn_scores"), run.aliases.get(f"{prefix}.hook_pattern")
    return scores is not None and scores == pattern


def is_scores_hook(run: Run, hook: str) -> bool:
    """Whether ``hook`` holds pre-softmax attention scores (a ``hook_attn_scores`` that is not
    the pattern under another name)."""
    return hook.endswith("hook_attn_scores") and not is_scores_aliased(run, hook[: -len(".hook_attn_scores")])


def score_scale(run: Run) -> tuple[float, str]:
    """The factor the model multiplies ``q·k`` by, and how to say it."""
    info = run.model_info
    d_head = int(info["d_head"])
    if str(info.get("architecture", "")).startswith(("T5", "MT5", "UMT5")):
        return 1.0, "× 1 (T5 does not scale)"
    attn_scale = float((info.get("tl_config") or {}).get("attn_scale", -1.0) or -1.0)
    if attn_scale > 0 and not math.isclose(attn_scale, math.sqrt(d_head)):
        return 1.0 / attn_scale, f"÷ {attn_scale:g} (this model's attention scale)"
    return 1.0 / math.sqrt(d_head), f"÷ √d_head = ÷ √{d_head} = ÷ {math.sqrt(d_head):.4g}"


@dataclass
class Steps:
    """The computation of one head's output at one query position (see the module docstring)."""

    prefix: str
    head: int
    kv_head: int
    n_heads: int
    n_kv_heads: int
    query_pos: int
    query_token: str
    key_tokens: list[str]
    q_hook: str
    k_hook: str
    q: np.ndarray
    """(d_head,) the query vector."""
    keys: np.ndarray
    """(n_keys, d_head)."""
    values: np.ndarray
    """(n_keys, d_head)."""
    dots: np.ndarray
    """(n_keys,) q·k."""
    scale: float
    scale_text: str
    scores: np.ndarray
    """(n_keys,) what goes into the softmax: q·k·scale (+ the stored bias where the model adds
    one), ``-inf`` where masked."""
    bias: np.ndarray | None
    """(n_keys,) stored scores − q·k·scale where the model adds a term (T5's position bias)."""
    masked: np.ndarray
    """(n_keys,) bool."""
    weights: np.ndarray
    """(n_keys,) softmax of the scores."""
    z: np.ndarray
    """(d_head,) Σ weights · values."""
    stored_scores: np.ndarray | None
    stored_weights: np.ndarray | None
    stored_z: np.ndarray | None
    errors: dict[str, float] = field(default_factory=dict)
    """Largest |computed − stored| per step that the run stores (``scores``, ``weights``, ``z``)."""
    notes: list[str] = field(default_factory=list)


def _softmax(scores: np.ndarray) -> np.ndarray:
    finite = np.isfinite(scores)
    out = np.zeros_like(scores)
    if finite.any():
        e = np.exp(scores[finite] - scores[finite].max())
        out[finite] = e / e.sum()
    return out


def _stored(run: Run, hook: str, i: int) -> np.ndarray | None:
    return run.activation(hook, i).astype(np.float64) if hook in run.aliases else None


def steps(run: Run, i: int, prefix: str, head: int, pos: int) -> Steps:
    """One head (``head``) of the attention module ``prefix`` at query position ``pos`` of prompt
    ``i``, step by step. Raises :class:`UserError` when the run lacks what is needed."""
    info = run.model_info
    rotary = "rotary" in str(info.get("positional", "")).lower()
    notes: list[str] = []
    q_hook, k_hook = f"{prefix}.hook_q", f"{prefix}.hook_k"
    if rotary:
        if f"{prefix}.hook_rot_q" not in run.aliases or f"{prefix}.hook_rot_k" not in run.aliases:
            raise UserError(f"this model rotates queries and keys (RoPE) and the run lacks {prefix}.hook_rot_q/"
                            "hook_rot_k: capture with --hooks attention-full")
        q_hook, k_hook = f"{prefix}.hook_rot_q", f"{prefix}.hook_rot_k"
        notes.append("RoPE: q, k after the rotation (hook_rot_q/k); hook_q/k are taken before it")
    for hook in (q_hook, k_hook, f"{prefix}.hook_v"):
        if hook not in run.aliases:
            raise UserError(f"the run does not store {hook}: capture with --hooks attention-full")
    q_all = run.activation(q_hook, i).astype(np.float64)  # (n_q, heads, d_head)
    k_all = run.activation(k_hook, i).astype(np.float64)  # (n_k, kv_heads, d_head)
    v_all = run.activation(f"{prefix}.hook_v", i).astype(np.float64)
    n_heads, n_kv = q_all.shape[1], k_all.shape[1]
    if not 0 <= head < n_heads:
        raise UserError(f"head {head} does not exist: {prefix} has heads 0..{n_heads - 1}")
    if not 0 <= pos < q_all.shape[0]:
        raise UserError(f"query position {pos} is out of range (prompt {i} has {q_all.shape[0]} query tokens)")
    kv_head = head // (n_heads // n_kv)
    if n_kv != n_heads:
        notes.append(f"grouped-query: head {head} reads K/V head {kv_head} ({n_heads} heads share {n_kv})")
    q, keys, values = q_all[pos, head], k_all[:, kv_head], v_all[:, kv_head]
    dots = keys @ q
    scale, scale_text = score_scale(run)
    scaled = dots * scale

    part = part_of(q_hook)
    causal = part != "cross" and part != "encoder" and info.get("family") != "encoder"
    masked = np.zeros(len(keys), bool)
    if causal:
        masked[pos + 1 :] = True

    aliased = is_scores_aliased(run, prefix)
    stored_scores = None if aliased else _stored(run, f"{prefix}.hook_attn_scores", i)
    if aliased:
        notes.append("hook_attn_scores is hook_pattern on this model (a bridge alias): scores computed, not read")
    bias = None
    if stored_scores is not None:
        stored_scores = stored_scores[head, pos]
        stored_mask = stored_scores <= MASKED_BELOW
        if not np.array_equal(stored_mask, masked):
            notes.append(f"stored mask: {int(stored_mask.sum())} keys, causal rule: {int(masked.sum())} "
                         "(a sliding window?): the stored mask is used")
            masked = stored_mask
        diff = np.where(masked, 0.0, stored_scores - scaled)
        if np.abs(diff).max(initial=0.0) > 1e-4 * max(1.0, float(np.abs(scaled).max(initial=0.0))):
            bias = diff
            notes.append("bias = stored score − scaled q·k (T5's learned relative position bias)")
    scores = scaled + (bias if bias is not None else 0.0)
    scores = np.where(masked, -np.inf, scores)
    weights = _softmax(scores)
    z = weights @ values

    stored_weights = _stored(run, f"{prefix}.hook_pattern", i)
    stored_weights = None if stored_weights is None else stored_weights[head, pos]
    stored_z = _stored(run, f"{prefix}.hook_z", i)
    stored_z = None if stored_z is None else stored_z[pos, head]
    errors: dict[str, float] = {}
    if stored_scores is not None:
        keep = ~masked
        errors["scores"] = float(np.abs(stored_scores[keep] - scores[keep]).max(initial=0.0))
    if stored_weights is not None:
        errors["weights"] = float(np.abs(stored_weights - weights).max(initial=0.0))
    if stored_z is not None:
        errors["z"] = float(np.abs(stored_z - z).max(initial=0.0))
    q_stream = run.resolve(q_hook).stream_of_rows()
    k_stream = run.resolve(k_hook).stream_of_rows()
    return Steps(prefix=prefix, head=head, kv_head=kv_head, n_heads=n_heads, n_kv_heads=n_kv, query_pos=pos,
                 query_token=run.display_tokens(i, q_stream)[pos].label,
                 key_tokens=[t.label for t in run.display_tokens(i, k_stream)],
                 q_hook=q_hook, k_hook=k_hook, q=q, keys=keys, values=values, dots=dots, scale=scale,
                 scale_text=scale_text, scores=scores, bias=bias, masked=masked, weights=weights, z=z,
                 stored_scores=stored_scores, stored_weights=stored_weights, stored_z=stored_z,
                 errors=errors, notes=notes)
