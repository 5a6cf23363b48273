"""The ``ablation`` analysis: the metric with each attention head, MLP layer, whole layer or
residual-stream position replaced by zeros, its mean over the run's prompts, or its value on the
prompt's ``corrupted`` text. Declared and registered by ``interventions.py``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.directions import content_span
from workbench_plugins.intervene import Intervener, hook_names
from workbench_plugins.intervention_setup import (
    ABLATION_COMPONENTS,
    ablation_rows,
    choose_components,
    components,
    corrupted_tokens,
    input_tokens,
    make_metric,
    parse_prompts,
)

from workbench.analysis import AnalysisContext, Result
from workbench.errors import UserError

if TYPE_CHECKING:
    import torch


def reference_means(ctx: AnalysisContext, iv: Intervener, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Each hook's mean over the run's prompts' own tokens (not BOS, not a decoder's first
    position): a vector per hook (per head for ``hook_z``)."""

    sums: dict[str, torch.Tensor] = {}
    count = 0
    for i in ctx.prompts:
        start, end = content_span(ctx.run, i)
        acts = iv.activations(hooks, input_tokens(ctx, i))
        for h in hooks:
            part = acts[h][start:end].double().sum(0)
            sums[h] = sums[h] + part if h in sums else part
        count += end - start
    return {h: (v / count).float() for h, v in sums.items()}


def compute_ablation(ctx: AnalysisContext) -> Result:
    import torch

    run, params = ctx.run, ctx.params
    indices = parse_prompts(params["prompts"], ctx.prompts)
    method = params["method"]
    if method == "resample" and not any("corrupted" in ctx.task(i) for i in indices):
        raise UserError("resample ablation takes each prompt's activations from its 'corrupted' text; "
                        "none of these prompts has one")
    model = ctx.model()
    have = components(model)
    chosen = choose_components(params["component"], ABLATION_COMPONENTS, have,
                     {"heads": "z", "mlp": "mlp", "layers": "attn", "positions": "resid"})
    n_layers = len(model.bridge.blocks)
    records: list[dict[str, Any]] = []
    per_prompt: dict[str, list[np.ndarray]] = {c: [] for c in chosen}
    skipped: list[dict[str, Any]] = []
    means: dict[str, torch.Tensor] | None = None
    hooks = [hook_names(layer)[k] for layer in range(n_layers) for k in ("z", "attn", "mlp", "resid")
             if have.get(k, True)]
    offset, t0, shared = 0, time.perf_counter(), True
    for done, i in enumerate(indices):
        tokens = input_tokens(ctx, i)
        metric, desc = make_metric(ctx, model, i, tokens)
        iv = Intervener(model, tokens, metric, keep=hooks if method == "zero" else ())
        shared = shared and iv.shared_prefix
        if method == "zero":
            source = {h: torch.zeros_like(a) for h, a in iv.clean.items()}
        elif method == "mean":
            if means is None:
                means = reference_means(ctx, iv, hooks)
            source = {h: means[h].expand(len(tokens), *means[h].shape) for h in hooks}
        else:
            corrupt = corrupted_tokens(ctx, model, i, tokens)
            if corrupt is None:
                skipped.append({"index": i, "reason": "no 'corrupted' text to resample from"})
                continue
            source = iv.activations(hooks, corrupt)
        n_heads = int(source[hook_names(0)["z"]].shape[1])
        rec: dict[str, Any] = {"index": i, "id": run.prompt_id(i), "n_tokens": len(tokens), "offset": offset,
                               "baseline": iv.baseline, **desc}
        rows = {c: ablation_rows(c, n_layers, n_heads, len(tokens), have["mlp"]) for c in chosen}
        every = iv.run([r for c in chosen for r in rows[c]], source)  # one run: the rows share passes
        cuts = np.cumsum([len(rows[c]) for c in chosen])[:-1]
        for c, values in zip(chosen, np.split(every, cuts), strict=True):
            per_prompt[c].append(values.reshape(n_layers, -1).T if c == "positions" else
                                 values.reshape(n_layers, n_heads) if c == "heads" else values)
        offset += len(tokens)
        records.append(rec)
        ctx.progress(done + 1, len(indices))
    if not records:
        raise UserError("no prompt could be ablated: " + "; ".join(f"prompt {s['index']}: {s['reason']}" for s in skipped))
    arrays = {c: np.concatenate(v) if c == "positions" else np.stack(v) for c, v in per_prompt.items()}
    data = {"method": method, "components": chosen, "n_layers": n_layers,
            "n_heads": int(arrays["heads"].shape[-1]) if "heads" in arrays else None,
            "reference": f"mean over the own tokens of the run's {len(ctx.prompts)} prompts" if method == "mean" else None,
            "shared_prefix": shared, "seconds": round(time.perf_counter() - t0, 3),
            "prompts": records, "skipped": skipped}
    return Result(data=data, arrays={k: v.astype(np.float64) for k, v in arrays.items()})


def largest(values: np.ndarray, labels: list[str], k: int = 8) -> list[tuple[str, float]]:
    """The ``k`` largest ``|values|`` with their labels."""
    order = np.argsort(-np.abs(values), kind="stable")[:k]
    return [(labels[j], float(values[j])) for j in order]


def render_ablation(result: Result) -> str:
    d, a = result.data, result.arrays
    lines = [f"{d['method']} ablation of {', '.join(d['components'])}; {len(d['prompts'])} prompts"
             + ("" if d["shared_prefix"] else " (full forward passes: the blocks could not be replayed)")]
    if d["reference"]:
        lines.append(f"mean: {d['reference']}")
    for n, rec in enumerate(d["prompts"]):
        base = rec["baseline"]
        lines += ["", f"prompt {rec['index']}: {rec['metric_name']} = {base:+.4f} unablated; largest changes:"]
        L = d["n_layers"]
        parts: list[tuple[str, float]] = []
        if "heads" in a:
            H = a["heads"].shape[-1]
            parts += largest(a["heads"][n].ravel() - base, [f"L{layer}H{h}" for layer in range(L) for h in range(H)])
        for c, tag in (("mlp", "MLP"), ("layers", "layer ")):
            if c in a:
                parts += largest(a[c][n] - base, [f"{tag}{layer}" for layer in range(L)], 4)
        if "positions" in a:
            block = a["positions"][rec["offset"] : rec["offset"] + rec["n_tokens"]]  # (pos, layers)
            parts += largest(block.ravel() - base, [f"resid L{layer} pos {p}" for p in range(rec["n_tokens"])
                                                 for layer in range(L)], 4)
        parts.sort(key=lambda x: -abs(x[1]))
        lines += [f"  {name:>18}  {change:+.4f}" for name, change in parts[:12]]
    for s in d["skipped"]:
        lines.append(f"skipped prompt {s['index']}: {s['reason']}")
    return "\n".join(lines)
