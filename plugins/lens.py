"""How a prediction forms: ``logit-lens``, ``dla`` (direct logit attribution) and ``neurons``.

- ``logit-lens``: the model's own final norm and unembedding applied to the residual stream after
  the embeddings and after every layer, at every position: top-k tokens with probabilities, the
  target token's rank and probability (default target: the actual next token; at the last
  position the prompt's ``answer``), and ``KL(final || layer)``. Reads the residual stream only:
  the final norm's scale is recomputed from each row by the model's own final-norm module.
- ``dla``: at a position, ``logit[target]`` (or ``logit[answer] - logit[wrong]``) split exactly
  into the terms of the embeddings, every attention head (plus each layer's output bias) and every
  MLP layer, with that forward pass's final-norm scale (and Gemma's per-sublayer post-norm
  scales). The terms add up to the model's own logit; pre-norm decoders only.
- ``neurons``: the MLP neurons with the largest activation x direct effect on that metric; for
  chosen neurons, their top-activating tokens across the run, their most negative activations
  (a neuron whose effect is negative helps the target through them), and the tokens their output
  weights promote and suppress.

The plugin also registers ``distribution`` (softmax, temperature, sampling: ``distribution.py``).
Weights come from the model reloaded by the run's provenance; activations from the run (capture
with ``--for logit-lens``: the residual stream; ``--for dla``: preset ``lens``). The decomposition
is in ``readout.py``.

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.answer import first_token
from workbench_plugins.distribution import (  # noqa: F401  (re-exported: the names lived here)
    DISTRIBUTION,
    distribution_at,
    parse_temperatures,
    sample_ids,
)
from workbench_plugins.readout import (
    Readout,
    attribute,
    check_pre_norm,
    neuron_terms,
    promoted_tokens,
    residual_rows,
    token_position,
)

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.hooknames import resid_pre
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.models.model import Model
    from workbench.store.reader import Run


# --- targets ------------------------------------------------------------------------------------


def resolve_target(ctx: AnalysisContext, model: Model, i: int, pos: int) -> dict[str, Any]:
    """The token whose logit is explained at ``pos`` of prompt ``i`` (and the contrasting one):
    the ``target``/``wrong`` parameters; else the prompt's ``answer``/``wrong`` at its last input
    position; else the actual next token; else (last position, no answer) the model's top
    prediction as stored in the run."""
    run, params = ctx.run, ctx.params
    task = ctx.task(i)
    tokens = run.tokens(i)
    wrong = None
    if params.get("target"):
        target, source = first_token(model, params["target"])[0], "parameter"
        if params.get("wrong"):
            wrong = first_token(model, params["wrong"])[0]
    elif "answer" in task and pos == run.n_input_tokens(i) - 1:
        target, source = first_token(model, str(task["answer"]))[0], "answer"
        if params.get("wrong"):
            wrong = first_token(model, params["wrong"])[0]
        elif "wrong" in task:
            wrong = first_token(model, str(task["wrong"]))[0]
    elif pos + 1 < len(tokens):
        target, source = int(tokens[pos + 1]), "next token"
        if params.get("wrong"):
            wrong = first_token(model, params["wrong"])[0]
    else:
        if not run.has_lm_outputs:
            raise UserError("this run stores no predictions to take a target from: give one with "
                            f"--param {ctx.analysis.name}.target=TOKEN")
        target, source = int(run.top_k(i)[0][pos, 0]), "top prediction"
        if params.get("wrong"):
            wrong = first_token(model, params["wrong"])[0]
    strs = model.str_tokens([target] + ([wrong] if wrong is not None else []))
    return {"target_id": target, "target": strs[0], "wrong_id": wrong,
            "wrong": strs[1] if wrong is not None else None, "source": source}


def _metric_name(t: dict[str, Any]) -> str:
    return (f"logit({t['target']!r}) - logit({t['wrong']!r})" if t["wrong"] is not None
            else f"logit({t['target']!r})")


# --- logit lens ---------------------------------------------------------------------------------

RESID_POST = "blocks.*.hook_resid_post"  # every layer's output
EMBED_ROW = resid_pre(0)  # the embedding, as the first block reads it


def _check_attributable(ctx: AnalysisContext) -> None:
    """Before reloading the model: some prompt has the ``position`` parameter's token, and the
    run's residual stream is a sum of its writers (:func:`check_pre_norm`, on that prompt)."""
    run, position = ctx.run, ctx.params["position"]
    first = next((i for i in ctx.prompts if token_position(run, i, position) is not None), None)
    if first is None:
        raise UserError(f"position {position} is outside every prompt")
    check_pre_norm(run, first, token_position(run, first, position))  # type: ignore[arg-type]


def lens_compute(ctx: AnalysisContext) -> Result:
    import torch

    run = ctx.run
    k = ctx.params["top"]
    model = ctx.model()
    ro = Readout(model)
    labels, hooks = residual_rows(run)
    fixed = first_token(model, ctx.params["target"])[0] if ctx.params["target"] else None
    offsets = [0]
    cols: dict[str, list[np.ndarray]] = {n: [] for n in ("top_ids", "top_probs", "target_ids", "target_rank",
                                                         "target_prob", "kl")}
    prompts: list[dict[str, Any]] = []
    for done, i in enumerate(ctx.prompts):
        tokens = run.tokens(i)
        n = len(tokens)
        targets = np.full(n, -1, dtype=np.int64)
        if fixed is not None:
            targets[:] = fixed
        else:
            targets[: n - 1] = tokens[1:]
            answer = ctx.task(i).get("answer")
            if answer is not None and n == run.n_input_tokens(i):
                targets[n - 1] = first_token(model, str(answer))[0]
        has_t = targets >= 0
        idx = torch.as_tensor(np.where(has_t, targets, 0))
        logits_final = ro.logits(run.activation(hooks[-1], i))
        logp_final = torch.log_softmax(logits_final.double(), -1)
        p_final = logp_final.exp()
        # the check: the last layer's lens against the model's own forward pass on the tokens
        with torch.inference_mode():
            out = torch.log_softmax(model.forward(torch.as_tensor(tokens, dtype=torch.long,
                                                                  device=model.device)[None])[0].double().cpu(), -1)
        kl_to_model = float((out.exp() * (out - logp_final)).sum(-1).max())
        top_ids = np.zeros((n, len(hooks), k), np.int32)
        top_probs = np.zeros((n, len(hooks), k), np.float32)
        rank = np.full((n, len(hooks)), -1, np.int32)
        prob = np.full((n, len(hooks)), np.nan, np.float32)
        kl = np.zeros((n, len(hooks)), np.float64)
        for r, hook in enumerate(hooks):
            last_row = r == len(hooks) - 1
            logits = logits_final if last_row else ro.logits(run.activation(hook, i))
            logp = logp_final if last_row else torch.log_softmax(logits.double(), -1)
            top = torch.topk(logp, k, dim=-1)
            top_ids[:, r] = top.indices.numpy()
            top_probs[:, r] = top.values.exp().numpy()
            picked = logits.gather(-1, idx[:, None])
            ranks = (logits > picked).sum(-1) + 1
            rank[:, r] = np.where(has_t, ranks.numpy(), -1)
            prob[:, r] = np.where(has_t, logp.gather(-1, idx[:, None])[:, 0].exp().numpy(), np.nan)
            kl[:, r] = (p_final * (logp_final - logp)).sum(-1).clamp(min=0).numpy()
        per_token: tuple[np.ndarray, ...] = (top_ids, top_probs, targets.astype(np.int32), rank, prob, kl)
        for name, arr in zip(cols, per_token):
            cols[name].append(arr)
        offsets.append(offsets[-1] + n)
        last = n - 1
        strs = run.str_tokens(i)
        first_top1 = None
        if has_t[last]:
            ones = np.nonzero(rank[last] == 1)[0]
            first_top1 = labels[int(ones[0])] if len(ones) else None
        prompts.append({
            "index": i, "id": run.prompt_id(i), "n_tokens": n, "offset": offsets[-2], "kl_to_model": kl_to_model,
            "last": {"position": last, "token": strs[last],
                     "target": model.str_tokens([int(targets[last])])[0] if has_t[last] else None,
                     "target_id": int(targets[last]) if has_t[last] else None,
                     "first_top1_layer": first_top1,
                     "rows": [{"layer": labels[r], "top": model.str_tokens([int(top_ids[last, r, 0])])[0],
                               "top_prob": float(top_probs[last, r, 0]),
                               "target_rank": int(rank[last, r]) if has_t[last] else None,
                               "target_prob": float(prob[last, r]) if has_t[last] else None,
                               "kl": float(kl[last, r])} for r in range(len(hooks))]},
        })
        ctx.progress(done + 1, len(ctx.prompts))
    arrays = {name: np.concatenate(v) if v else np.zeros(0) for name, v in cols.items()}
    arrays["offsets"] = np.asarray(offsets, np.int64)
    data = {"layers": labels, "hooks": hooks, "top": k, "target": ctx.params["target"] or None,
            "kl": "KL(final || layer), nats", "n_prompts": len(prompts),
            "max_kl_to_model": max((p["kl_to_model"] for p in prompts), default=None),
            "prompts": prompts}
    return Result(data=data, arrays=arrays)


def lens_text(result: Result) -> str:
    d = result.data
    n_layers = len([x for x in d["layers"] if x != "embed"])  # the embedding row only where stored
    lines = [f"logit lens: {n_layers} layers, {d['n_prompts']} prompts; the last layer's lens is "
             f"the model's output (KL to its forward pass at most {d['max_kl_to_model']:.1e} nats)"
             if d["max_kl_to_model"] is not None else "logit lens: no prompts"]
    for p in d["prompts"][:5]:
        last = p["last"]
        target = f"; target {last['target']!r}" if last["target"] is not None else ""
        first = (f", first ranked 1st after layer {last['first_top1_layer']}" if last["first_top1_layer"]
                 else "") if last["target"] is not None else ""
        lines += ["", f"prompt {p['index']}, last position {last['position']} {last['token']!r}{target}{first}"]
        lines.append(f"  {'layer':>6}  {'top token':16} {'prob':>6}  {'target rank':>11} {'prob':>7}  {'KL':>8}")
        for r in last["rows"]:
            tr = (f"{r['target_rank']:>11} {r['target_prob']:7.2%}" if r["target_rank"] is not None
                  else f"{'':>11} {'':>7}")
            lines.append(f"  {r['layer']:>6}  {r['top']!r:16} {r['top_prob']:6.1%}  {tr}  {r['kl']:8.3f}")
    if len(d["prompts"]) > 5:
        lines.append(f"\n... {len(d['prompts']) - 5} more prompts (--json, or the terminal UI's lens grid)")
    return "\n".join(lines)


LOGIT_LENS = Analysis(
    name="logit-lens",
    description="final norm + unembedding applied after every layer: top tokens, the target's rank, KL to the output",
    version="1",
    compute=lens_compute,
    # the residual stream only: each row's final-norm scale is recomputed from the row itself
    needs=(RESID_POST,),
    optional=(EMBED_ROW,),  # the "embed" row, where the run holds it
    needs_model=True,
    families=("decoder",),
    params=(Param("top", int, 5, "top tokens kept per layer and position", min=1, max=100),
            Param("target", str, "", "a token to follow at every position (default: the next token; "
                                      "at the last position the prompt's answer)")),
    render_text=lens_text,
)


# --- direct logit attribution --------------------------------------------------------------------


def dla_compute(ctx: AnalysisContext) -> Result:
    run = ctx.run
    _check_attributable(ctx)
    model = ctx.model()
    ro = Readout(model)
    n_layers = ro.n_layers
    n_heads = int(ro.get("W_O", 0).shape[0])
    P = len(ctx.prompts)
    arrays = {"embed": np.full(P, np.nan), "pos_embed": np.full(P, np.nan),
              "heads": np.full((P, n_layers, n_heads), np.nan), "attn_bias": np.full((P, n_layers), np.nan),
              "mlp": np.full((P, n_layers), np.nan), "constant": np.full(P, np.nan),
              "actual": np.full(P, np.nan), "total": np.full(P, np.nan)}
    records: list[dict[str, Any]] = []
    for done, i in enumerate(ctx.prompts):
        pos = token_position(run, i, ctx.params["position"])
        if pos is None:
            records.append({"index": i, "id": run.prompt_id(i), "skipped": f"has {run.n_tokens(i)} tokens"})
            continue
        t = resolve_target(ctx, model, i, pos)
        a = attribute(run, ro, i, pos, t["target_id"], t["wrong_id"])
        total = a.total()
        for name in ("embed", "constant", "actual"):
            arrays[name][i] = getattr(a, name)
        arrays["pos_embed"][i] = a.pos_embed if a.pos_embed is not None else np.nan
        arrays["heads"][i], arrays["attn_bias"][i], arrays["mlp"][i] = a.heads, a.attn_bias, a.mlp
        arrays["total"][i] = total
        parts = [("embed", a.embed)] + ([("pos_embed", a.pos_embed)] if a.pos_embed is not None else [])
        parts += [(f"L{layer}H{h}", float(a.heads[layer, h])) for layer in range(n_layers) for h in range(n_heads)]
        parts += [(f"L{layer} attn bias", float(a.attn_bias[layer])) for layer in range(n_layers)
                  if a.attn_bias[layer] != 0]
        parts += [(f"L{layer} MLP", float(a.mlp[layer])) for layer in range(n_layers)]
        parts.append(("bias", a.constant))
        parts.sort(key=lambda kv: -abs(kv[1]))
        records.append({
            "index": i, "id": run.prompt_id(i), "position": pos, "token": run.str_tokens(i)[pos], **t,
            "metric": _metric_name(t), "actual": a.actual, "total": total,
            "abs_error": abs(total - a.actual), "rel_error": abs(total - a.actual) / max(abs(a.actual), 1.0),
            "attn_check": a.attn_error, "resid_check": a.resid_error,
            "attention_total": float(a.heads.sum() + a.attn_bias.sum()), "mlp_total": float(a.mlp.sum()),
            "top": [{"component": c, "value": v} for c, v in parts[: ctx.params["top"]]],
        })
        ctx.progress(done + 1, P)
    done_records = [r for r in records if "skipped" not in r]
    data = {"position": ctx.params["position"], "n_layers": n_layers, "n_heads": n_heads,
            "max_rel_error": max((r["rel_error"] for r in done_records), default=None),
            "prompts": records}
    return Result(data=data, arrays=arrays)


def _bar(value: float, scale: float, width: int = 24) -> str:
    n = round(abs(value) / scale * width) if scale else 0
    return ("+" if value >= 0 else "-") * min(n, width)


def dla_text(result: Result) -> str:
    d = result.data
    lines = []
    if d["max_rel_error"] is not None:
        lines.append(f"direct logit attribution, {d['n_layers']} layers x {d['n_heads']} heads; the parts add up "
                     f"to the model's logit within {d['max_rel_error']:.1e} (relative)")
    for r in d["prompts"][:5]:
        if "skipped" in r:
            lines += ["", f"prompt {r['index']}: skipped ({r['skipped']})"]
            continue
        lines += ["", (f"prompt {r['index']}, position {r['position']} {r['token']!r} ({r['source']}): "
                       f"{r['metric']} = {r['actual']:.4f}; parts sum to {r['total']:.4f}"),
                  f"  attention {r['attention_total']:+.3f}, MLPs {r['mlp_total']:+.3f}"]
        scale = max(abs(c["value"]) for c in r["top"]) if r["top"] else 1.0
        for c in r["top"]:
            lines.append(f"  {c['component']:>14} {c['value']:+9.3f}  {_bar(c['value'], scale)}")
    if len(d["prompts"]) > 5:
        lines.append(f"\n... {len(d['prompts']) - 5} more prompts (--json)")
    return "\n".join(lines)


_TARGET_PARAMS = (Param("position", int, -1, "token position (negative: from the end)"),
                  Param("target", str, "", "the token whose logit is explained (default: the prompt's answer "
                                           "at its last position, else the next token, else the top prediction)"),
                  Param("wrong", str, "", "a contrasting token: explain logit(target) - logit(wrong) "
                                          "(default: the prompt's wrong with its answer)"))

DLA = Analysis(
    name="dla",
    description="direct logit attribution: the target logit (difference) split over embeddings, heads and MLPs",
    version="1",
    compute=dla_compute,
    needs=("lens",),
    needs_model=True,
    families=("decoder", "encoder"),
    params=(*_TARGET_PARAMS, Param("top", int, 12, "components listed per prompt", min=1)),
    render_text=dla_text,
)


# --- neurons ------------------------------------------------------------------------------------

NEURON_RE = re.compile(r"^L(\d+)N(\d+)$", re.IGNORECASE)


def neurons_compute(ctx: AnalysisContext) -> Result:
    run = ctx.run
    params = ctx.params
    _check_attributable(ctx)
    wanted: list[tuple[int, int]] = []
    if params["neuron"]:
        m = NEURON_RE.match(params["neuron"].strip())
        if not m:
            raise UserError(f"neuron {params['neuron']!r}: write it as L<layer>N<index>, e.g. L12N345")
        wanted = [(int(m.group(1)), int(m.group(2)))]
    model = ctx.model()
    ro = Readout(model)
    d_mlp = int(ro.get("W_out", 0).shape[0])
    for layer, n in wanted:
        if not (0 <= layer < ro.n_layers and 0 <= n < d_mlp):
            raise UserError(f"neuron L{layer}N{n} does not exist ({ro.n_layers} layers of {d_mlp} neurons)")
    P = len(ctx.prompts)
    terms_all = np.full((P, ro.n_layers, d_mlp), np.nan, np.float32)
    records: list[dict[str, Any]] = []
    for done, i in enumerate(ctx.prompts):
        pos = token_position(run, i, params["position"])
        if pos is None:
            records.append({"index": i, "id": run.prompt_id(i), "skipped": f"has {run.n_tokens(i)} tokens"})
            continue
        t = resolve_target(ctx, model, i, pos)
        terms, acts, bias_terms, mlp_terms = neuron_terms(run, ro, i, pos, t["target_id"], t["wrong_id"])
        terms_all[i] = terms
        # per layer, the neurons and the bias must add up to the MLP's own term
        check = float(np.max(np.abs(terms.sum(1) + bias_terms - mlp_terms)))
        order = np.argsort(-terms, axis=None)
        neg = np.argsort(terms, axis=None)

        def pick(flat: int, terms: np.ndarray = terms, acts: np.ndarray = acts) -> dict[str, Any]:
            layer, n = divmod(int(flat), d_mlp)
            return {"neuron": f"L{layer}N{n}", "layer": layer, "index": n,
                    "activation": float(acts[layer, n]), "term": float(terms[layer, n]),
                    "effect": float(terms[layer, n] / acts[layer, n]) if acts[layer, n] else 0.0}

        records.append({"index": i, "id": run.prompt_id(i), "position": pos, "token": run.str_tokens(i)[pos], **t,
                        "metric": _metric_name(t), "mlp_total": float(mlp_terms.sum()),
                        "check": check, "top": [pick(f) for f in order[: params["top"]]],
                        "bottom": [pick(f) for f in neg[: max(1, params["top"] // 2)]]})
        ctx.progress(done + 1, P)
    done_records = [r for r in records if "skipped" not in r]
    if not wanted and done_records:
        wanted = [(p["layer"], p["index"]) for p in done_records[0]["top"][: params["detail"]]]
    details = [_neuron_detail(run, ro, model, layer, n, params["examples"], list(ctx.prompts))
               for layer, n in wanted]
    data = {"position": params["position"], "n_layers": ro.n_layers, "d_mlp": d_mlp,
            "max_check": max((r["check"] for r in done_records), default=None),
            "prompts": records, "neurons": details}
    return Result(data=data, arrays={"terms": terms_all})


def _neuron_detail(run: Run, ro: Readout, model: Model, layer: int, n: int, k: int,
                   prompts: list[int]) -> dict[str, Any]:
    best: list[tuple[float, int, int]] = []
    worst: list[tuple[float, int, int]] = []  # negative activations only, most negative first
    for i in prompts:
        col = run.activation(f"blocks.{layer}.mlp.hook_post", i)[:, n].astype(np.float64)
        for pos in np.argsort(-col)[:k]:
            best.append((float(col[pos]), i, int(pos)))
        worst += [(float(col[pos]), i, int(pos)) for pos in np.argsort(col)[:k] if col[pos] < 0]
    best.sort(reverse=True)
    worst.sort()

    def example(value: float, i: int, pos: int) -> dict[str, Any]:
        strs = run.str_tokens(i)
        return {"prompt": i, "position": pos, "token": strs[pos], "activation": value,
                "context": "".join(strs[max(0, pos - 6): pos + 1])}

    up, up_v, down, down_v = promoted_tokens(ro, layer, n, k)
    return {"neuron": f"L{layer}N{n}", "layer": layer, "index": n,
            "top_activations": [example(*b) for b in best[:k]],
            "bottom_activations": [example(*w) for w in worst[:k]],
            "promotes": [{"token": s, "id": t, "value": v} for s, t, v in zip(model.str_tokens(up), up, up_v)],
            "suppresses": [{"token": s, "id": t, "value": v}
                           for s, t, v in zip(model.str_tokens(down), down, down_v)]}


def neurons_text(result: Result) -> str:
    d = result.data
    lines = []
    for r in d["prompts"][:5]:
        if "skipped" in r:
            lines += [f"prompt {r['index']}: skipped ({r['skipped']})", ""]
            continue
        lines.append(f"prompt {r['index']}, position {r['position']} {r['token']!r}: {r['metric']}; "
                     f"all MLPs {r['mlp_total']:+.3f} (neurons add up to it within {r['check']:.1e})")
        lines.append(f"  {'neuron':>10} {'activation':>10} {'x effect':>9} {'= term':>8}")
        for p in r["top"] + [None] + r["bottom"]:  # type: ignore[list-item]
            if p is None:
                lines.append(f"  {'...':>10}")
                continue
            lines.append(f"  {p['neuron']:>10} {p['activation']:10.3f} {p['effect']:9.3f} {p['term']:+8.3f}")
        lines.append("")
    for nd in d["neurons"]:
        lines.append(f"neuron {nd['neuron']}: promotes " + ", ".join(repr(t["token"]) for t in nd["promotes"][:8])
                     + "; suppresses " + ", ".join(repr(t["token"]) for t in nd["suppresses"][:8]))
        for e in nd["top_activations"]:
            lines.append(f"  {e['activation']:8.3f}  prompt {e['prompt']}, position {e['position']}: {e['context']!r}")
        if nd.get("bottom_activations"):
            lines.append("  most negative activations:")
        for e in nd.get("bottom_activations", []):
            lines.append(f"  {e['activation']:8.3f}  prompt {e['prompt']}, position {e['position']}: {e['context']!r}")
        lines.append("")
    return "\n".join(lines).rstrip()


NEURONS = Analysis(
    name="neurons",
    description="MLP neurons by activation x direct effect on the target logit; a neuron's top tokens and outputs",
    version="2",  # 2: described neurons list their most negative activations too
    compute=neurons_compute,
    needs=("lens", "*blocks.*.mlp.hook_post"),
    needs_model=True,
    families=("decoder", "encoder"),
    params=(*_TARGET_PARAMS, Param("top", int, 10, "neurons listed per prompt", min=1),
            Param("neuron", str, "", "a neuron to describe, L<layer>N<index> (default: the first prompt's top ones)"),
            Param("detail", int, 3, "how many of the first prompt's top neurons to describe", min=0),
            Param("examples", int, 10, "top and most negative activations, and promoted tokens, per neuron",
                  min=1)),
    render_text=neurons_text,
)


# --- registration -------------------------------------------------------------------------------


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    for analysis in (LOGIT_LENS, DLA, NEURONS, DISTRIBUTION):
        register(analysis)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    for name, analysis, title, widget, figure in (
        ("lens-grid", "logit-lens", "logit lens grid (layers x positions)", "LensGridView", "lens_grid"),
        ("dla-bars", "dla", "direct logit attribution bars", "DLAView", "dla_bars"),
        ("neuron-panel", "neurons", "top neurons", "NeuronsView", None),
        ("distribution-live", "distribution", "next-token distribution (live temperature)", "DistributionView", None),
    ):
        register(View(name=name, analysis=analysis, title=title,
                      make=lazy_view("workbench_plugins.lens_view", widget),
                      figure=lazy_view("workbench_plugins.figures", figure) if figure else None))
