"""Training dynamics of ``toy-induction``: the induction heads' phase change, checkpoint by checkpoint.

Captures the same repeated-sequence prompts (``<bos>`` + r + r, r: ``--length`` distinct random
letters, separated by spaces) at every shipped checkpoint ``toy-induction@STEP`` (see
``examples/train_toy_induction.py --checkpoints``) with the attention patterns and the residual
stream, one run per checkpoint in ``--out``. Per checkpoint:

- the induction score of each layer-1 head: the mean, over the second copy's tokens, of the
  attention weight on the token right after the same letter's earlier occurrence. It is the
  ``induction`` score of the ``head-roles`` analysis (``plugins/attention.py``), computed with its
  functions (``head_scores.induction_mask`` and ``mask_scores``, the row mean) on the captured
  patterns rather than on head-roles' own sequences. Uniform attention would score the mean of
  1/(q + 1) over the second copy's positions q (printed as "chance");
- the mean loss on the second copy (from the run's stored per-token loss, ``run.loss(i)``: the
  predictions of all ``length`` tokens of the second copy, as the training script's evaluation);
- the ``diff`` analysis against the previous checkpoint (``lens=off``): the head whose attention
  pattern changed most (mean Jensen-Shannon divergence per query row).

    python examples/training_dynamics.py                       # runs in ./training_dynamics/
    python examples/training_dynamics.py --out DIR --prompts 16 --length 20 --plot dynamics.png

``main(argv)`` returns the table's rows (the test calls it in process).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from workbench_plugins.head_scores import induction_mask, mask_scores
from workbench_plugins.toy_models import FIRST_LETTER, LETTERS, checkpoint_info, checkpoint_steps

import workbench
from workbench.registries import analyze, build_analyses

LAYER = 1
PATTERN = f"blocks.{LAYER}.attn.hook_pattern"


def prompts(n: int, length: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompts ``r r``: ``length`` distinct random letters, repeated (the tokenizer adds
    ``<bos>``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = [LETTERS[k] for k in rng.choice(len(LETTERS), size=length, replace=False)]
        out.append({"id": f"rep{i:03d}", "prompt": " ".join(r + r)})
    return out


def second_copy(run: workbench.Run, i: int) -> tuple[int, int]:
    """(first position of the second copy, number of tokens in each copy) of prompt ``i``."""
    tokens = run.tokens(i)
    prefix = int(tokens[0] < FIRST_LETTER)  # <bos>
    length = (len(tokens) - prefix) // 2
    return prefix + length, length


def measure(run: workbench.Run) -> dict[str, Any]:
    """Induction score per layer-1 head, chance level, and the second copy's mean loss."""
    scores, chance, losses = [], [], []
    for i in range(len(run)):
        tokens = run.tokens(i).astype(np.int64)
        start, length = second_copy(run, i)
        row_mean, _ = mask_scores(run.activation(PATTERN, i), induction_mask(tokens))
        scores.append(row_mean)
        chance.append(np.mean(1.0 / (np.arange(start, start + length) + 1)))
        losses.append(run.loss(i)[start - 1 : start - 1 + length].astype(np.float64).mean())
    return {"induction": np.mean(scores, axis=0), "chance": float(np.mean(chance)),
            "loss_second_copy": float(np.mean(losses))}


def most_changed(path_a: Path, path_b: Path) -> dict[str, Any]:
    """The ``diff`` of run A to run B: the attention head that changed most (mean JS), and the
    mean JS of every head of ``PATTERN``."""
    with workbench.open_run(path_a) as run:
        [out] = analyze(run, [build_analyses().get("diff")], {"diff": {"other": str(path_b), "lens": "off"}})
        if not out.ok:
            raise SystemExit(out.stored.error)
        data = out.stored.result().data
    top = data["ranked"]["heads"][0]
    layer_js = next(r["heads"] for r in data["square_hooks"] if r["hook"] == PATTERN)
    return {"head": f"L{top['layer']}H{top['head']}", "js": top["mean_js"], "layer_js": layer_js,
            "ranked": [f"L{h['layer']}H{h['head']}" for h in data["ranked"]["heads"]]}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = checkpoint_info().get("curve", [])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if curve:
        ax1.plot([c["step"] for c in curve], [c["loss_second_copy"] for c in curve], color="0.6",
                 label="second copy (training script's evaluation)")
        ax1.plot([c["step"] for c in curve], [c["loss_first_copy"] for c in curve], color="0.8",
                 ls="--", label="first copy")
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["loss_second_copy"] for r in rows], "o", color="C3", label="second copy (these prompts: distinct letters)")
    ax1.set_ylabel("loss (nats)")
    ax1.legend(fontsize=8)
    for h in range(len(rows[0]["induction"])):
        ax2.plot(steps, [r["induction"][h] for r in rows], "o-", label=f"L{LAYER}H{h} induction score")
    ax2.axhline(rows[0]["chance"], color="0.6", ls=":", label="uniform attention")
    ax2.set_ylabel("induction score")
    ax2.set_xlabel("training step")
    ax2.set_xscale("symlog", linthresh=100)
    ax2.legend(fontsize=8)
    phase = checkpoint_info().get("phase_change")
    for ax in (ax1, ax2):
        if phase:
            ax.axvspan(*phase["steepest_between"], color="C1", alpha=0.2)
    fig.suptitle("toy-induction: the induction heads' phase change")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("training_dynamics"), help="folder for the runs")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--length", type=int, default=20, help="letters in each copy (at most 26)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of the curves here")
    args = ap.parse_args(argv)
    steps = checkpoint_steps()
    if not steps:
        raise SystemExit("no toy-induction checkpoints (examples/train_toy_induction.py --checkpoints ...)")
    if not 1 <= args.length <= 26:  # 2 * length + <bos> fits the toy's 64 positions
        ap.error("--length: 1 to 26")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in prompts(args.prompts, args.length, args.seed)))

    rows: list[dict[str, Any]] = []
    previous: Path | None = None
    for step in steps:
        path = args.out / f"step-{step:05d}.h5"
        workbench.capture(f"toy-induction@{step}", str(args.out / "prompts.jsonl"), hooks=["attention", "residual"],
                          out=path, overwrite=True, device="cpu", progress=False)
        with workbench.open_run(path) as run:
            row = {"step": step, "run": str(path), **measure(run)}
        row["diff"] = most_changed(previous, path) if previous is not None else None
        rows.append(row)
        previous = path

    heads = len(rows[0]["induction"])
    final = int(np.argmax(rows[-1]["induction"]))
    print(f"{args.prompts} prompts of {args.length} random letters repeated; runs in {args.out}")
    print(f"induction head (highest score at the last checkpoint): L{LAYER}H{final}; "
          f"uniform attention would score {rows[0]['chance']:.3f}")
    head_cols = "  ".join(f"L{LAYER}H{h} ind" for h in range(heads))
    print(f"{'step':>6}  {'2nd-copy loss':>13}  {head_cols}  {'top head':>8}  most changed since previous (mean JS)")
    for r in rows:
        top = int(np.argmax(r["induction"]))
        changed = f"{r['diff']['head']} ({r['diff']['js']:.4f})" if r["diff"] else "-"
        scores = "  ".join(f"{v:>8.3f}" for v in r["induction"])
        print(f"{r['step']:>6}  {r['loss_second_copy']:>13.3f}  {scores}  {f'L{LAYER}H{top}':>8}  {changed}")
    phase = checkpoint_info().get("phase_change")
    if phase:
        print(f"phase change (training script's learning curve): steepest fall of the second copy's loss "
              f"between steps {phase['steepest_between'][0]} and {phase['steepest_between'][1]}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    for r in rows:
        r["induction"] = [float(x) for x in r["induction"]]
        if not math.isfinite(r["loss_second_copy"]):
            raise SystemExit(f"step {r['step']}: no loss stored")
    return rows


if __name__ == "__main__":
    main()
