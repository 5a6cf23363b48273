"""``diff``: what changed between two runs — two models of one architecture (base and fine-tune,
two checkpoints, float32 and bfloat16), or one model on two prompt sets (clean and corrupted).

Prompts are paired by id (else by text). A pair is compared token by token when its token
counts agree; runs of two different models must also agree on the token ids (a pair that
tokenizes differently is listed, not compared). For every hook both runs hold: per token the
relative L2 difference (run A the reference) and the cosine similarity; for attention patterns
the Jensen–Shannon divergence of each head's row; for the LM outputs the KL between the
next-token distributions (from the stored top-k: a lower bound) and the predictions that moved
most; and, where both models reload, the logit lens of each layer through each model's own final
norm and unembedding, and the KL between them (exact, full vocabulary): the depth at which the two
models start to disagree. ``plugins/diff_math.py`` holds the measures.

The result is stored beside run A, keyed by run B's path and identity (a new capture at that
path computes it again). ``workbench diff RUN_A RUN_B`` runs it and prints the summary.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins import diff_math as M

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.store import Run

LENS_BUDGET = 200_000
"""Token-layers ``lens=auto`` computes at most (each is a full-vocabulary readout per model)."""


def layer_of(hook: str) -> int | None:
    m = re.search(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


def _other(run: Run, params: dict[str, Any]) -> Path:
    text = str(params.get("other") or "")
    if not text:
        raise UserError("diff needs the second run: --param diff.other=RUN_B (or 'workbench diff RUN_A RUN_B')")
    p = Path(text).expanduser()
    return p if p.is_absolute() else Path(os.path.abspath(p))


def inputs(run: Run, params: dict[str, Any]) -> dict[str, Any]:
    """The second run's identity: a new capture at its path computes the diff again."""
    from workbench.store import (
        open_run,  # h5py: not at import (commands like 'models' load every plugin)
    )

    with open_run(_other(run, params)) as other:
        return {"other_run_id": other.run_id, "other_prompts": len(other)}


def common_hooks(a: Run, b: Run) -> list[str]:
    """Stored tensors both runs hold with the same layout; a shared hook of another shape refuses."""
    out = []
    for name, spec in a.hooks.items():
        other = b.hooks.get(name)
        if other is None or other.layout != spec.layout or other.streams != spec.streams:
            continue
        if other.feature_shape != spec.feature_shape:
            raise UserError(f"{name} has shape {list(spec.feature_shape)} in {a.final_path.name} and "
                            f"{list(other.feature_shape)} in {b.final_path.name}: the runs' models differ "
                            "in width (diff compares models of one architecture)")
        out.append(name)
    if not out:
        raise UserError(f"{a.final_path.name} and {b.final_path.name} hold no hook in common "
                        "(capture both with the same --hooks)")
    return out


def pairs_of(a: Run, b: Run, n_a: int) -> tuple[str, list[M.Pair], list[dict[str, Any]]]:
    """Compared pairs and the ones left out (with why)."""
    how, raw = M.pair_prompts(a.prompt_ids[:n_a], b.prompt_ids, a.prompts[:n_a], b.prompts)
    same_model = a.model_name == b.model_name
    compared, left = [], []
    for i, j, label in raw:
        ta = [a.tokens(i, s) for s in a.streams]
        tb = [b.tokens(j, s) for s in b.streams]
        if [len(t) for t in ta] != [len(t) for t in tb]:
            left.append({"a": i, "b": j, "id": label, "reason": f"{len(ta[0])} tokens against {len(tb[0])}"})
            continue
        same = all(np.array_equal(x, y) for x, y in zip(ta, tb, strict=True))
        if not same and not same_model:
            left.append({"a": i, "b": j, "id": label, "reason": "tokenized differently by the two models"})
            continue
        compared.append(M.Pair(i, j, label, len(ta[0]), same))
    if not compared:
        why = f"; {len(left)} paired prompts differ in tokens" if left else ""
        raise UserError(f"{a.final_path.name} and {b.final_path.name} have no prompts in common "
                        f"(paired by id, else by text){why}")
    return how, compared, left


def compute(ctx: AnalysisContext) -> Result:
    run = ctx.run
    from workbench.store import open_run

    with open_run(_other(run, ctx.params)) as other:
        return _diff(ctx, run, other)


def _diff(ctx: AnalysisContext, a: Run, b: Run) -> Result:
    if a.family != b.family or a.model_info["d_model"] != b.model_info["d_model"]:
        raise UserError(f"{a.final_path.name} ({a.model_name}: {a.family}, d_model {a.model_info['d_model']}) and "
                        f"{b.final_path.name} ({b.model_name}: {b.family}, d_model {b.model_info['d_model']}) "
                        "are not of one architecture")
    hooks = common_hooks(a, b)
    how, pairs, left = pairs_of(a, b, ctx.n_prompts)
    arrays: dict[str, np.ndarray] = {}
    streams = {s: np.cumsum([0] + [a.n_tokens(p.a, s) for p in pairs]) for s in a.streams}
    for s, off in streams.items():
        arrays[f"offsets.{s}"] = off.astype(np.int64)
    token_hooks = [h for h in hooks if a.hooks[h].layout == "token"]
    square_hooks = [h for h in hooks if a.hooks[h].layout == "square"]
    total = len(token_hooks) + len(square_hooks)
    hook_rows = []
    for k, h in enumerate(token_hooks):
        rels, coss = [], []
        for p in pairs:  # each activation read once, for both measures
            xa, xb = a.activation(h, p.a), b.activation(h, p.b)
            rels.append(M.rel_l2(xa, xb))
            coss.append(M.cosine(xa, xb))
        rel, cos = np.concatenate(rels), np.concatenate(coss)
        arrays[f"rel_l2.{k}"], arrays[f"cos.{k}"] = rel.astype(np.float32), cos.astype(np.float32)
        hook_rows.append({"hook": h, "layer": layer_of(h), "stream": a.hooks[h].stream_of_rows(),
                          "rel_l2": M.summary(rel), "cos": M.summary(cos)})
        ctx.progress(k + 1, total, h)
    head_rows = []
    for k, h in enumerate(square_hooks):
        per = []
        for p in pairs:
            pa, pb = a.activation(h, p.a), b.activation(h, p.b)
            per.append(M.js(pa, pb).T)  # (queries, heads)
        values = np.concatenate(per)
        arrays[f"js.{k}"] = values.astype(np.float32)
        means = values.mean(axis=0) if len(values) else np.zeros(values.shape[1])
        head_rows.append({"hook": h, "layer": layer_of(h), "stream": a.hooks[h].square_streams()[0],
                          "js": M.summary(values), "heads": [float(x) for x in means]})
        ctx.progress(len(token_hooks) + k + 1, total, h)
    lm = _lm(a, b, pairs, arrays)
    lens = _lens(ctx, a, b, pairs, arrays)
    data = {
        "a": _about(a, ctx.n_prompts), "b": _about(b, len(b)),
        "paired_by": how, "pairs": [vars(p) for p in pairs], "left_out": left,
        "token_hooks": hook_rows, "square_hooks": head_rows, "lm": lm, "lens": lens,
        "ranked": _ranked(hook_rows, head_rows, pairs, arrays, lm),
    }
    return Result(data=data, arrays=arrays)


def _about(run: Run, n: int) -> dict[str, Any]:
    return {"path": str(run.final_path), "model": run.model_name, "run_id": run.run_id, "n_prompts": n,
            "storage_dtype": run.storage_dtype}


def _lm(a: Run, b: Run, pairs: list[M.Pair], arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Next-token distributions from the stored top-k: KL lower bound, loss change, moved tokens."""
    if not (a.has_lm_outputs and b.has_lm_outputs) or a.lm_stream != b.lm_stream:
        return None
    kls, loss_a, loss_b, moved = [], [], [], []
    for n, p in enumerate(pairs):
        ia, la = a.top_k(p.a)
        ib, lb = b.top_k(p.b)
        kls.append(M.kl_topk(ia, la, ib, lb))
        loss_a.append(a.loss(p.a).astype(np.float64))
        loss_b.append(b.loss(p.b).astype(np.float64))
        for t in range(len(ia)):
            pa = dict(zip(ia[t].tolist(), np.exp(la[t].astype(np.float64)).tolist(), strict=True))
            pb = dict(zip(ib[t].tolist(), np.exp(lb[t].astype(np.float64)).tolist(), strict=True))
            floor_a, floor_b = min(pa.values()), min(pb.values())
            for tok in set(pa) | set(pb):
                x, y = pa.get(tok), pb.get(tok)
                change = (y if y is not None else floor_b) - (x if x is not None else floor_a)
                if change:
                    moved.append((abs(change), n, t, tok, x, y))
    kl = np.concatenate(kls)
    la_all, lb_all = np.concatenate(loss_a), np.concatenate(loss_b)
    dl = lb_all - la_all
    arrays["kl_topk"], arrays["dloss"] = kl.astype(np.float32), dl.astype(np.float32)
    moved.sort(key=lambda m: -m[0])
    top = []
    for _, n, t, tok, x, y in moved[:20]:
        top.append({"pair": n, "position": t, "token": a.token_strings([tok])[0], "id": int(tok),
                    "p_a": x, "p_b": y})
    return {"kl_topk": M.summary(kl), "dloss": M.summary(dl), "mean_loss_a": M.summary(la_all)["mean"],
            "mean_loss_b": M.summary(lb_all)["mean"], "moved": top}


def _lens(ctx: AnalysisContext, a: Run, b: Run, pairs: list[M.Pair], arrays: dict[str, np.ndarray]
          ) -> dict[str, Any]:
    """Per layer: KL between the two models' logit lens of their own residual stream (exact)."""
    mode = ctx.params["lens"]
    if mode == "off":
        return {"skipped": "lens=off"}
    layers = []
    while f"blocks.{len(layers)}.hook_resid_post" in a.aliases and f"blocks.{len(layers)}.hook_resid_post" in b.aliases:
        layers.append(len(layers))
    n_tokens = sum(p.n_tokens for p in pairs)
    why = None
    if a.family != "decoder":
        why = "the logit lens needs a decoder"
    elif not layers:
        why = "the runs do not both hold blocks.L.hook_resid_post"
    elif mode == "auto" and n_tokens * len(layers) > LENS_BUDGET:
        why = f"{n_tokens * len(layers):,} token-layers is over lens=auto's {LENS_BUDGET:,} (lens=on computes it)"
    if why:
        if mode == "on":
            raise UserError(f"diff cannot compute the logit lens: {why}")
        return {"skipped": why}
    try:
        from workbench_plugins.readout import Readout

        ra, rb = Readout(ctx.model()), Readout(ctx.model_of(b))
    except UserError as exc:
        if mode == "on":
            raise
        return {"skipped": str(exc)}
    import torch

    out = np.zeros((len(layers), n_tokens), dtype=np.float32)
    for li in layers:
        hook = f"blocks.{li}.hook_resid_post"
        at = 0
        for p in pairs:
            xa, xb = a.activation(hook, p.a), b.activation(hook, p.b)
            la = torch.log_softmax(ra.logits(xa).double(), dim=-1).cpu().numpy()
            lb = torch.log_softmax(rb.logits(xb).double(), dim=-1).cpu().numpy()
            out[li, at : at + len(xa)] = M.kl_from_logprobs(la, lb)
            at += len(xa)
        ctx.progress(li + 1, len(layers), f"logit lens, layer {li}")
    arrays["lens_kl"] = out
    return {"layers": layers, "mean_kl": [float(x) for x in out.mean(axis=1)],
            "max_kl": [float(x) for x in out.max(axis=1)]}


def _ranked(hook_rows: list[dict[str, Any]], head_rows: list[dict[str, Any]], pairs: list[M.Pair],
            arrays: dict[str, np.ndarray], lm: dict[str, Any] | None) -> dict[str, Any]:
    """The hooks, heads, positions and prompts that changed most."""
    hooks = sorted(({"hook": r["hook"], "mean_rel_l2": r["rel_l2"]["mean"]} for r in hook_rows
                    if r["rel_l2"]["mean"] is not None), key=lambda r: -r["mean_rel_l2"])
    heads = sorted(({"hook": r["hook"], "layer": r["layer"], "head": h, "mean_js": v}
                    for r in head_rows for h, v in enumerate(r["heads"])), key=lambda r: -r["mean_js"])
    main = [k for k, r in enumerate(hook_rows) if r["stream"] == "tokens"]
    positions, prompts = [], []
    if main:
        stack = np.stack([arrays[f"rel_l2.{k}"] for k in main]).astype(np.float64)
        stack[~np.isfinite(stack)] = np.nan
        per_token = np.nanmean(stack, axis=0) if stack.size else np.zeros(0)
        off = arrays["offsets.tokens"]
        for n, p in enumerate(pairs):
            seg = per_token[off[n] : off[n + 1]]
            if len(seg):
                prompts.append({"pair": n, "id": p.id, "mean_rel_l2": float(np.nanmean(seg))})
                pos = int(np.nanargmax(seg))
                positions.append({"pair": n, "id": p.id, "position": pos, "mean_rel_l2": float(seg[pos])})
        prompts.sort(key=lambda r: -r["mean_rel_l2"])
        positions.sort(key=lambda r: -r["mean_rel_l2"])
    return {"hooks": hooks[:10], "heads": heads[:10], "positions": positions[:10], "prompts": prompts[:10]}


def _fmt(x: float | None, spec: str = ".4f") -> str:
    """Fixed point, or scientific for values too small to show there (bfloat16 rounding is ~1e-3)."""
    if x is None:
        return "-"
    if spec == ".4f" and x != 0 and abs(x) < 1e-3:
        return format(x, ".2e")
    return format(x, spec)


def render(result: Result) -> str:
    d = result.data
    out = [f"diff  A {d['a']['path']} ({d['a']['model']}, {d['a']['storage_dtype']})",
           f"      B {d['b']['path']} ({d['b']['model']}, {d['b']['storage_dtype']})",
           f"pairs {len(d['pairs'])} compared (paired by {d['paired_by']}), {len(d['left_out'])} left out"]
    for row in d["left_out"][:5]:
        out.append(f"      left out {row['id']}: {row['reason']}")
    differing = sum(1 for p in d["pairs"] if not p["same_tokens"])
    if differing:
        out.append(f"      {differing} pairs have different tokens at equal lengths (compared by position)")
    out.append("")
    out.append("hook                                         mean rel L2   max rel L2   mean cos   min cos")
    for r in d["token_hooks"]:
        out.append(f"{r['hook'][:44]:44s} {_fmt(r['rel_l2']['mean']):>12s} {_fmt(r['rel_l2']['max']):>12s} "
                   f"{_fmt(r['cos']['mean']):>10s} {_fmt(r['cos']['min']):>9s}")
    if d["square_hooks"]:
        out.append("")
        out.append("attention pattern                            mean JS (nats)   max JS   most changed head")
        for r in d["square_hooks"]:
            top = int(np.argmax(r["heads"])) if r["heads"] else 0
            out.append(f"{r['hook'][:44]:44s} {_fmt(r['js']['mean']):>14s} {_fmt(r['js']['max']):>8s}   "
                       f"H{top} ({_fmt(r['heads'][top] if r['heads'] else None)})")
    lm = d["lm"]
    if lm:
        out.append("")
        out.append(f"next token: mean loss A {_fmt(lm['mean_loss_a'])}, B {_fmt(lm['mean_loss_b'])}; "
                   f"KL(A||B) from the top-k (a lower bound): mean {_fmt(lm['kl_topk']['mean'])}, "
                   f"max {_fmt(lm['kl_topk']['max'])}")
        for m in lm["moved"][:5]:
            out.append(f"      pair {m['pair']} position {m['position']}: {m['token']!r} "
                       f"{_fmt(m['p_a'], '.3f')} -> {_fmt(m['p_b'], '.3f')}")
    lens = d["lens"]
    out.append("")
    if "skipped" in lens:
        out.append(f"logit lens: not computed ({lens['skipped']})")
    else:
        out.append("logit lens, KL(A||B) per layer (nats):  " +
                   "  ".join(f"L{li} {_fmt(k)}" for li, k in zip(lens["layers"], lens["mean_kl"], strict=True)))
    r = d["ranked"]
    if r["hooks"]:
        out.append("most changed hooks: " + ", ".join(f"{h['hook']} ({_fmt(h['mean_rel_l2'])})" for h in r["hooks"][:5]))
    if r["heads"]:
        out.append("most changed heads: " + ", ".join(f"L{h['layer']}H{h['head']} ({_fmt(h['mean_js'])})" for h in r["heads"][:5]))
    if r["prompts"]:
        out.append("most changed prompts: " + ", ".join(f"{p['id']} ({_fmt(p['mean_rel_l2'])})" for p in r["prompts"][:5]))
    return "\n".join(out)


ANALYSIS = Analysis(
    name="diff",
    description="what changed between two runs: per hook and token relative L2 and cosine, per head "
                "Jensen-Shannon, next-token KL, logit-lens KL per layer",
    version="1",
    compute=compute,
    params=(
        Param("other", str, "", "the second run (B); run A is the one analysed"),
        Param("lens", str, "auto", "the logit lens of both models per layer: auto (when both reload "
              f"and it is at most {LENS_BUDGET:,} token-layers), on, off", choices=("auto", "on", "off")),
    ),
    render_text=render,
    auto=False,
    may_use_model=True,
    inputs=inputs,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(ANALYSIS)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    register(View(name="diff-heatmap", analysis="diff", title="run diff: heatmap, heads, predictions",
                  make=lazy_view("workbench_plugins.diff_view", "DiffView")))


@hookimpl
def register_commands(cli):  # type: ignore[no-untyped-def]
    import click

    @cli.command("diff")
    @click.argument("run_a", metavar="RUN_A")
    @click.argument("run_b", metavar="RUN_B")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("--lens", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="The logit lens of both models per layer (reloads both models).")
    @click.option("--force", is_flag=True, help="Compute again even if the diff is stored.")
    @click.option("--device", default="auto", show_default=True, help="Where the models run (for the lens).")
    def diff_cmd(run_a: str, run_b: str, as_json: bool, lens: str, force: bool, device: str) -> None:
        """What changed from RUN_A to RUN_B: two models of one architecture (checkpoints, a
        fine-tune, another dtype) or one model on two prompt sets of equal token lengths. Stored
        beside RUN_A as the 'diff' analysis (reused unless --force)."""
        import json

        from workbench.registries import analyze, build_analyses
        from workbench.store import open_run

        other = os.path.abspath(os.path.expanduser(run_b))
        if not Path(other).exists() and not Path(other + ".partial").exists():
            raise UserError(f"no such run: {run_b}")
        with open_run(run_a) as run:
            [o] = analyze(run, [build_analyses().get("diff")], {"diff": {"other": other, "lens": lens}},
                          force=force, device=device)
            if not o.ok:  # a bug, recorded with its traceback: shown as such
                click.echo(o.stored.meta.get("traceback") or o.stored.error, err=True)
                raise SystemExit(1)
            result = o.stored.result()
            if as_json:
                click.echo(json.dumps(result.data, indent=1, default=str))
            else:
                click.echo(render(result))
