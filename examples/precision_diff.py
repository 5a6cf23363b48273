"""What a cheaper capture costs: the same prompts captured from SmolLM2 (or any model) in float32,
then stored as bfloat16 and float16, and run in bfloat16, each diffed against float32 with the
``diff`` analysis. Prints the relative L2 error of the residual stream per layer, the logit-lens
KL per layer where computed, and the next-token KL; docs/analyses.md quotes its output.

    .venv/bin/python examples/precision_diff.py --out /tmp/precision [--model smollm2-135m] [--prompts 16]

Storing in a lower dtype rounds each stored value (about 2^-9 relative for bfloat16, 2^-12 for
float16) and nothing else; running the model in bfloat16 changes the computation itself, and its
error grows with depth.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "def add(a, b):\n    return a +",
    "Once upon a time, a small fox lived at the edge of a forest.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "She opened the door, looked outside, and saw that it was raining.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "A B C D E F G A B C D E F G",
    "The meeting was moved from Tuesday to Thursday afternoon.",
    "Prime numbers: 2, 3, 5, 7, 11, 13,",
    "He said he would call back, but he never did.",
    "The library closes at nine on weekdays and at five on Sundays.",
    "Translate to French: good morning ->",
    "Rivers flow downhill because of gravity.",
    "My favourite colour is blue because it reminds me of the sea.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the runs")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--lens", default="auto", choices=("auto", "on", "off"))
    args = ap.parse_args()

    import workbench
    from workbench.registries import analyze, build_analyses

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS[: args.prompts])]
    f32 = workbench.load_model(args.model, device="cpu", progress=False)
    runs = {}
    for name, model, dtype in (("float32", f32, "float32"), ("bfloat16-stored", f32, "bfloat16"),
                               ("float16-stored", f32, "float16")):
        runs[name] = out / f"{name}.h5"
        workbench.capture(model, prompts, hooks=["residual"], out=runs[name], dtype=dtype,
                          progress=False, overwrite=True)
    bf16 = workbench.load_model(args.model, device="cpu", dtype="bfloat16", progress=False)
    runs["bfloat16-model"] = out / "bfloat16-model.h5"
    workbench.capture(bf16, prompts, hooks=["residual"], out=runs["bfloat16-model"], progress=False, overwrite=True)

    diff = build_analyses().get("diff")
    with workbench.open_run(runs["float32"]) as base:
        for name in ("bfloat16-stored", "float16-stored", "bfloat16-model"):
            [o] = analyze(base, [diff], {"diff": {"other": str(runs[name]), "lens": args.lens}}, model=f32)
            d = o.stored.result().data
            print(f"\n== float32 vs {name} ({len(d['pairs'])} prompts, "
                  f"{sum(p['n_tokens'] for p in d['pairs'])} tokens)")
            rows = [r for r in d["token_hooks"] if r["hook"].endswith("hook_resid_post") or r["hook"] == "hook_embed"]
            rows.sort(key=lambda r: -1 if r["layer"] is None else r["layer"])
            print("layer   mean rel L2   max rel L2   min cosine")
            for r in rows:
                label = "embed" if r["layer"] is None else str(r["layer"])
                print(f"{label:>5s}   {r['rel_l2']['mean']:.2e}     {r['rel_l2']['max']:.2e}     {r['cos']['min']:.6f}")
            lm = d["lm"]
            if lm:
                print(f"next token: KL(f32||{name}) from the top-k (lower bound) mean {lm['kl_topk']['mean']:.2e}, "
                      f"max {lm['kl_topk']['max']:.2e}; mean loss {lm['mean_loss_a']:.4f} -> {lm['mean_loss_b']:.4f}")
            lens = d["lens"]
            if "skipped" in lens:
                print(f"logit lens: not computed ({lens['skipped']})")
            else:
                print("logit-lens KL per layer: " + ", ".join(
                    f"{li}: {k:.1e}" for li, k in zip(lens["layers"], lens["mean_kl"], strict=True)))


if __name__ == "__main__":
    main()
