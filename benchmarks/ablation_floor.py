"""How fast ``ablation`` could be at all on this machine: its work, counted as the engine runs
it, against the time the matrix products of that work take alone.

The work (issue 30, part 4): SmolLM2-135M, the 4 prompts of examples/ioi.jsonl, every component
(750 rows a prompt), zero ablation. The benchmark

1. runs ``ablation`` as a user does (``workbench.analyze``), with a forward pre-hook on every
   block that adds up the tokens each call of a block carries (rows x positions), and counts the
   rows whose logits are unembedded;
2. times, on the model's own weights, each block's linear maps (queries, keys, values, output,
   gate, up, down) on the engine's batch shape (``TOKEN_BUDGET`` tokens), and the unembedding
   of one position;
3. reports the floor: token-blocks x seconds per token-block + unembedded rows x seconds per
   row. That is time the arithmetic needs in float32 even if everything else (attention scores,
   norms, activations, Python) took no time at all.

    .venv/bin/python benchmarks/ablation_floor.py
    .venv/bin/python benchmarks/ablation_floor.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from ab_interventions import capture_ioi
from sections import publish

HEAD = "## Interventions: the floor under ablation"


def gemm_seconds(fn, rounds: int = 15) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="FILE", help="Replace this benchmark's section of FILE.")
    parser.add_argument("--speedup", type=float, default=1.33,
                        help="how much faster than before the issue the analysis already is (from "
                             "ab_interventions.py; default 1.33)")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    import workbench
    from workbench.registries import analyze
    from workbench_plugins.intervene import TOKEN_BUDGET

    model = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        run_path = Path(tmp) / "ioi.h5"
        capture_ioi(run_path)
        blocks = model.bridge.blocks
        counted = {"tokens": 0, "last": 0}

        def count(module, args, kwargs):  # type: ignore[no-untyped-def]
            x = args[0] if args else kwargs["hidden_states"]
            counted["tokens"] += int(x.shape[0] * x.shape[1])
            if module is blocks[-1]:
                counted["last"] += int(x.shape[0] * x.shape[1])

        unembedded = {"rows": 0}

        def count_unembed(module, args, kwargs):  # type: ignore[no-untyped-def]
            x = args[0] if args else next(iter(kwargs.values()))
            unembedded["rows"] += int(np.prod(x.shape[:-1]))

        handles = [b.register_forward_pre_hook(count, with_kwargs=True) for b in blocks]
        handles.append(model.bridge.unembed.register_forward_pre_hook(count_unembed, with_kwargs=True))
        try:
            with workbench.open_run(run_path) as run:
                t = time.perf_counter()
                [outcome] = analyze(run, ["ablation"], force=True, model=model)
                seconds = time.perf_counter() - t
                assert outcome.ok, outcome.stored.data
        finally:
            for h in handles:
                h.remove()

    hf = model.bridge.original_model
    layer = hf.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    d, inner = hf.config.hidden_size, hf.config.intermediate_size
    with torch.inference_mode():
        x = torch.randn(TOKEN_BUDGET, d)
        h = torch.randn(TOKEN_BUDGET, inner)
        a = torch.randn(TOKEN_BUDGET, layer.self_attn.o_proj.in_features)

        def block_gemms() -> None:
            for lin in linears[:3]:
                torch.nn.functional.linear(x, lin.weight)
            torch.nn.functional.linear(a, linears[3].weight)
            torch.nn.functional.linear(x, linears[4].weight)
            torch.nn.functional.linear(x, linears[5].weight)
            torch.nn.functional.linear(h, linears[6].weight)

        per_token_block = gemm_seconds(block_gemms) / TOKEN_BUDGET
        w_u = hf.lm_head.weight
        rows = torch.randn(64, d)
        per_row = gemm_seconds(lambda: torch.nn.functional.linear(rows, w_u)) / 64
    macs = sum(lin.in_features * lin.out_features for lin in linears)
    floor_blocks = counted["tokens"] * per_token_block
    floor_unembed = unembedded["rows"] * per_row
    floor = floor_blocks + floor_unembed
    # An exact plan could run the last block's queries, output map and MLP at the read position
    # only (its keys and values are still needed at every position): the most a change that
    # keeps the rows could take off the floor.
    kv = sum(lin.in_features * lin.out_features for lin in linears[1:3]) / macs
    last_spare = (counted["last"] - unembedded["rows"]) * per_token_block * (1 - kv)
    gflops = 2 * macs / per_token_block / 1e9

    lines = [HEAD, "",
             (f"`python benchmarks/ablation_floor.py` — {platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads; load average (1 min) {load:.2f}. "
              f"SmolLM2-135M, the 4 prompts of examples/ioi.jsonl, `ablation` of every component (zero), "
              f"counted with a pre-hook on every block and on the unembedding while it ran."),
             "",
             "| | |",
             "|---|---:|",
             f"| `ablation` as run, model loaded | {seconds:.1f} s |",
             f"| token × block evaluations (rows × positions through one block) | {counted['tokens']:,} |",
             f"| rows unembedded (one position each) | {unembedded['rows']:,} |",
             f"| a block's 7 matrix products, per token ({macs / 1e6:.2f} M multiply-adds, "
             f"{TOKEN_BUDGET} tokens a call) | {per_token_block * 1e6:.1f} µs ({gflops:.0f} GFLOPS) |",
             f"| the unembedding, per row | {per_row * 1e6:.0f} µs |",
             f"| **floor: those products alone** | **{floor:.1f} s** ({floor_blocks:.1f} + {floor_unembed:.1f}) |",
             f"| everything else (attention scores and softmax, norms, SiLU, Python) | {seconds - floor:.1f} s |",
             f"| within the floor, what an exact plan could still skip: the last block's products away "
             f"from the read position, keys and values aside | "
             f"{last_spare:.1f} s |",
             "",
             (f"The matrix products alone are {floor / seconds:.0%} of the analysis's time "
              f"({(floor - last_spare) / seconds:.0%} without the last block's spare positions). Twice as "
              f"fast as before the issue, the analysis being {args.speedup:.2f}× faster already, means "
              f"{args.speedup / 2:.0%} of today's time."),
             ]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
