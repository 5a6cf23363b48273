"""What the intervention analyses share: which prompts, their tokens, the metric, the corrupted
prompt, the model's components, and the rows of edits that ablate or patch one component at a
time (the engine that runs them is ``intervene.py``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from workbench_plugins.intervene import Edit, Metric, Row, hook_names
from workbench_plugins.lens import resolve_target

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.analysis import AnalysisContext
    from workbench.models.model import Model

METRICS = ("auto", "logit_diff", "logit", "prob", "loss")


# --- prompts, metric, components -----------------------------------------------------------------


def parse_prompts(text: str, available: range) -> list[int]:
    """``all`` or a list like ``0,3,5-7`` of prompt indices (each must be in ``available``)."""
    if text.strip() == "all":
        return list(available)
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"prompts: {text!r} is not 'all' or a list like 0,3,5-7")
        lo, hi = int(m[1]), int(m[2] or m[1])
        out.extend(range(lo, hi + 1))
    bad = [i for i in out if i not in available]
    if bad:
        raise UserError(f"prompts: the run has no prompt {bad[0]} (it has {len(available)})")
    return list(dict.fromkeys(out))


def input_tokens(ctx: AnalysisContext, i: int) -> list[int]:
    """Prompt ``i``'s input token ids (without generated tokens)."""
    run = ctx.run
    return [int(t) for t in run.tokens(i)[: run.n_input_tokens(i)]]


def make_metric(ctx: AnalysisContext, model: Model, i: int, tokens: list[int]) -> tuple[Metric, dict[str, Any]]:
    """Prompt ``i``'s metric and a description of it (target, wrong, kind, name)."""
    kind = ctx.params["metric"]
    t = resolve_target(ctx, model, i, len(tokens) - 1)
    if kind == "auto":
        kind = "logit_diff" if t["wrong_id"] is not None else "logit"
    if kind == "logit_diff" and t["wrong_id"] is None:
        raise UserError(f"metric logit_diff needs a wrong token: prompt {i} has no 'wrong' (give one with "
                        f"--param {ctx.analysis.name}.wrong=TOKEN)")
    names = {"logit": f"logit({t['target']!r})", "prob": f"p({t['target']!r})",
             "logit_diff": f"logit({t['target']!r}) - logit({t['wrong']!r})", "loss": "loss (mean next-token CE)"}
    desc = {"metric": kind, "metric_name": names[kind], "target": t["target"], "target_id": t["target_id"],
            "wrong": t["wrong"] if kind == "logit_diff" else None,
            "wrong_id": t["wrong_id"] if kind == "logit_diff" else None, "target_source": t["source"]}
    return Metric(kind, tokens, t["target_id"], t["wrong_id"] if kind == "logit_diff" else None), desc


def corrupted_tokens(ctx: AnalysisContext, model: Model, i: int, clean: list[int]) -> list[int] | None:
    """Token ids of prompt ``i``'s ``corrupted`` text (None when it has none); a UserError when
    its length differs from the clean prompt's."""
    text = ctx.task(i).get("corrupted")
    if text is None:
        return None
    ids = model.tokenize(str(text))
    if len(ids) != len(clean):
        raise UserError(f"prompt {i}: the corrupted prompt has {len(ids)} tokens and the clean one {len(clean)}; "
                        f"{ctx.analysis.name} needs the same length (token by token: "
                        f"{model.str_tokens(ids)} vs {model.str_tokens(clean)})")
    return ids


def components(model: Model) -> dict[str, bool]:
    """Which per-layer outputs the model has (attention-only models have no MLP)."""
    names, first = set(model.bridge.hook_dict), hook_names(0)
    return {kind: first[kind] in names for kind in ("attn", "mlp", "z")}


def choose_components(text: str, allowed: tuple[str, ...], have: dict[str, bool], needs: dict[str, str]) -> list[str]:
    """The components ``text`` names (``all``: every one of ``allowed``) that the model has
    (``have``, by the hook kind each needs: ``needs``); a UserError when none is left."""
    chosen = list(allowed) if text == "all" else [text]
    ok = [c for c in chosen if have.get(needs[c], True)]
    if not ok:
        raise UserError(f"this model has no {text} to intervene on (attention-only?)")
    return ok


# --- rows of edits -------------------------------------------------------------------------------


ABLATION_COMPONENTS = ("heads", "mlp", "layers", "positions")


def head_rows(n_layers: int, n_heads: int) -> list[Row]:
    """One row per head (layer-major): its ``hook_z`` at every position."""
    return [(Edit(hook_names(layer)["z"], layer, head=k),) for layer in range(n_layers) for k in range(n_heads)]


def position_rows(key: str, n_layers: int, n: int) -> list[Row]:
    """One row per layer and position (layer-major) of the ``key`` hook (``resid``, ``attn``, ``mlp``)."""
    return [(Edit(hook_names(layer)[key], layer, pos=p),) for layer in range(n_layers) for p in range(n)]


def ablation_rows(component: str, n_layers: int, n_heads: int, n: int, has_mlp: bool) -> list[Row]:
    """The rows that ablate one ``component`` kind at a time, layer-major: each head (``heads``),
    each MLP (``mlp``), each layer's attention and MLP together (``layers``), or the residual
    stream entering each layer at each position (``positions``)."""
    if component == "heads":
        return head_rows(n_layers, n_heads)
    if component == "positions":
        return position_rows("resid", n_layers, n)
    rows: list[Row] = []
    for layer in range(n_layers):
        h = hook_names(layer)
        if component == "mlp":
            rows.append((Edit(h["mlp"], layer),))
        else:  # layers
            rows.append((Edit(h["attn"], layer),) + ((Edit(h["mlp"], layer),) if has_mlp else ()))
    return rows
