"""``distribution``: the model's next-token distribution at a position, through softmax at several
temperatures — entropy, top-k tokens and their mass, the nucleus (top-p) size, seeded samples.

Not a lens: it reads no activations, only the stored tokens, and runs the model (reloaded by the
run's provenance) over them for the full-vocabulary logits a run does not store. The softmax is
the one ``capture --generate``'s sampler uses (``workbench.capturing.sampling``). Registered by the
``lens`` plugin (``lens.py``); its terminal view is ``lens_view.DistributionView``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from workbench_plugins.readout import token_position

from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError


def parse_temperatures(text: str) -> list[float]:
    try:
        temps = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"temperatures {text!r}: give numbers separated by commas, e.g. 0,0.7,1,1.5") from None
    if not temps or any(not (t >= 0 and math.isfinite(t)) for t in temps):
        raise UserError(f"temperatures {text!r}: each must be a finite number >= 0 (0 = greedy)")
    return temps


def distribution_at(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> dict[str, Any]:
    """Softmax of ``logits / temperature`` (float64): entropy, top-k tokens and mass, nucleus size
    and mass. Uses the same function as ``capture --generate``'s sampler."""
    import torch

    from workbench.capturing.sampling import SamplingSettings, entropy, sampling_distribution

    p = sampling_distribution(torch.as_tensor(logits), SamplingSettings(temperature=temperature))
    top = torch.topk(p, min(top_k, int((p > 0).sum())))
    sorted_p = torch.sort(p, descending=True).values
    nucleus = int(torch.searchsorted(torch.cumsum(sorted_p, 0), torch.tensor(top_p, dtype=p.dtype)).item()) + 1
    nucleus = min(nucleus, p.numel())
    return {"probs": p, "entropy": entropy(p) + 0.0, "top_ids": top.indices.tolist(), "top_probs": top.values.tolist(),
            "top_k_mass": float(top.values.sum()), "nucleus_size": nucleus,
            "nucleus_mass": float(sorted_p[:nucleus].sum())}


def sample_ids(probs: Any, n: int, seed: int, i: int, t_index: int) -> list[int]:
    """``n`` tokens drawn with replacement, from a generator seeded by (seed, prompt, temperature):
    the same call gives the same tokens."""
    import torch

    if n == 0:
        return []
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + i * 1_009 + t_index) % (2**63 - 1))
    return [int(x) for x in torch.multinomial(probs, n, replacement=True, generator=g)]


def distribution_compute(ctx: AnalysisContext) -> Result:
    import torch

    run, params = ctx.run, ctx.params
    temps = parse_temperatures(params["temperatures"])
    model = ctx.model()
    rows: list[np.ndarray | None] = []
    records: list[dict[str, Any]] = []
    for done, i in enumerate(ctx.prompts):
        pos = token_position(run, i, params["position"])
        if pos is None:
            records.append({"index": i, "id": run.prompt_id(i), "skipped": f"has {run.n_tokens(i)} tokens"})
            rows.append(None)
            continue
        tokens = torch.as_tensor(run.tokens(i)[: pos + 1], dtype=torch.long, device=model.device)[None]
        with torch.inference_mode():
            logits = model.forward(tokens)[0, -1].double().cpu()
        rows.append(logits.float().numpy())
        per_t = []
        for ti, temp in enumerate(temps):
            dist = distribution_at(logits.numpy(), temp, params["top_k"], params["top_p"])
            samples = sample_ids(dist.pop("probs"), params["samples"], params["seed"], i, ti)
            per_t.append({"temperature": temp, **{k: v for k, v in dist.items()},
                          "top_tokens": model.str_tokens(dist["top_ids"]),
                          "samples": samples, "sample_tokens": model.str_tokens(samples)})
        records.append({"index": i, "id": run.prompt_id(i), "position": pos, "token": run.str_tokens(i)[pos],
                        "temperatures": per_t})
        ctx.progress(done + 1, len(ctx.prompts))
    width = next((len(r) for r in rows if r is not None), 0)
    table = np.full((len(rows), width), np.nan, np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            table[i] = r
    data = {"position": params["position"], "temperatures": temps, "top_k": params["top_k"],
            "top_p": params["top_p"], "samples": params["samples"], "seed": params["seed"], "prompts": records}
    return Result(data=data, arrays={"logits": table})


def distribution_text(result: Result) -> str:
    d = result.data
    lines = []
    for r in d["prompts"][:5]:
        if "skipped" in r:
            lines += [f"prompt {r['index']}: skipped ({r['skipped']})", ""]
            continue
        lines.append(f"prompt {r['index']}, after position {r['position']} {r['token']!r}:")
        for t in r["temperatures"]:
            tops = ", ".join(f"{s!r} {p:.1%}" for s, p in zip(t["top_tokens"][:5], t["top_probs"][:5]))
            lines.append(f"  T={t['temperature']:<4g} entropy {t['entropy']:.3f} nats; top-{d['top_k']} mass "
                         f"{t['top_k_mass']:.1%}; top-p {d['top_p']:g} takes {t['nucleus_size']} "
                         f"token{'s' if t['nucleus_size'] != 1 else ''}; {tops}")
            if t["sample_tokens"]:
                lines.append(f"         samples (seed {d['seed']}): " + " ".join(repr(s) for s in t["sample_tokens"]))
        lines.append("")
    return "\n".join(lines).rstrip()


DISTRIBUTION = Analysis(
    name="distribution",
    description="next-token softmax at several temperatures: entropy, top-k and top-p mass, seeded samples",
    version="1",
    compute=distribution_compute,
    needs_model=True,  # the logits come from a forward pass on the stored tokens: no hooks
    # It reads no stored loss or top-k, but a run holds them exactly when its model has a trained
    # LM head: without one, temperatures and samples of its logits would be noise.
    needs_lm_outputs=True,
    families=("decoder",),
    params=(Param("position", int, -1, "token position whose next-token distribution is shown"),
            Param("temperatures", str, "0,0.5,1,2", "comma-separated temperatures (0 = greedy)"),
            Param("top_k", int, 10, "tokens listed, and the top-k mass", min=1),
            Param("top_p", float, 0.9, "nucleus mass: how many tokens it takes", min=0.0, max=1.0),
            Param("samples", int, 10, "tokens sampled per temperature", min=0, max=100_000),
            Param("seed", int, 0, "sampling seed")),
    render_text=distribution_text,
)
