"""``answer``: how strongly the model predicts each prompt's expected answer.

For every prompt whose JSONL line gave an ``answer`` (and optionally a contrasting ``wrong``):
the logit, probability and rank of the answer's first token at the last prompt position, and
the logit difference ``answer - wrong`` (the standard metric of circuit studies such as the
indirect-object task: " Mary" over " John"). Runs the model, reloaded by the provenance recorded
in the run, over the stored token ids: the full vocabulary is needed, and a run stores only the
top-k.

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Result


def first_token(model: Any, text: str) -> tuple[int, str, int]:
    """(id, string, number of tokens) of ``text`` tokenized on its own, without special tokens."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return int(ids[0]), model.tokenizer.decode([ids[0]]), len(ids)


def compute(ctx: AnalysisContext) -> Result:
    import torch

    run = ctx.run
    model = ctx.model()
    records: list[dict[str, Any]] = []
    with_answer = [i for i in ctx.prompts if "answer" in ctx.task(i)]
    diffs = []
    for done, i in enumerate(with_answer):
        task = ctx.task(i)
        tokens = torch.as_tensor(run.tokens(i)[: run.n_input_tokens(i)], dtype=torch.long,
                                 device=model.device)[None]
        with torch.inference_mode():
            logits = model.forward(tokens)[0, -1].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        aid, astr, an = first_token(model, str(task["answer"]))
        rank = int((logits > logits[aid]).sum()) + 1
        top = int(logits.argmax())
        rec: dict[str, Any] = {
            "index": i, "id": run.prompt_id(i), "answer": task["answer"], "answer_token": astr,
            "answer_id": aid, "answer_tokens": an, "logit": float(logits[aid]),
            "logprob": float(logprobs[aid]), "prob": float(logprobs[aid].exp()), "rank": rank,
            "top_token": model.tokenizer.decode([top]), "top_prob": float(logprobs[top].exp()),
            "wrong": None, "wrong_token": None, "logit_diff": None,
        }
        if "wrong" in task:
            wid, wstr, _ = first_token(model, str(task["wrong"]))
            rec.update(wrong=task["wrong"], wrong_token=wstr, wrong_id=wid,
                       wrong_prob=float(logprobs[wid].exp()),
                       logit_diff=float(logits[aid] - logits[wid]))
            diffs.append(rec["logit_diff"])
        records.append(rec)
        ctx.progress(done + 1, len(with_answer))
    data = {
        "n_prompts": len(ctx.prompts), "n_with_answer": len(records),
        "top1_accuracy": (sum(r["rank"] == 1 for r in records) / len(records)) if records else None,
        "mean_logit_diff": float(np.mean(diffs)) if diffs else None,
        "prompts": records,
    }
    return Result(data=data)


def render(result: Result) -> str:
    d = result.data
    if not d["n_with_answer"]:
        return ("no prompt has an 'answer' (give prompts as JSONL: "
                '{"prompt": "...", "answer": " Paris", "wrong": " London"})')
    lines = [f"{d['n_with_answer']} of {d['n_prompts']} prompts have an answer; "
             f"answer ranked first in {d['top1_accuracy']:.0%}"
             + (f"; mean logit difference {d['mean_logit_diff']:+.3f}" if d["mean_logit_diff"] is not None
                else ""), ""]
    lines.append(f"{'prompt':>6}  {'answer':14} {'prob':>7} {'rank':>6}  {'wrong':14} {'logit diff':>10}  top")
    for r in d["prompts"]:
        diff = f"{r['logit_diff']:+10.3f}" if r["logit_diff"] is not None else f"{'':>10}"
        multi = "*" if r["answer_tokens"] > 1 else ""
        lines.append(f"{r['index']:>6}  {r['answer_token']!r:14} {r['prob']:7.2%} {r['rank']:>6}  "
                     f"{(repr(r['wrong_token']) if r['wrong_token'] else ''):14} {diff}  "
                     f"{r['top_token']!r} {r['top_prob']:.1%}{multi}")
    if any(r["answer_tokens"] > 1 for r in d["prompts"]):
        lines.append("* the answer is several tokens; its first token is scored")
    return "\n".join(lines)


ANALYSIS = Analysis(
    name="answer",
    description="logit, probability and rank of each prompt's 'answer', and the logit difference to 'wrong'",
    version="1",
    compute=compute,
    needs_model=True,
    needs_task=("answer",),
    families=("decoder",),
    render_text=render,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(ANALYSIS)
