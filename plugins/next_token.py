"""``next-token``: how well the model predicted each next token, from the stored run alone.

Reads the per-token loss and top-k predictions every capture of a model with an LM head stores
(no activations, no model). Per prompt and over the run: mean loss (nats), perplexity
(``exp`` of the mean loss) and top-1 accuracy (the stored top prediction is the actual next
token); and the hardest tokens of the run (highest loss) with their context.

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result


def _scored(ctx: AnalysisContext, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss, target ids, top-1 ids) at the positions with a target."""
    run = ctx.run
    loss = run.loss(i).astype(np.float64)
    top1 = run.top_k(i)[0][:, 0]
    if run.lm_target == "next":
        tokens = run.tokens(i)
        return loss[:-1], tokens[1:], top1[:-1]
    targets = run.targets(i)
    keep = ~np.isnan(loss)
    return loss[keep], targets[keep], top1[keep]


def compute(ctx: AnalysisContext) -> Result:
    run = ctx.run
    worst_n = ctx.params["worst"]
    prompts: list[dict[str, Any]] = []
    losses = np.full(len(ctx.prompts), np.nan)
    accuracy = np.full(len(ctx.prompts), np.nan)
    heap: list[tuple[float, int, int]] = []
    total_loss = total_hits = total_n = 0.0
    for i in ctx.prompts:
        loss, target, top1 = _scored(ctx, i)
        n = len(loss)
        hits = int((top1 == target).sum())
        record = {"index": i, "id": run.prompt_id(i), "n_scored": n,
                  "mean_loss": None, "perplexity": None, "top1_accuracy": None}
        if n:
            prompt_mean = float(loss.mean())
            losses[i], accuracy[i] = prompt_mean, hits / n
            record.update(mean_loss=prompt_mean, perplexity=math.exp(prompt_mean), top1_accuracy=hits / n)
            for pos in np.argsort(-loss)[:worst_n]:
                item = (float(loss[pos]), i, int(pos))
                (heapq.heappush if len(heap) < worst_n else heapq.heappushpop)(heap, item)
        prompts.append(record)
        total_loss += float(loss.sum())
        total_hits += hits
        total_n += n
        ctx.progress(i + 1, len(ctx.prompts))
    hardest = []
    stream = run.lm_stream
    for loss_value, i, pos in sorted(heap, reverse=True):
        strs = run.str_tokens(i, stream)
        target_pos = pos + 1 if run.lm_target == "next" else pos
        hardest.append({"prompt": i, "position": pos, "context": "".join(strs[max(0, pos - 5): pos + 1]),
                        "target": strs[target_pos] if run.lm_target == "next" else None,
                        "loss": loss_value})
    mean = total_loss / total_n if total_n else None
    data = {
        "n_prompts": len(ctx.prompts), "n_scored": int(total_n),
        "mean_loss": mean, "perplexity": math.exp(mean) if mean is not None else None,
        "top1_accuracy": total_hits / total_n if total_n else None,
        "prompts": prompts, "hardest": hardest,
    }
    return Result(data=data, arrays={"prompt_mean_loss": losses, "prompt_top1_accuracy": accuracy})


def render(result: Result) -> str:
    d = result.data
    if not d["n_scored"]:
        return "no scored tokens (every prompt is a single token)"
    lines = [(f"{d['n_prompts']} prompts, {d['n_scored']} scored tokens: mean loss {d['mean_loss']:.3f} "
              f"nats, perplexity {d['perplexity']:.2f}, top-1 accuracy {d['top1_accuracy']:.1%}"), ""]
    lines.append(f"{'prompt':>8}  {'tokens':>6}  {'loss':>7}  {'ppl':>9}  {'top-1':>6}  id")
    for p in d["prompts"][:20]:
        if p["n_scored"]:
            lines.append(f"{p['index']:>8}  {p['n_scored']:>6}  {p['mean_loss']:7.3f}  {p['perplexity']:9.2f}  "
                         f"{p['top1_accuracy']:6.1%}  {p['id']}")
    if len(d["prompts"]) > 20:
        lines.append(f"{'':>8}  ... {len(d['prompts']) - 20} more (--json for all)")
    if d["hardest"]:
        lines += ["", "hardest tokens:"]
        for h in d["hardest"]:
            target = f" -> {h['target']!r}" if h["target"] is not None else ""
            lines.append(f"  {h['loss']:7.3f}  prompt {h['prompt']}, position {h['position']}: "
                         f"{h['context']!r}{target}")
    return "\n".join(lines)


ANALYSIS = Analysis(
    name="next-token",
    description="loss, perplexity and top-1 accuracy of the next-token predictions; the hardest tokens",
    version="1",
    compute=compute,
    needs_lm_outputs=True,
    families=("decoder", "encoder-decoder"),
    params=(Param("worst", int, 10, "how many of the hardest tokens to list", min=0),),
    render_text=render,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(ANALYSIS)
