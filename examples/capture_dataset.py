"""Capture a JSONL data set from Python and read the activations back, without the model.

    python examples/capture_dataset.py                  # SmolLM2 (the default model)
    python examples/capture_dataset.py tiny-gpt2 /tmp   # another model, another folder

Each JSONL line holds a prompt and its task fields: `answer` (the expected next token), `wrong`
(a contrasting one) and any metadata of your own.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import workbench

ROWS = [
    {"id": "france", "prompt": "The capital of France is", "answer": " Paris", "wrong": " London"},
    {"id": "ioi", "prompt": "When Mary and John went to the store, John gave a drink to",
     "answer": " Mary", "wrong": " John"},
    {"id": "emoji", "prompt": "I love pizza 🍕 and", "topic": "food"},
]


def main(model_name: str = workbench.DEFAULT_MODEL, folder: str | None = None) -> None:
    work = Path(folder or tempfile.mkdtemp(prefix="workbench-example-"))
    data = work / "dataset.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n")
    out = work / "dataset.h5"

    model = workbench.load_model(model_name)
    workbench.capture(model, data, hooks=["residual", "blocks.0.attn.hook_pattern"], out=out,
                      batch_size=2, overwrite=True)

    # Reading needs neither the model nor torch.
    with workbench.open_run(out) as run:
        print(f"{out}: {len(run)} prompts, {len(run.hooks)} stored tensors, status {run.status}")
        last = f"blocks.{run.model_info['n_layers'] - 1}.hook_resid_post"
        for i in range(len(run)):
            tokens = run.str_tokens(i)
            resid = run.activation(last, i)  # (seq, d_model)
            pattern = run.activation("blocks.0.attn.hook_pattern", i)  # (heads, q, k)
            top_ids, top_lp = run.top_k(i)
            meta = run.metadata(i)
            print(f"[{run.prompt_id(i)}] {len(tokens)} tokens, final residual norm "
                  f"{np.linalg.norm(resid[-1]):.1f}, head 0 attends last->first "
                  f"{pattern[0, -1, 0]:.2f}, top next-token id {top_ids[-1, 0]} "
                  f"(p={np.exp(top_lp[-1, 0]):.2f}), metadata {meta}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
