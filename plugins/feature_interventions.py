"""``feature-intervention``: one SAE feature ablated, clamped or steered along, through the
intervention engine (``intervene.py``), beside the unchanged model.

The SAE (``sae``: empty for the newest ``sae`` result on the run, a hook name, a result key, or a
SAELens folder; :func:`workbench_plugins.sae.find_sae`) reads hook ``h`` (its
``metadata.hook_name``; ``hook`` overrides). With ``x`` the activation at ``h`` at one position,
``a_f(x)`` feature ``f``'s activation (the SAE's own encoding) and ``c_f(a, x)`` what activation
``a`` of feature ``f`` adds to the SAE's reconstruction, ``decode(a·e_f, x) - decode(0, x)``
(``a · W_dec[f]`` for an SAE without input normalisation or decoder-norm rescaling), ``mode``:

- ``ablate``: ``x' = x - c_f(a_f(x), x)``. The feature's part of the reconstruction is removed and
  everything else is kept, the SAE's error term ``x - decode(encode(x))`` included; where the
  feature does not fire, nothing changes.
- ``clamp``: ``x' = x + c_f(value - a_f(x), x)``: the feature's part set to ``value`` (``value`` 0
  is ``ablate``).
- ``steer``: ``x' = x + alpha · W_dec[f] / |W_dec[f]|``: ``alpha`` times the decoder row's *unit*
  direction, as ``steering`` adds ``alpha`` times a unit direction (with unit-norm decoder rows, as
  the ``sae`` analysis trains, the same as ``alpha`` units of the feature's activation).

The edit applies at ``positions`` (all, or a list) of each prompt, less the positions ``skip``
leaves out (``auto``: a decoder's first position and special tokens, as the ``sae`` analysis
leaves them out of training). Each edit is a function of the activation the row has at ``h``, run
by the engine like ``ablation``'s edits (batched, sharing the unchanged prefix of the forward pass).

Per prompt: the metric (as ``ablation``'s) without and with the edit, the metric with the edit at
each position alone, and the feature's activation at every position before and after the edit;
with ``tokens`` > 0, seeded generation with the edit applied at every step beside the same
generation without it (as ``steering`` does), and the feature's activation on each generated text.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.intervene import Edit, Intervener, Row
from workbench_plugins.intervention_setup import input_tokens, make_metric, parse_prompts
from workbench_plugins.interventions import TARGET_PARAMS, generate
from workbench_plugins.sae import SAE_PARAM, find_sae, sae_identity
from workbench_plugins.sae_data import SKIP_CHOICES
from workbench_plugins.sae_format import SAE

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from workbench.models.model import Model

MODES = ("ablate", "clamp", "steer")
FORMULAS = {"ablate": "x' = x - a_f(x)·d_f", "clamp": "x' = x + (value - a_f(x))·d_f",
            "steer": "x' = x + alpha·d_f/|d_f|"}
"""How each mode edits the activation, ``d_f`` the decoder row (see the module's docstring)."""


class FeatureEdit:
    """The edit of one SAE feature at one hook, as torch functions of the activation."""

    def __init__(self, sae: SAE, feature: int, mode: str, *, value: float = 0.0, alpha: float = 0.0,
                 device: str = "cpu"):
        import torch

        if mode not in MODES:
            raise UserError(f"mode is one of {', '.join(MODES)}, not {mode!r}")
        if not 0 <= feature < sae.d_sae:
            raise UserError(f"feature {feature}: the SAE has {sae.d_sae} features (0..{sae.d_sae - 1})")
        self.sae, self.f, self.mode, self.value, self.alpha = sae, feature, mode, value, alpha
        self.w = sae.torch_weights(device)
        row = self.w["W_dec"][feature]
        self.decoder_norm = float(row.norm())
        if mode == "steer" and not self.decoder_norm > 0:
            raise UserError(f"feature {feature}'s decoder row is all zeros: nothing to steer along")
        self.unit = row / self.decoder_norm if self.decoder_norm > 0 else row
        # feature f alone, no bias: decode(a e_f, x) - decode(0, x) is its part of the reconstruction
        self.w_f = {"W_dec": self.w["W_dec"][feature : feature + 1], "b_dec": torch.zeros_like(self.w["b_dec"])}

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """``a_f(x)``: ``(...)`` of ``(..., d_in)`` float32."""
        return self.sae.torch_encode(x, self.w)[..., self.f]

    def part(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``c_f(a, x)``: what activation ``a`` (``(...)``) of the feature adds to the SAE's
        reconstruction of ``x``, ``(..., d_in)``."""
        dec = self.sae.torch_decode
        return dec(a[..., None], self.w_f, x) - dec(a[..., None] * 0, self.w_f, x)

    def __call__(self, act: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The edited activation ``(..., positions, d_in)``, changed only where ``mask``
        (``(positions,)`` bool; None: everywhere) holds; same dtype as ``act``."""
        x = act.float()
        if self.mode == "steer":
            delta = (self.alpha * self.unit).expand_as(x)
        else:
            a = self.activation(x)
            delta = self.part((self.value - a) if self.mode == "clamp" else -a, x)
        if mask is not None:
            delta = delta * mask[:, None].to(delta.dtype)
        return (x + delta).to(act.dtype)


def hook_layer(hook: str) -> int | None:
    """The block a hook belongs to (``blocks.L.…``), None outside the blocks."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m[1]) if m else None


def parse_positions(text: str, n: int) -> list[int] | None:
    """``all`` (None), or a list like ``0,3,5-7`` of positions (``-1``: the last) of an
    ``n``-token prompt; positions beyond the prompt are left out."""
    text = text.strip()
    if text == "all":
        return None
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"positions: {text!r} is not 'all' or a list like 0,3,5-7 (-1: the last)")
        lo = int(m[1])
        lo = lo + n if lo < 0 else lo
        hi = int(m[2]) if m[2] else lo
        out.extend(p for p in range(lo, hi + 1) if 0 <= p < n)
    return sorted(set(out))


def edit_mask(ctx: AnalysisContext, model: Model, tokens: list[int], skip: str) -> np.ndarray:
    """Which of the prompt's positions the edit applies to: ``positions``, less ``skip``'s."""
    n = len(tokens)
    chosen = parse_positions(ctx.params["positions"], n)
    mask = np.zeros(n, dtype=bool)
    mask[list(range(n)) if chosen is None else chosen] = True
    if skip in ("first", "auto") and n:
        mask[0] = False
    if skip in ("special", "auto"):
        table = ctx.run.token_table
        special = set(table.special) if table is not None else set(getattr(model.tokenizer, "all_special_ids", []))
        mask &= ~np.isin(np.asarray(tokens), list(special))
    return mask


def compute_feature_intervention(ctx: AnalysisContext) -> Result:
    import torch

    run, p = ctx.run, ctx.params
    if p["feature"] < 0:
        raise UserError("name the feature: --param feature-intervention.feature=N (the features analysis "
                        "lists them)")
    sae, where = find_sae(run, p["sae"])
    hook = p["hook"] or sae.hook_name
    if not hook:
        raise UserError("the SAE does not say which hook it reads (metadata.hook_name): give "
                        "--param feature-intervention.hook=NAME")
    if p["feature"] >= sae.d_sae:
        raise UserError(f"feature {p['feature']}: the SAE has {sae.d_sae} features (0..{sae.d_sae - 1})")
    indices = parse_prompts(p["prompts"], ctx.prompts)
    model = ctx.model()
    device = str(model.device)
    edit = FeatureEdit(sae, p["feature"], p["mode"], value=p["value"], alpha=p["alpha"], device=device)
    if hook not in model.bridge.hook_dict:
        raise UserError(f"{model.name} has no hook {hook!r} (the SAE reads it)")
    layer = hook_layer(hook)
    from workbench.capturing.sampling import SamplingSettings

    settings = SamplingSettings(temperature=p["temperature"], top_k=p["top_k"] or None)
    records: list[dict[str, Any]] = []
    per: dict[str, list[np.ndarray]] = {"activation": [], "activation_after": [], "position_values": []}
    offset, t0, shared = 0, time.perf_counter(), True
    for done, i in enumerate(indices):
        tokens = input_tokens(ctx, i)
        n = len(tokens)
        metric, desc = make_metric(ctx, model, i, tokens)
        iv = Intervener(model, tokens, metric, share_prefix=layer is not None, keep=[hook])
        shared = shared and iv.shared_prefix
        x = iv.clean[hook]
        if x.ndim != 2 or x.shape[-1] != sae.d_in:
            raise UserError(f"the SAE reads {sae.d_in}-dimensional vectors but {hook} of {model.name} is "
                            f"{tuple(x.shape[1:])} per token")
        mask_np = edit_mask(ctx, model, tokens, p["skip"])
        mask = torch.as_tensor(mask_np, device=x.device)

        def source(act: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return edit(act, mask)

        with torch.inference_mode():
            before = edit.activation(x.float())
            after = edit.activation(edit(x, mask).float())
        fired = before > 0
        edited = [q for q in range(n) if mask_np[q]]
        # one row with the edit at every chosen position, then one per position alone; ablating a
        # feature where it is silent changes nothing: those rows are the clean pass (no edit)
        at = Edit(hook, layer or 0)
        rows: list[Row] = [(at,) if edited else ()]
        rows += [() if p["mode"] == "ablate" and not bool(fired[q]) else (Edit(hook, layer or 0, pos=q),)
                 for q in edited]
        values = iv.run(rows, {hook: source})
        alone = np.full(n, np.nan)
        alone[edited] = values[1:]
        rec: dict[str, Any] = {
            "index": i, "id": run.prompt_id(i), "n_tokens": n, "offset": offset,
            "tokens": model.str_tokens(tokens), "edited_positions": edited,
            "fired_positions": [q for q in range(n) if bool(fired[q])],
            "baseline": iv.baseline, "intervened": float(values[0]), "change": float(values[0] - iv.baseline),
            **desc}
        if not edited:
            rec["note"] = "no position to edit (positions and skip leave none)"
        if p["tokens"] > 0:
            gen_hooks = [(hook, generation_hook(edit, mask_np, p["positions"].strip() == "all"))]
            for tag, hooks in (("plain", []), ("edited", gen_hooks)):
                # the edit's hook reads positions off the sequence: rerun it whole each step
                ids, probs = generate(model, tokens, p["tokens"], hooks, settings, p["seed"], cache=False)
                rec[tag] = {"ids": ids, "text": model.tokenizer.decode(ids), "tokens": model.str_tokens(ids),
                            "probs": probs,
                            "activation": generated_activation(model, edit, hook, tokens, ids)}
            rec["same_output"] = rec["plain"]["ids"] == rec["edited"]["ids"]
        per["activation"].append(before.double().cpu().numpy())
        per["activation_after"].append(after.double().cpu().numpy())
        per["position_values"].append(alone)
        records.append(rec)
        offset += n
        ctx.progress(done + 1, len(indices))
    data: dict[str, Any] = {
        "mode": p["mode"], "feature": p["feature"], "formula": FORMULAS[p["mode"]],
        "value": p["value"] if p["mode"] == "clamp" else None,
        "alpha": p["alpha"] if p["mode"] == "steer" else None,
        "sae": {"source": where, "spec": p["sae"], "describe": sae.describe(), "architecture": sae.architecture,
                "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, "model_name": sae.model_name},
        "hook": hook, "layer": layer, "decoder_norm": edit.decoder_norm, "positions": p["positions"],
        "skip": p["skip"], "tokens": p["tokens"], "sampling": settings.to_dict(), "seed": p["seed"],
        "shared_prefix": shared, "seconds": round(time.perf_counter() - t0, 3), "prompts": records}
    if sae.model_name and sae.model_name != run.model_name:
        data["note"] = f"the SAE was trained on {sae.model_name}, this run is {run.model_name}"
    return Result(data=data, arrays={k: np.concatenate(v).astype(np.float64) for k, v in per.items()})


def generation_hook(edit: FeatureEdit, mask: np.ndarray, everywhere: bool) -> Callable[..., Any]:
    """The edit as a hook for generation: the prompt's positions as ``mask`` says, generated
    positions too when the edit is at every position (``positions=all``)."""
    import torch

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        m = np.zeros(act.shape[1], dtype=bool)
        k = min(len(mask), len(m))
        m[:k] = mask[:k]
        m[len(mask):] = everywhere
        return edit(act, torch.as_tensor(m, device=act.device))
    return fn


def generated_activation(model: Model, edit: FeatureEdit, hook: str, tokens: list[int], ids: list[int]) -> list[float]:
    """The feature's activation at each generated token, in a pass of the unedited model over the
    prompt and the generated text (does the text itself evoke the feature?)."""
    import torch

    if not ids:
        return []
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.as_tensor([tokens + ids], device=model.device),
                                               names_filter=lambda name: name == hook)
        a = edit.activation(cache[hook][0, len(tokens):].float())
    return [round(float(v), 6) for v in a.cpu()]


def render_feature_intervention(result: Result) -> str:
    d, a = result.data, result.arrays
    how = ("ablated" if d["mode"] == "ablate" else f"clamped to {d['value']:g}" if d["mode"] == "clamp"
           else f"steered, alpha {d['alpha']:+g}")
    lines = [f"feature {d['feature']} {how} ({d['formula']}) at {d['hook']}; "
             f"{d['sae']['describe']} ({d['sae']['source']}); positions {d['positions']}, skip {d['skip']}"
             + ("" if d["shared_prefix"] else " (full forward passes: the blocks could not be replayed)")]
    if d.get("note"):
        lines.append(d["note"])
    for rec in d["prompts"]:
        s, n = rec["offset"], rec["n_tokens"]
        act, after, alone = a["activation"][s : s + n], a["activation_after"][s : s + n], a["position_values"][s : s + n]
        toks = rec["tokens"]
        lines += ["", (f"prompt {rec['index']}: {rec['metric_name']}: {rec['baseline']:+.4f} unchanged, "
                       f"{rec['intervened']:+.4f} {d['mode']} (change {rec['change']:+.4f})")]
        if rec.get("note"):
            lines.append(f"  {rec['note']}")
        fired = rec["fired_positions"]
        if fired:
            shown = sorted(fired, key=lambda q: -act[q])[:8]
            lines.append("  fires at: " + ", ".join(f"{q} {toks[q]!r} {act[q]:.3g}" + (
                f" (after {after[q]:.3g})" if q in rec["edited_positions"] else " (not edited)") for q in shown)
                + (f" and {len(fired) - len(shown)} more" if len(fired) > len(shown) else ""))
        else:
            lines.append("  the feature does not fire on this prompt")
        ok = [q for q in rec["edited_positions"] if np.isfinite(alone[q]) and alone[q] != rec["baseline"]]
        if ok:
            top = sorted(ok, key=lambda q: -abs(alone[q] - rec["baseline"]))[:6]
            lines.append("  at one position alone: " + ", ".join(
                f"{q} {toks[q]!r} {alone[q] - rec['baseline']:+.4f}" for q in top))
        if "plain" in rec:
            def mean(v: list[float]) -> str:
                return f"{np.mean(v):.3g}" if v else "-"
            lines += [f"  without: {rec['plain']['text']!r}",
                      f"  with:    {rec['edited']['text']!r}" + ("   (same)" if rec["same_output"] else ""),
                      (f"  feature's mean activation on the generated text (unedited pass): "
                       f"{mean(rec['plain']['activation'])} without, {mean(rec['edited']['activation'])} with")]
    return "\n".join(lines)


FEATURE_INTERVENTION = Analysis(
    name="feature-intervention",
    description="one SAE feature ablated, clamped or steered along: the metric and seeded generation, "
                "beside the unchanged model",
    version="1",
    compute=compute_feature_intervention,
    inputs=lambda run, p: sae_identity(run, p["sae"]),
    needs_model=True,
    families=("decoder",),
    auto=False,
    params=(
        SAE_PARAM,
        Param("feature", int, -1, "the feature to intervene on (required)"),
        Param("mode", str, "ablate", "ablate (remove a_f·d_f where it fires), clamp (set the activation to "
              "value), steer (add alpha x the unit decoder direction)", choices=MODES),
        Param("value", float, 0.0, "clamp: the activation to set (0: the same as ablate)"),
        Param("alpha", float, 8.0, "steer: how much of the unit decoder direction to add"),
        Param("positions", str, "all", "where to edit: all, or a list like 0,3,5-7 (-1: the last)"),
        Param("skip", str, "auto", "positions never edited: auto (a decoder's first position and special "
              "tokens, as sae leaves them out), first, special, none", choices=SKIP_CHOICES),
        Param("hook", str, "", "the hook to edit (default: the SAE's metadata.hook_name)"),
        *TARGET_PARAMS,
        Param("tokens", int, 20, "tokens to generate with and without the edit (0: none)", min=0, max=512),
        Param("temperature", float, 1.0, "sampling temperature; 0 = greedy", min=0.0),
        Param("top_k", int, 0, "sample from the k most likely tokens (0: all)", min=0),
        Param("seed", int, 0, "random seed, the same for both generations"),
    ),
    render_text=render_feature_intervention,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(FEATURE_INTERVENTION)
