"""Which components cause a behaviour: ``ablation``, ``patching`` (with attribution patching) and
``steering``. They run the live model, reloaded by the run's provenance, on the run's prompts.

- ``ablation``: the metric with each attention head, MLP layer, whole layer (attention and MLP
  outputs) or residual-stream position (at the entry of each layer) replaced by zeros, by its mean
  over the run's prompts (``mean``), or by its value on the prompt's ``corrupted`` text
  (``resample``); beside the unablated baseline.
- ``patching``: activation patching. The model runs on the ``corrupted`` prompt with one
  component's activation taken from the clean prompt: residual stream (layer x position),
  attention output and MLP output (layer x position), single heads (layer x head, all positions).
  Normalised so 0 is the corrupted metric and 1 the clean one. With it, attribution patching: the
  first-order estimate ``grad(metric) . (clean - corrupted)`` for every component from one forward
  and one backward pass on the corrupted prompt, and its correlation with the real patching.
- ``steering``: generation with ``alpha`` times a unit direction (a stored ``direction`` or a
  .npy/.json file) added to the residual stream at one layer, beside the same seeded generation
  without it; the residual stream's projection onto the direction at every layer, both ways.

Metrics (``metric``): ``logit`` of the target, ``logit_diff`` (target - ``wrong``), ``prob`` of
the target, ``loss`` (ablation only: mean next-token cross-entropy). ``auto``: ``logit_diff`` where
there is a wrong token, else ``logit``. The target is the ``target`` parameter, else the prompt's
``answer``, else the next token, as in ``dla``. Decoders only. The engine is in ``intervene.py``.

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.ablation import compute_ablation, render_ablation
from workbench_plugins.directions import content_span, find_direction, load_direction_file, unit_vector
from workbench_plugins.intervene import Intervener, Row, hook_names
from workbench_plugins.intervention_setup import (
    ABLATION_COMPONENTS,
    METRICS,
    ablation_rows,  # noqa: F401 - public here too
    choose_components,
    components,
    corrupted_tokens,
    head_rows,
    input_tokens,
    make_metric,
    parse_prompts,
    position_rows,
)

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.hooknames import resid_post, resid_pre
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    import torch

    from workbench.models.model import Model

_PROMPTS = Param("prompts", str, "all", "which prompts: all, or a list like 0,3,5-7")

# --- activation and attribution patching -----------------------------------------------------------

PATCH_COMPONENTS = ("resid", "attn", "mlp", "heads")


def patch_rows(component: str, n_layers: int, n_heads: int, n: int) -> list[Row]:
    return head_rows(n_layers, n_heads) if component == "heads" else position_rows(component, n_layers, n)


def _hook_key(component: str) -> str:
    return "z" if component == "heads" else component


def attribution(component: str, grads: dict[str, torch.Tensor], clean: dict[str, torch.Tensor],
                corrupt: dict[str, torch.Tensor], n_layers: int) -> np.ndarray:
    """The linear estimate of patching each component: ``grad . (clean - corrupted)`` summed over
    the component's features; (layers, heads) for heads, (positions, layers) otherwise."""
    out = []
    for layer in range(n_layers):
        h = hook_names(layer)[_hook_key(component)]
        term = (grads[h].double() * (clean[h].double() - corrupt[h].double()))
        out.append(term.sum(dim=(0, 2)) if component == "heads" else term.sum(-1))
    stacked = np.stack([t.cpu().numpy() for t in out])
    return stacked if component == "heads" else stacked.T


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    x, y = x.ravel(), y.ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or x[ok].std() == 0 or y[ok].std() == 0:
        return None
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def compute_patching(ctx: AnalysisContext) -> Result:

    run, params = ctx.run, ctx.params
    if params["metric"] == "loss":
        raise UserError("patching reads the answer's logit at the last position; use metric logit_diff, logit or prob")
    indices = [i for i in parse_prompts(params["prompts"], ctx.prompts) if "corrupted" in ctx.task(i)]
    if not indices:
        raise UserError("none of these prompts has a 'corrupted' text to patch from")
    model = ctx.model()
    have = components(model)
    chosen = choose_components(params["component"], PATCH_COMPONENTS, have,
                     {"resid": "resid", "attn": "attn", "mlp": "mlp", "heads": "z"})
    n_layers = len(model.bridge.blocks)
    records: list[dict[str, Any]] = []
    out: dict[str, list[np.ndarray]] = {k: [] for c in chosen for k in (c, f"attr_{c}")}
    offset, t0, shared = 0, time.perf_counter(), True
    for done, i in enumerate(indices):
        clean = input_tokens(ctx, i)
        corrupt = corrupted_tokens(ctx, model, i, clean)
        assert corrupt is not None
        metric, desc = make_metric(ctx, model, i, clean)
        iv = Intervener(model, corrupt, metric)
        shared = shared and iv.shared_prefix
        hooks = [hook_names(layer)[_hook_key(c)] for c in chosen for layer in range(n_layers)]
        clean_logits, clean_acts = iv.cache(hooks, clean)
        clean_value = float(metric(clean_logits[:, metric.positions]))
        n_heads = int(clean_acts[hook_names(0)["z"]].shape[1]) if "heads" in chosen else 0
        denom = clean_value - iv.baseline
        rec: dict[str, Any] = {"index": i, "id": run.prompt_id(i), "n_tokens": len(clean), "offset": offset,
                               "corrupted": ctx.task(i)["corrupted"],
                               "corrupted_tokens": model.str_tokens(corrupt),
                               "changed_positions": [p for p in range(len(clean)) if clean[p] != corrupt[p]],
                               "clean": clean_value, "corrupted_value": iv.baseline, **desc}
        if abs(denom) < 1e-9:
            rec["note"] = "the metric is the same on both prompts: nothing to normalise by"
        scale = denom if abs(denom) >= 1e-9 else float("nan")
        grad_value, corrupt_acts, grads = iv.gradients(hooks) if params["attribution"] else (None, {}, {})
        correlations: dict[str, float | None] = {}
        rows = {c: patch_rows(c, n_layers, n_heads, len(clean)) for c in chosen}
        every = iv.run([r for c in chosen for r in rows[c]], clean_acts)  # one run: the rows share passes
        cuts = np.cumsum([len(rows[c]) for c in chosen])[:-1]
        for c, values in zip(chosen, np.split(every, cuts), strict=True):
            real = ((values - iv.baseline) / scale).reshape(n_layers, -1)
            real = real if c == "heads" else real.T  # heads: (layers, heads); else (positions, layers)
            out[c].append(real)
            if params["attribution"]:
                est = attribution(c, grads, clean_acts, corrupt_acts, n_layers) / scale
                out[f"attr_{c}"].append(est)
                correlations[c] = _pearson(real, est)
        rec["correlation"] = correlations
        rec["gradient_metric"] = grad_value
        offset += len(clean)
        records.append(rec)
        ctx.progress(done + 1, len(indices))
    arrays = {k: (np.stack(v) if k.endswith("heads") else np.concatenate(v)).astype(np.float64)
              for k, v in out.items() if v}
    data = {"components": chosen, "n_layers": n_layers, "attribution": params["attribution"],
            "n_heads": int(arrays["heads"].shape[-1]) if "heads" in arrays else None,
            "shared_prefix": shared, "seconds": round(time.perf_counter() - t0, 3), "prompts": records}
    return Result(data=data, arrays=arrays)


def render_patching(result: Result) -> str:
    d, a = result.data, result.arrays
    lines = [f"activation patching (clean into corrupted) of {', '.join(d['components'])}; "
             f"0 = corrupted, 1 = clean" + ("; attribution patching beside it" if d["attribution"] else "")]
    L = d["n_layers"]
    for n, rec in enumerate(d["prompts"]):
        lines += ["", (f"prompt {rec['index']}: {rec['metric_name']}: clean {rec['clean']:+.4f}, corrupted "
                  f"{rec['corrupted_value']:+.4f}; corrupted text {rec['corrupted']!r}")]
        if rec.get("note"):
            lines.append(f"  {rec['note']}")
        for c in d["components"]:
            if c == "heads":
                block = a["heads"][n]
                labels = [f"L{layer}H{h}" for layer in range(L) for h in range(block.shape[1])]
                attr = a["attr_heads"][n].ravel() if d["attribution"] else None
            else:
                block = a[c][rec["offset"] : rec["offset"] + rec["n_tokens"]]
                labels = [f"{c} L{layer} pos {p}" for p in range(rec["n_tokens"]) for layer in range(L)]
                attr = a[f"attr_{c}"][rec["offset"] : rec["offset"] + rec["n_tokens"]].ravel() if d["attribution"] else None
            corr = rec["correlation"].get(c)
            lines.append(f"  {c}: largest" + (f" (attribution vs patching: r = {corr:+.3f})" if corr is not None else ""))
            flat = block.ravel()
            for j in np.argsort(-np.nan_to_num(np.abs(flat)), kind="stable")[:6]:
                est = f"   attribution {attr[j]:+.3f}" if attr is not None else ""
                lines.append(f"    {labels[j]:>22}  {flat[j]:+.3f}{est}")
    return "\n".join(lines)


# --- steering -------------------------------------------------------------------------------------


def residual_hook(label: str, n_layers: int) -> str:
    """The hook of residual row ``label``: ``embed`` enters block 0, ``L`` leaves block ``L``."""
    if label == "embed":
        return resid_pre(0)
    if not label.isdigit() or int(label) >= n_layers:
        raise UserError(f"layer {label!r}: use embed or 0..{n_layers - 1}")
    return resid_post(int(label))


def steering_vector(ctx: AnalysisContext, model: Model, n_layers: int) -> tuple[np.ndarray, str, dict[str, Any]]:
    """The unit vector to add, the layer label, and where it came from."""
    spec, label = ctx.params["direction"], ctx.params["layer"]
    if not spec:
        raise UserError("steering needs a direction: --param steering.direction=NAME (a stored direction) or a "
                        ".npy/.json file")
    rows = ["embed", *map(str, range(n_layers))]
    if spec.endswith((".npy", ".json")) or "/" in spec:
        arr = load_direction_file(spec, int(model.bridge.cfg.d_model))
        if not label:
            raise UserError("steering with a file: give the layer with --param steering.layer=L")
        residual_hook(label, n_layers)
        if arr.ndim == 2:
            if arr.shape[0] != len(rows):
                raise UserError(f"direction file {spec}: {arr.shape[0]} rows; a per-layer file has {len(rows)} "
                                f"(embed, 0..{n_layers - 1})")
            arr = arr[rows.index(label)]
        source = {"kind": "file", "path": str(Path(spec).expanduser())}
    else:
        d = find_direction(ctx.run, spec)
        label = label or (d.layer or "")
        if not label:
            raise UserError(f"direction {spec!r} is meant for every layer: give one with --param steering.layer=L")
        residual_hook(label, n_layers)
        arr = d.at(label)
        source = {"kind": "direction", "name": spec, "source": d.source, "fitted_at": d.layer}
    if not np.linalg.norm(arr) > 0:
        raise UserError("the steering direction is all zeros")
    return unit_vector(arr), label, source


def generate(model: Model, tokens: list[int], n: int, hooks: list[tuple[str, Any]], settings: Any,
             seed: int, *, cache: bool = True) -> tuple[list[int], list[float]]:
    """``n`` tokens sampled after ``tokens`` with ``hooks`` active at every step (with the
    key-value cache, each new position on its own: ``cache=False`` reruns the whole sequence
    each step, for hooks that depend on positions); the chosen tokens and their model
    probabilities."""
    from workbench.capturing.sampling import generate as sample

    eos = getattr(model.tokenizer, "eos_token_id", None)
    [seq], [stats] = sample(model, [tokens], n, settings, [seed], fwd_hooks=hooks, stop_token=eos, cache=cache)
    return seq[len(tokens):], stats["model_prob"]


def compute_steering(ctx: AnalysisContext) -> Result:
    import torch

    from workbench.capturing.sampling import SamplingSettings

    params, run = ctx.params, ctx.run
    indices = parse_prompts(params["prompts"], ctx.prompts)
    settings = SamplingSettings(temperature=params["temperature"], top_k=params["top_k"] or None)
    model = ctx.model()
    n_layers = len(model.bridge.blocks)
    unit, label, source = steering_vector(ctx, model, n_layers)
    hook = residual_hook(label, n_layers)
    alpha = params["alpha"]
    add = torch.as_tensor(alpha * unit, dtype=torch.float32, device=model.device)

    def steer(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + add.to(act.dtype)

    rows = ["embed", *map(str, range(n_layers))]
    row_hooks = [residual_hook(r, n_layers) for r in rows]
    u = torch.as_tensor(unit, dtype=torch.float64)
    records, proj_prompt, proj_gen = [], [], []
    for done, i in enumerate(indices):
        tokens = input_tokens(ctx, i)
        rec: dict[str, Any] = {"index": i, "id": run.prompt_id(i), "n_tokens": len(tokens)}
        pp, pg = [], []
        for tag, hooks in (("plain", []), ("steered", [(hook, steer)])):
            ids, probs = generate(model, tokens, params["tokens"], hooks, settings, params["seed"])
            rec[tag] = {"ids": ids, "text": model.tokenizer.decode(ids), "tokens": model.str_tokens(ids),
                        "probs": probs}
            with torch.inference_mode(), model.bridge.hooks(fwd_hooks=hooks):
                _, cache = model.bridge.run_with_cache(torch.as_tensor([tokens + ids], device=model.device),
                                                       names_filter=lambda n: n in set(row_hooks))
            proj = torch.stack([cache[h][0].double() @ u for h in row_hooks])  # (rows, positions)
            start, end = content_span(run, i)
            pp.append(proj[:, start:end].mean(-1).numpy())
            pg.append(proj[:, len(tokens):].mean(-1).numpy() if ids else np.full(len(rows), np.nan))
        rec["same_output"] = rec["plain"]["ids"] == rec["steered"]["ids"]
        records.append(rec)
        proj_prompt.append(np.stack(pp))
        proj_gen.append(np.stack(pg))
        ctx.progress(done + 1, len(indices))
    data = {"direction": source, "layer": label, "hook": hook, "alpha": alpha, "tokens": params["tokens"],
            "sampling": settings.to_dict(), "seed": params["seed"], "rows": rows, "prompts": records}
    return Result(data=data, arrays={"projection_prompt": np.stack(proj_prompt),
                                     "projection_generated": np.stack(proj_gen)})


def render_steering(result: Result) -> str:
    d, a = result.data, result.arrays
    src = d["direction"]
    name = src.get("name") or src.get("path")
    lines = [(f"steering: {d['alpha']:+g} x unit({name}) added at layer {d['layer']} ({d['hook']}); "
             f"{d['tokens']} tokens, temperature {d['sampling']['temperature']:g}, seed {d['seed']}")]
    li = d["rows"].index(d["layer"])
    for n, rec in enumerate(d["prompts"]):
        lines += ["", f"prompt {rec['index']}:",
                  f"  without: {rec['plain']['text']!r}",
                  f"  with:    {rec['steered']['text']!r}" + ("   (same)" if rec["same_output"] else ""),
                  (f"  projection onto the direction at layer {d['layer']}, generated tokens: "
                  f"{a['projection_generated'][n, 0, li]:+.2f} without, {a['projection_generated'][n, 1, li]:+.2f} with")]
    return "\n".join(lines)


# --- registration ---------------------------------------------------------------------------------

TARGET_PARAMS = (  # the metric and target parameters, shared with feature-intervention
    Param("metric", str, "auto", "logit_diff (answer - wrong), logit, prob or loss; auto: logit_diff "
          "where there is a wrong token, else logit", choices=METRICS),
    Param("target", str, "", "the token whose logit is measured (default: the prompt's answer, else the "
          "next token)"),
    Param("wrong", str, "", "the contrasting token of logit_diff (default: the prompt's wrong)"),
    _PROMPTS,
)

ABLATION = Analysis(
    name="ablation",
    description="the metric with each head, MLP, layer or residual position zero-, mean- or resample-ablated",
    version="1",
    compute=compute_ablation,
    needs_model=True,
    families=("decoder",),
    auto=False,
    params=(
        Param("method", str, "zero", "zero; mean (over the run's prompts); resample (from the prompt's "
              "'corrupted' text)", choices=("zero", "mean", "resample")),
        Param("component", str, "all", "heads, mlp, layers, positions (residual stream at each layer's "
              "entry), or all", choices=("all", *ABLATION_COMPONENTS)),
        *TARGET_PARAMS,
    ),
    render_text=render_ablation,
)

PATCHING = Analysis(
    name="patching",
    description="activation patching clean -> corrupted (residual, attention, MLP, heads) with attribution patching",
    version="1",
    compute=compute_patching,
    needs_model=True,
    needs_task=("corrupted",),
    families=("decoder",),
    auto=False,
    params=(
        Param("component", str, "all", "resid (layer x position), attn, mlp (layer x position), heads "
              "(layer x head), or all", choices=("all", *PATCH_COMPONENTS)),
        Param("attribution", bool, True, "also the gradient estimate (attribution patching) and its "
              "correlation with real patching"),
        *TARGET_PARAMS,
    ),
    render_text=render_patching,
)

STEERING = Analysis(
    name="steering",
    description="seeded generation with alpha x a direction added at a layer, beside the same generation without",
    version="1",
    compute=compute_steering,
    needs_model=True,
    families=("decoder",),
    auto=False,
    params=(
        Param("direction", str, "", "a stored direction's name, or a .npy/.json file ((d_model,) or one row "
              "per residual layer)"),
        Param("layer", str, "", "residual layer to add it at: embed or 0..L-1 (after that layer); default: "
              "the layer the direction was fitted at"),
        Param("alpha", float, 8.0, "how much of the unit direction to add (residual norms are in the "
              "direction's projection view)"),
        Param("tokens", int, 20, "tokens to generate", min=1, max=512),
        Param("temperature", float, 1.0, "sampling temperature; 0 = greedy", min=0.0),
        Param("top_k", int, 0, "sample from the k most likely tokens (0: all)", min=0),
        Param("seed", int, 0, "random seed, the same for both generations"),
        _PROMPTS,
    ),
    render_text=render_steering,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    for a in (ABLATION, PATCHING, STEERING):
        register(a)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    module = "workbench_plugins.interventions_view"
    register(View(name="ablation-matrix", analysis="ablation", title="Ablation: layer x head, layer x position",
                  make=lazy_view(module, "AblationView")))
    register(View(name="patching-matrix", analysis="patching", title="Patching: real and attribution",
                  make=lazy_view(module, "PatchingView")))
    register(View(name="steering-side-by-side", analysis="steering", title="Steering: with and without",
                  make=lazy_view(module, "SteeringView")))
