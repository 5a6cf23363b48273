"""Intervention benchmark: all 270 single-head ablations of SmolLM2-135M (30 layers x 9 heads) on
one indirect-object prompt, metric logit(' Mary') - logit(' John'), three ways in one run:

- loop: TransformerLens' ``run_with_hooks`` once per head, a hook zeroing that head's ``hook_z``
  (what a notebook does);
- batched: the ``ablation`` engine (plugins/intervene.py) with full forward passes of the batch;
- batched, shared prefix: the engine as ``workbench analyze RUN ablation`` runs it: each row
  joins one pass over the blocks at its head's layer, starting from the clean residual stream.

Engine times include its set-up (the clean pass and the replay check). Each engine case runs
ROUNDS times (median reported); the loop once. The largest difference from the loop is reported.

    .venv/bin/python benchmarks/interventions_bench.py
    .venv/bin/python benchmarks/interventions_bench.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from sections import publish

ROUNDS = 3
PROMPT = "When Mary and John went to the store, John gave a drink to"
HEAD = "## Interventions: 270 head ablations"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="FILE", help="Replace the interventions section of FILE with the table.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np
    import torch
    from workbench_plugins.intervene import Edit, Intervener, Metric, hook_names

    import workbench

    model = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    tokens = model.tokenize(PROMPT)
    mary = model.tokenizer(" Mary", add_special_tokens=False)["input_ids"][0]
    john = model.tokenizer(" John", add_special_tokens=False)["input_ids"][0]
    metric = Metric("logit_diff", tokens, mary, john)
    n_layers = len(model.bridge.blocks)
    n_heads = model.info.n_heads
    rows = [(Edit(hook_names(layer)["z"], layer, head=h),) for layer in range(n_layers) for h in range(n_heads)]
    t = torch.tensor([tokens])
    with torch.inference_mode():
        model.bridge(t)  # warm-up

    def loop() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for layer in range(n_layers):
                for h in range(n_heads):
                    def zero(act, hook, h=h):  # type: ignore[no-untyped-def]
                        act[:, :, h] = 0.0
                        return act
                    logits = model.bridge.run_with_hooks(t, fwd_hooks=[(hook_names(layer)["z"], zero)])
                    out.append(float(metric(logits[:, metric.positions])))
        return np.asarray(out)

    def engine(share: bool) -> tuple[np.ndarray, bool]:
        iv = Intervener(model, tokens, metric, share_prefix=share,
                        keep=[hook_names(layer)["z"] for layer in range(n_layers)])
        source = {h: torch.zeros_like(a) for h, a in iv.clean.items()}
        return iv.run(rows, source), iv.shared_prefix

    t0 = time.perf_counter()
    reference = loop()
    loop_s = time.perf_counter() - t0
    print(f"loop: {loop_s:.2f} s", file=sys.stderr)
    results = [("loop: run_with_hooks per head", loop_s, loop_s, loop_s, 0.0)]
    for label, share in (("batched, full forward passes", False), ("batched, shared prefix (ablation's engine)", True)):
        times, diff = [], 0.0
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            values, used = engine(share)
            times.append(time.perf_counter() - t0)
            assert used == share
            diff = max(diff, float(np.abs(values - reference).max()))
        results.append((label, statistics.median(times), min(times), max(times), diff))
        print(f"{label}: {statistics.median(times):.2f} s, max diff {diff:.2g}", file=sys.stderr)
    lines = [
        HEAD,
        "",
        (f"`python benchmarks/interventions_bench.py` — {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M, "
         f"{n_layers} x {n_heads} = {len(rows)} zero ablations of one head (`hook_z`) each, on "
         f"\"{PROMPT}\" ({len(tokens)} tokens), metric logit(' Mary') - logit(' John'). Engine: median of "
         f"{ROUNDS} rounds, set-up included; loop: one round. Target: at most 10 s, equal to the loop within 1e-5."),
        "",
        "| method | time (median) | min – max | ratio to loop | max difference from the loop |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, med, lo, hi, diff in results:
        lines.append(f"| {label} | {med:.2f} s | {lo:.2f} – {hi:.2f} s | {med / loop_s:.2f}× | {diff:.1e} |")
    publish(lines, args.write)

if __name__ == "__main__":
    main()
