"""Attention analyses: head roles, where a token looks, and mechanics checks.

``head-roles``
    A score for every attention head (query heads; grouped-query models also name each head's
    key/value head): previous-token, next-token (bidirectional attention only), duplicate-token,
    first-token (attention sink), mean attention distance and entropy, from the attention patterns
    stored in the run; and induction, from seeded repeated random-token sequences the analysis
    builds and runs through the live model (decoders). Encoder self-attention, decoder
    self-attention and cross-attention each get the scores that apply to them. The result also
    carries the mechanics checks of every stored pattern: rows sum to 1, and causal patterns are
    exactly zero above the diagonal (measured on the stored values, not assumed).

``attends-to``
    "Where does this token look?": for one query position of one prompt, the keys each head of
    each layer attends to most, with their weights (the classic "it" → "the animal").

Scores (per head, averaged over prompts, each prompt weighing the same):

- ``previous_token``: mean over query positions q ≥ 1 of the weight on key q − 1.
- ``next_token``: mean over q < n − 1 of the weight on key q + 1 (bidirectional attention only).
- ``duplicate_token``: mean, over the query positions whose token occurs at another key position
  (earlier ones only, for causal attention; in the other stream, for cross-attention), of the
  total weight on those positions.
- ``induction``: on sequences ``[prefix] r r`` (r: ``length`` random tokens), mean over the
  second copy's positions of the weight on the token after the same token's earlier occurrence(s)
  (TransformerLens' induction detection pattern); decoders only.
- ``first_token``: mean weight on key 0 (causal: over q ≥ 1, since row 0 has no choice).
- ``mean_distance``: mean over queries of Σ_k weight·|q − k| (self-attention only).
- ``entropy``: mean over queries of −Σ_k weight·ln(weight), in nats.

``previous_token_tl``, ``duplicate_token_tl`` and ``induction_tl`` (causal self-attention) are
TransformerLens' ``head_detector.detect_head(..., error_measure="mul")`` scores on the same
sequences: the pattern's weight on the detection pattern's cells over its total weight, including
rows where the detection pattern is empty (so they are smaller than the row means above).

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.head_scores import (
    DESCRIPTIONS,
    SCORES,
    TL_SCORES,
    check_pattern,
    induction_mask,  # noqa: F401 - public here too
    induction_scores,
    pattern_scores,
)

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.hooknames import is_attention_pattern, layer_of, part_of
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.store.reader import Run

# --- which patterns, of what kind ---------------------------------------------------------------


@dataclass(frozen=True)
class PatternHook:
    """One stored attention pattern and how to read it."""

    name: str
    stack: str
    """``blocks`` (decoder or encoder-only), ``encoder``, ``decoder`` (self-attention), ``cross``."""
    layer: int
    causal: bool
    cross: bool
    q_stream: str
    k_stream: str

    @property
    def label(self) -> str:
        return {"blocks": "L", "encoder": "E", "decoder": "D", "cross": "X"}[self.stack] + str(self.layer)


def pattern_hooks(run: Run) -> list[PatternHook]:
    """The run's stored attention patterns (``hook_pattern``), stack by stack (a decoder-only or
    encoder-only model's blocks or an encoder's, then a decoder's self-attention, then its
    cross-attention), layer by layer."""
    out = []
    for spec in run.hooks.values():
        layer = layer_of(spec.name)
        if spec.layout != "square" or not is_attention_pattern(spec.name) or layer is None:
            continue
        q, k = spec.square_streams()
        part = part_of(spec.name)  # encoder, decoder, cross (a decoder's cross-attention) or ""
        cross = q != k or part == "cross"
        stack = "cross" if part in ("decoder", "cross") and cross else part or "blocks"
        causal = not cross and (run.family == "decoder" or stack == "decoder")
        out.append(PatternHook(spec.name, stack, layer, causal, cross, q, k))
    order = {"blocks": 0, "encoder": 0, "decoder": 1, "cross": 2}
    return sorted(out, key=lambda h: (order[h.stack], h.layer))


def kv_groups(run: Run) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    info = run.model_info
    n, kv = int(info.get("n_heads") or 1), int(info.get("n_kv_heads") or info.get("n_heads") or 1)
    return max(1, n // kv) if kv else 1


def kv_head(head: int, groups: int, hook: PatternHook) -> int | None:
    """The key/value head a query head reads (grouped-query decoders), else None."""
    return head // groups if groups > 1 and hook.stack == "blocks" else None


# --- head-roles ---------------------------------------------------------------------------------


def _mean(values: list[np.ndarray]) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: not applicable
        return np.nanmean(np.stack(values), axis=0)


def _tolerance(run: Run) -> float:
    return 1e-5 if run.storage_dtype == "float32" else 1e-2


def compute_head_roles(ctx: AnalysisContext) -> Result:
    run, params = ctx.run, ctx.params
    hooks = pattern_hooks(run)
    if not hooks:
        raise ValueError("the run stores no attention pattern (capture with --for head-roles)")
    prompts = list(ctx.prompts)
    per: dict[str, dict[str, list[np.ndarray]]] = {h.name: {} for h in hooks}
    checks: dict[str, dict[str, Any]] = {h.name: {"hook": h.name, "causal": h.causal, "max_row_sum_error": 0.0,
                       **({"max_above_diagonal": 0.0, "nonzero_above_diagonal": 0} if h.causal else {})}
              for h in hooks}
    total = len(prompts) + (params["seqs"] if params["induction"] else 0)
    for done, i in enumerate(prompts):
        streams = {s: run.tokens(i, s) for s in {x for h in hooks for x in (h.q_stream, h.k_stream)}}
        for h in hooks:
            pattern = run.activation(h.name, i)
            for key, value in pattern_scores(pattern, streams[h.q_stream], streams[h.k_stream],
                                             causal=h.causal, cross=h.cross).items():
                per[h.name].setdefault(key, []).append(value)
            c = check_pattern(pattern, causal=h.causal)
            acc = checks[h.name]
            acc["max_row_sum_error"] = max(acc["max_row_sum_error"], c["max_row_sum_error"])
            if h.causal:
                acc["max_above_diagonal"] = max(acc["max_above_diagonal"], c["max_above_diagonal"])
                acc["nonzero_above_diagonal"] += c["nonzero_above_diagonal"]
        ctx.progress(done + 1, total)
    tol = _tolerance(run)
    for acc in checks.values():
        acc["rows_sum_to_one"] = acc["max_row_sum_error"] <= tol
        if acc["causal"]:
            acc["zero_above_diagonal"] = acc["nonzero_above_diagonal"] == 0
        acc["ok"] = acc["rows_sum_to_one"] and acc.get("zero_above_diagonal", True)

    family = run.family
    induction: dict[str, Any] | None = None
    if params["induction"] and family == "decoder":
        model = ctx.model()
        induction = induction_scores(model, params["seqs"], params["length"], params["seed"],
                                     progress=lambda d, n: ctx.progress(len(prompts) + d, total))

    groups = kv_groups(run)
    records: list[dict[str, Any]] = []
    for h in hooks:
        means = {k: _mean(v) for k, v in per[h.name].items()} if prompts else {}
        n_heads = next(iter(means.values())).shape[0] if means else int(run.model_info.get("n_heads") or 0)
        for head in range(n_heads):
            rec: dict[str, Any] = {"hook": h.name, "stack": h.stack, "label": f"{h.label}H{head}",
                                   "layer": h.layer, "head": head,
                                   "kv_head": kv_head(head, groups, h)}
            for k in (*SCORES, *TL_SCORES):
                v = means.get(k)
                rec[k] = None if v is None or not np.isfinite(v[head]) else float(v[head])
            if induction is not None and h.name in induction["row"]:
                rec["induction"] = float(induction["row"][h.name][head])
                rec["induction_tl"] = float(induction["tl"][h.name][head])
            records.append(rec)

    def top(score: str) -> dict[str, Any] | None:
        scored = [r for r in records if r[score] is not None]
        return max(scored, key=lambda r: r[score]) if scored else None

    data = {
        "family": family, "n_prompts": len(prompts), "kv_groups": groups, "scores": list(SCORES),
        "heads": records,
        "top": {s: (t["label"] if (t := top(s)) else None) for s in SCORES},
        "checks": list(checks.values()),
        "checks_ok": all(c["ok"] for c in checks.values()),
        "check_tolerance": tol,
        "induction": None if induction is None else {
            "seqs": params["seqs"], "length": params["length"], "seed": params["seed"],
            "prefix_tokens": induction["n_prefix"],
            "loss_first_half": induction["loss_first_half"],
            "loss_second_half": induction["loss_second_half"]},
    }
    table = np.array([[np.nan if r[s] is None else r[s] for s in SCORES] for r in records], dtype=np.float64)
    arrays = {"scores": table.reshape(len(records), len(SCORES))}
    if induction is not None:
        arrays["induction_tokens"] = induction["tokens"]
    return Result(data=data, arrays=arrays)


def _fmt(v: Any, width: int = 7) -> str:
    return f"{v:{width}.3f}" if isinstance(v, float) else f"{'-':>{width}}"


def render_head_roles(result: Result, limit: int = 8) -> str:
    d = result.data
    lines: list[str] = []
    ind = d.get("induction")
    if ind:
        lines.append(f"induction: {ind['seqs']} sequences of {ind['length']} random tokens repeated "
                     f"(seed {ind['seed']}); loss {ind['loss_first_half']:.2f} nats on the first copy, "
                     f"{ind['loss_second_half']:.2f} on the second")
    lines.append(f"{d['n_prompts']} prompts; strongest head per role: "
                 + ", ".join(f"{s} {t}" for s, t in d["top"].items() if t))
    lines.append("")
    short = {"previous_token": "prev", "next_token": "next", "duplicate_token": "dup",
             "induction": "induct", "first_token": "first", "mean_distance": "dist", "entropy": "entropy"}
    shown = [s for s in SCORES if any(r[s] is not None for r in d["heads"])]
    for score in [s for s in shown if s not in ("mean_distance", "entropy")]:
        ranked = sorted((r for r in d["heads"] if r[score] is not None), key=lambda r: -r[score])[:limit]
        lines.append(f"top {score} heads ({DESCRIPTIONS[score]}):")
        lines.append(f"  {'head':8} {'kv':>3} " + " ".join(f"{short[s]:>7}" for s in shown))
        for r in ranked:
            kv = str(r["kv_head"]) if r["kv_head"] is not None else "-"
            lines.append(f"  {r['label']:8} {kv:>3} " + " ".join(_fmt(r[s]) for s in shown))
        lines.append("")
    bad = [c for c in d["checks"] if not c["ok"]]
    lines.append(f"mechanics checks ({len(d['checks'])} patterns, tolerance {d['check_tolerance']:g}): "
                 + ("all rows sum to 1" if all(c["rows_sum_to_one"] for c in d["checks"])
                    else "ROWS NOT SUMMING TO 1")
                 + ("" if not any(c["causal"] for c in d["checks"])
                    else "; causal patterns exactly zero above the diagonal"
                    if all(c.get("zero_above_diagonal", True) for c in d["checks"])
                    else "; NONZERO VALUES ABOVE THE DIAGONAL"))
    worst = max(d["checks"], key=lambda c: c["max_row_sum_error"])
    lines.append(f"  largest |row sum - 1|: {worst['max_row_sum_error']:.2e} ({worst['hook']})")
    for c in bad:
        lines.append(f"  FAILED {c['hook']}: |row sum - 1| {c['max_row_sum_error']:.2e}"
                     + (f", {c['nonzero_above_diagonal']} nonzero above the diagonal (max "
                        f"{c['max_above_diagonal']:.2e})" if c["causal"] else ""))
    return "\n".join(lines)


def head_roles_json(result: Result) -> dict[str, Any]:
    return result.data


HEAD_ROLES = Analysis(
    name="head-roles",
    description="score every attention head: previous-token, duplicate, induction, sink, distance, entropy",
    version="1",
    compute=compute_head_roles,
    needs=("attention",),
    needs_model=True,
    params=(
        Param("induction", bool, True, "run the model on repeated random tokens for induction scores "
              "(decoders; reloads the model)"),
        Param("seqs", int, 16, "repeated random sequences for the induction score", min=1, max=4096),
        Param("length", int, 20, "random tokens per copy", min=2, max=4096),
        Param("seed", int, 0, "seed of the random sequences"),
    ),
    render_text=render_head_roles,
    to_json=head_roles_json,
)


# --- attends-to ---------------------------------------------------------------------------------


def lookup(run: Run, prompt: int, position: int, top: int = 3,
           hooks: Iterable[PatternHook] | None = None, stream: str | None = None) -> dict[str, Any]:
    """For query ``position`` (negative: from the end) of ``prompt``: every head's ``top`` keys
    by weight, layer by layer, over the patterns whose queries are tokens of ``stream`` (default:
    the first pattern's; for an encoder-decoder the encoder's tokens, or ``dec_tokens``). Reads
    only the query's row of each pattern."""
    hooks = list(hooks if hooks is not None else pattern_hooks(run))
    if not hooks:
        raise ValueError("the run stores no attention pattern")
    if not 0 <= prompt < len(run):
        raise ValueError(f"prompt {prompt} is out of range (the run has {len(run)})")
    stream = stream or hooks[0].q_stream
    hooks = [h for h in hooks if h.q_stream == stream]
    if not hooks:
        raise ValueError(f"no stored pattern has queries in the {stream!r} stream")
    q_tokens = run.str_tokens(prompt, stream)
    pos = position + len(q_tokens) if position < 0 else position
    if not 0 <= pos < len(q_tokens):
        raise ValueError(f"position {position} is out of range (prompt {prompt} has {len(q_tokens)} "
                         f"query tokens)")
    groups = kv_groups(run)
    strings = {stream: q_tokens}
    layers = []
    for h in hooks:
        row = run.attention_row(h.name, prompt, pos)
        if h.k_stream not in strings:
            strings[h.k_stream] = run.str_tokens(prompt, h.k_stream)
        k_str = strings[h.k_stream]
        order = np.argsort(-row, axis=1, kind="stable")[:, :top]
        heads = []
        for head in range(row.shape[0]):
            keys = [{"position": int(k), "token": k_str[k], "weight": float(row[head, k])}
                    for k in order[head] if row[head, k] > 0 or k == order[head][0]]
            heads.append({"head": head, "kv_head": kv_head(head, groups, h), "keys": keys})
        layers.append({"hook": h.name, "label": h.label, "stack": h.stack, "layer": h.layer, "heads": heads})
    return {"prompt": prompt, "query": {"position": pos, "token": q_tokens[pos], "stream": stream},
            "top": top, "layers": layers}


STREAMS = ("main", "decoder")


def compute_attends_to(ctx: AnalysisContext) -> Result:
    from workbench.store import schema as S

    p = ctx.params
    if p["prompt"] >= ctx.n_prompts:
        raise UserError(f"prompt {p['prompt']} is out of range (the run has {ctx.n_prompts} prompts)")
    stream = {"main": S.MAIN, "decoder": S.DEC}[p["stream"]]
    try:
        data = lookup(ctx.run, p["prompt"], p["position"], p["top"], stream=stream)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return Result(data=data)


def render_attends_to(result: Result) -> str:
    d = result.data
    q = d["query"]
    lines = [(f"prompt {d['prompt']}, query position {q['position']} {q['token']!r}: each head's top key "
             f"(weight); --json has the top {d['top']}")]
    for layer in d["layers"]:
        cells = [f"H{h['head']} {h['keys'][0]['token']!r}@{h['keys'][0]['position']} {h['keys'][0]['weight']:.2f}"
                 for h in layer["heads"]]
        lines.append(f"  {layer['label']:>4}: " + " · ".join(cells))
    return "\n".join(lines)


ATTENDS_TO = Analysis(
    name="attends-to",
    description="where a token looks: each head's most-attended keys for one query position",
    version="1",
    compute=compute_attends_to,
    needs=("attention",),
    params=(
        Param("prompt", int, 0, "prompt index", min=0),
        Param("position", int, -1, "query position (negative: from the end)"),
        Param("top", int, 3, "keys per head", min=1, max=64),
        Param("stream", str, "main", "queries from the main tokens, or the decoder's (encoder-decoders)",
              choices=STREAMS),
    ),
    render_text=render_attends_to,
    to_json=lambda r: r.data,
)


# --- registration -------------------------------------------------------------------------------


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(HEAD_ROLES)
    register(ATTENDS_TO)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    register(View(name="head-roles-table", analysis="head-roles", title="head roles (sortable)",
                  make=lazy_view("workbench_plugins.attention_view", "HeadRolesView")))
    register(View(name="attends-to-panel", analysis="attends-to", title="where the focused token looks",
                  make=lazy_view("workbench_plugins.attention_view", "AttendsToView")))
