"""``features``: a run's activations encoded with a sparse autoencoder, summarised per feature.

``--param features.sae=`` names the SAE: empty for the newest ``sae`` result on this run, a hook
name or a result key for a stored one, or the path of a SAELens folder trained anywhere
(:func:`workbench_plugins.sae.find_sae`). The SAE's hook (``metadata.hook_name``; ``hook`` overrides)
is read from the run block by block, so memory is the SAE and one block, whatever the run's size.

Per feature (arrays, one row per feature):

- ``fires`` (tokens it is active on), ``density`` (that over the tokens encoded), ``max`` and
  ``mean_active`` (mean activation where active);
- top activating contexts: ``top_values``, ``top_prompt``, ``top_pos`` (``top`` per feature, best
  first; prompt -1 where it fired less often);
- ``hist``: how many tokens fall in each bin of ``log10(activation)`` (edges ``hist_edges``,
  active tokens only; values beyond the edges go to the end bins);
- logit effects where the run's model can be reloaded and has a trained LM head: the decoder row
  through the unembedding, ``W_dec[f] @ W_U`` (no final norm, as feature dashboards do), its
  ``logits`` largest (``promoted_ids``/``promoted``) and smallest (``suppressed_ids``/``suppressed``).

Positions are left out as the ``sae`` analysis leaves them out (``skip``), so densities are over
the tokens a dictionary is meant for. ``data["tokens"]`` lists, for prompt ``prompt``, the features
active at each position (the terminal view computes this for any prompt with
:func:`features_at`). Registered through the ``workbench`` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins import sae_data
from workbench_plugins.sae import SAE_PARAM, device_of, find_sae, sae_identity
from workbench_plugins.sae_format import SAE

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.store.reader import Run

HIST_EDGES = np.linspace(-2.0, 4.0, 37)
"""``log10`` activation bin edges: 0.01 to 10,000 in 36 bins of a sixth of a decade."""
BLOCK_TOKENS = 1024


def check_fits(run: Run, sae: SAE, hook: str) -> str:
    """The hook the SAE reads, checked against the run (one line on a mismatch)."""
    hook = hook or sae.hook_name
    if not hook:
        raise UserError("the SAE does not say which hook it reads (metadata.hook_name): give "
                        "--param features.hook=NAME")
    spec = run.resolve(hook)
    if spec.layout != "token" or len(spec.feature_shape) != 1:
        raise UserError(f"{hook} is stored as {spec.layout} rows {tuple(spec.feature_shape)}, not one vector per token")
    if spec.feature_shape[0] != sae.d_in:
        raise UserError(f"the SAE reads {sae.d_in}-dimensional vectors but {hook} in "
                        f"{run.final_path.name} has {spec.feature_shape[0]}")
    return spec.name


def features_at(run: Run, sae: SAE, hook: str, i: int, top: int = 8) -> list[list[tuple[int, float]]]:
    """For each position of prompt ``i``: its active features, strongest first (at most ``top``),
    as ``(feature, activation)``. Numpy only (the terminal view uses it)."""
    x = run.activation(hook, i).astype(np.float32)
    rows, cols, vals = sae.encode_sparse(x)
    out: list[list[tuple[int, float]]] = [[] for _ in range(len(x))]
    for r, c, v in zip(rows.tolist(), cols.tolist(), vals.tolist(), strict=True):
        out[r].append((c, v))
    return [sorted(feats, key=lambda fv: -fv[1])[:top] for feats in out]


def logit_effects(sae: SAE, unembed: Any, n: int) -> dict[str, np.ndarray]:
    """The ``n`` tokens each feature's decoder row promotes most and suppresses most through the
    unembedding ``(d_vocab, d_model)``, in chunks of features."""
    import torch

    W_dec = torch.as_tensor(sae.W_dec, dtype=torch.float32, device=unembed.device)
    out: dict[str, list[Any]] = {k: [] for k in ("promoted_ids", "promoted", "suppressed_ids", "suppressed")}
    for s in range(0, sae.d_sae, 256):
        logits = W_dec[s:s + 256] @ unembed.T
        hi = logits.topk(n, dim=-1)
        lo = (-logits).topk(n, dim=-1)
        out["promoted_ids"].append(hi.indices.cpu().numpy())
        out["promoted"].append(hi.values.cpu().numpy())
        out["suppressed_ids"].append(lo.indices.cpu().numpy())
        out["suppressed"].append(-lo.values.cpu().numpy())
    return {k: np.concatenate(v).astype(np.int32 if k.endswith("_ids") else np.float32) for k, v in out.items()}


def compute_features(ctx: AnalysisContext) -> Result:
    import torch

    p = ctx.params
    run = ctx.run
    sae, source = find_sae(run, p["sae"])
    hook = check_fits(run, sae, p["hook"])
    sel = sae_data.select(run, hook, ctx.prompts, 0.0, p["skip"], 0)
    device = device_of(p["device"])
    w = sae.torch_weights(device)
    F, N = sae.d_sae, p["top"]
    fires = torch.zeros(F, dtype=torch.long)
    total = torch.zeros(F, dtype=torch.float64)
    vmax = torch.zeros(F, dtype=torch.float32)
    top_v = torch.full((N, F), -1.0)
    top_p = torch.full((N, F), -1, dtype=torch.int32)
    top_t = torch.full((N, F), -1, dtype=torch.int32)
    n_bins = len(HIST_EDGES) - 1
    hist = torch.zeros(F * n_bins, dtype=torch.long)
    lo, per_bin = HIST_EDGES[0], n_bins / (HIST_EDGES[-1] - HIST_EDGES[0])
    n_tokens = 0
    all_blocks = sae_data.blocks(sel, sel.train, BLOCK_TOKENS)
    for b, block in enumerate(all_blocks):
        rows, prompts_np, pos_np = sae_data.read_block_where(run, sel, block)
        if not len(rows):
            continue
        prompt_of = torch.as_tensor(prompts_np, dtype=torch.int32)
        pos_of = torch.as_tensor(pos_np, dtype=torch.int32)
        with torch.no_grad():
            acts = sae.torch_encode(torch.from_numpy(rows).to(device), w).cpu()
            active = acts > 0
            fires += active.sum(0)
            total += acts.sum(0, dtype=torch.float64)
            vmax = torch.maximum(vmax, acts.max(0).values)
            k = min(N, len(acts))
            v, idx = acts.topk(k, dim=0)
            cand_v = torch.cat([top_v, v])
            cand_p = torch.cat([top_p, prompt_of[idx]])
            cand_t = torch.cat([top_t, pos_of[idx]])
            keep_v, order = cand_v.topk(N, dim=0)
            top_v, top_p, top_t = keep_v, cand_p.gather(0, order), cand_t.gather(0, order)
            t_idx, f_idx = active.nonzero(as_tuple=True)
            vals = acts[t_idx, f_idx]
            bins = ((torch.log10(vals) - lo) * per_bin).floor().clamp(0, n_bins - 1).long()
            hist += torch.bincount(f_idx * n_bins + bins, minlength=F * n_bins)
        n_tokens += len(rows)
        ctx.progress(b + 1, len(all_blocks))
    empty = top_v <= 0
    top_p[empty], top_t[empty] = -1, -1
    fires_np = fires.numpy()
    arrays: dict[str, np.ndarray] = {
        "fires": fires_np.astype(np.int64), "density": (fires_np / max(n_tokens, 1)).astype(np.float32),
        "max": vmax.numpy(), "mean_active": (total.numpy() / np.maximum(fires_np, 1)).astype(np.float32),
        "top_values": top_v.clamp(min=0).T.contiguous().numpy(), "top_prompt": top_p.T.contiguous().numpy(),
        "top_pos": top_t.T.contiguous().numpy(), "hist": hist.view(F, n_bins).numpy().astype(np.int32),
        "hist_edges": HIST_EDGES.astype(np.float32),
    }
    data: dict[str, Any] = {"sae": {"source": source, "spec": p["sae"], "describe": sae.describe(),
                                    "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
                                    "k": sae.k},
                            "hook": hook, "tokens_encoded": n_tokens, "prompts": len(sel.train),
                            "skipped": {"first_position": sel.skip_first, "special_tokens": sel.skip_special,
                                        "norm_above": sel.max_norm},
                            "dead": int((fires_np == 0).sum()),
                            "dense": int((fires_np > 0.1 * max(n_tokens, 1)).sum())}
    data["logits"] = logits_part(ctx, sae, p["logits"], arrays)
    if 0 <= p["prompt"] < len(run):
        shown = run.display_tokens(p["prompt"], sel.stream)
        data["tokens"] = {"prompt": p["prompt"], "rows": [
            {"pos": t, "token": str(shown[t]) if t < len(shown) else "?",
             "features": [[f, round(a, 5)] for f, a in feats]}
            for t, feats in enumerate(features_at(run, sae, hook, p["prompt"]))]}
    data["highlights"] = highlights(run, arrays, data, 8)
    return Result(data=data, arrays=arrays)


def logits_part(ctx: AnalysisContext, sae: SAE, n: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    if n == 0:
        return {"note": "not asked (logits=0)"}
    try:
        model = ctx.model()
    except UserError as exc:
        return {"note": f"left out: the run's model cannot be reloaded ({str(exc).split(' (')[0]})"}
    from workbench_plugins.direction_math import token_matrices

    mats = token_matrices(model)
    if "unembed" not in mats:
        return {"note": f"left out: {model.name} has no trained LM head (its unembedding is noise)"}
    if mats["unembed"].shape[1] != sae.d_in:
        return {"note": f"left out: the SAE's {sae.d_in}-dimensional decoder rows are not in the "
                        f"residual stream ({mats['unembed'].shape[1]} dimensions) the unembedding reads"}
    arrays.update(logit_effects(sae, mats["unembed"], n))
    ids = np.unique(np.concatenate([arrays["promoted_ids"].ravel(), arrays["suppressed_ids"].ravel()]))
    return {"how": "W_dec[f] @ W_U (no final norm)", "n": n,
            "vocab": {str(int(i)): str(t) for i, t in zip(ids, ctx.run.display_ids(ids), strict=True)}}


def context_text(run: Run, i: int, pos: int, left: int = 8, right: int = 3) -> str:
    toks = run.display_tokens(i)
    a, b = max(0, pos - left), min(len(toks), pos + right + 1)
    return "".join(f"[[{toks[t]}]]" if t == pos else str(toks[t]) for t in range(a, b))


def highlights(run: Run, arrays: dict[str, np.ndarray], data: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The ``n`` features with the largest activations (among those firing on at least 3 tokens),
    with their best contexts and promoted tokens, for the text summary."""
    fires = arrays["fires"]
    order = [int(f) for f in np.argsort(-arrays["max"]) if fires[f] >= 3][:n]
    vocab = data.get("logits", {}).get("vocab", {})
    out = []
    for f in order:
        ctxs = [{"prompt": int(pi), "pos": int(t), "value": float(v), "text": context_text(run, int(pi), int(t))}
                for v, pi, t in zip(arrays["top_values"][f][:3], arrays["top_prompt"][f][:3],
                                    arrays["top_pos"][f][:3], strict=True) if pi >= 0]
        item = {"feature": f, "fires": int(fires[f]), "density": float(arrays["density"][f]),
                "max": float(arrays["max"][f]), "contexts": ctxs}
        if "promoted_ids" in arrays:
            item["promoted"] = [vocab.get(str(int(t)), str(int(t))) for t in arrays["promoted_ids"][f][:6]]
        out.append(item)
    return out


def render_features(result: Result) -> str:
    d = result.data
    a = result.arrays
    density = a.get("density")
    median = f"; median density {float(np.median(density)):.2%}" if density is not None and len(density) else ""
    lines = [f"{d['sae']['describe']} ({d['sae']['source']})",
             f"{d['tokens_encoded']:,} tokens of {d['prompts']:,} prompts encoded at {d['hook']}; "
             f"dead {d['dead']:,} of {d['sae']['d_sae']:,} features, dense (>10% of tokens) {d['dense']:,}"
             + median]
    logits = d.get("logits", {})
    if "note" in logits:
        lines.append(f"logit effects: {logits['note']}")
    for h in d.get("highlights", []):
        lines.append(f"feature {h['feature']}: max {h['max']:.3g}, fires on {h['fires']:,} tokens "
                     f"({h['density']:.3%})" + (f"; promotes {', '.join(repr(t) for t in h['promoted'])}"
                                                  if "promoted" in h else ""))
        for c in h["contexts"]:
            lines.append(f"    {c['value']:8.3g}  #{c['prompt']}:{c['pos']}  {c['text']}")
    return "\n".join(lines)


FEATURES = Analysis(
    name="features", version="3",
    description="A run encoded with an SAE: per feature density, max, top contexts, histogram, "
                "promoted and suppressed tokens",
    compute=compute_features, auto=False, may_use_model=True,
    inputs=lambda run, p: sae_identity(run, p["sae"]),
    params=(
        SAE_PARAM,
        Param("hook", str, "", "the hook to encode (default: the SAE's metadata.hook_name)"),
        Param("top", int, 20, "top activating contexts kept per feature", min=1, max=1000),
        Param("logits", int, 10, "promoted and suppressed tokens per feature (0: skip the model)", min=0, max=100),
        Param("skip", str, "auto", "positions left out, as for sae", choices=sae_data.SKIP_CHOICES),
        Param("prompt", int, 0, "prompt whose per-token features the result lists", min=0),
        Param("device", str, "auto", "cpu, cuda, cuda:N or auto"),
    ),
    render_text=render_features,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(FEATURES)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    register(View(name="feature-dashboard", analysis="features", title="SAE features: list, dashboard, fires here",
                  make=lazy_view("workbench_plugins.features_view", "FeaturesView"),
                  figure=lazy_view("workbench_plugins.figures", "feature_dashboard")))
