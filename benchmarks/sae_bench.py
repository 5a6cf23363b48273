"""SAE training throughput: streamed from the run's HDF5 file through the shuffling buffer (as the
``sae`` analysis trains) against the same sparsify ``SparseCoder`` step loop fed from memory
(every training row loaded into RAM first, batches drawn at random from it).

sparsify's own ``Trainer`` only trains by running a Hugging Face model on token ids, so the
from-memory baseline is its module's step loop (``workbench_plugins.sae.train``, sparsify's
recipe) with the HDF5 reads and the buffer taken away: the ratio is what streaming costs.

    .venv/bin/python benchmarks/sae_bench.py RUN.h5 --hook blocks.15.hook_resid_post \\
        --steps 150 --repeats 3 --write BENCHMARKS.md

Modes alternate within each round; the table shows medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from sections import replace_section
    from workbench_plugins import sae_data
    from workbench_plugins.sae import train

    import workbench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--hook", required=True)
    ap.add_argument("--features", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--buffer", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", metavar="MD")
    a = ap.parse_args()

    run = workbench.open_run(a.run)
    sel = sae_data.select(run, a.hook, range(len(run)), 0.1, "auto", 0)
    n_train = sel.n_tokens(run, sel.train)
    t0 = time.perf_counter()
    memory = np.concatenate([sae_data.read_block(run, sel, b) for b in sae_data.blocks(sel, sel.train, 65536)])
    load_s = time.perf_counter() - t0
    print(f"{n_train:,} training tokens, {memory.nbytes / 1e6:,.0f} MB loaded in {load_s:.1f} s", file=sys.stderr)

    def streamed() -> dict:
        rng = np.random.default_rng(0)
        source = sae_data.row_stream(run, sel, sel.train, rng, max(a.batch, a.buffer // 8))
        batches = sae_data.shuffled_batches(source, sel.d_in, a.buffer, a.batch, rng)
        return train(batches, sel.d_in, features=a.features, k=a.k, steps=a.steps, lr=0, auxk=1 / 32,
                     dead_tokens=10**9, multi_topk=False, seed=0, device="cpu")[1]

    def in_memory() -> dict:
        rng = np.random.default_rng(0)

        def batches():
            while True:
                yield memory[rng.integers(0, len(memory), a.batch)]
        return train(batches(), sel.d_in, features=a.features, k=a.k, steps=a.steps, lr=0, auxk=1 / 32,
                     dead_tokens=10**9, multi_topk=False, seed=0, device="cpu")[1]

    modes = {"from memory (sparsify's step loop, rows in RAM)": in_memory,
             "streamed from the run (HDF5 + shuffling buffer)": streamed}
    times: dict[str, list[float]] = {m: [] for m in modes}
    data_s: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(a.repeats):
        for name, fn in modes.items():
            rec = fn()
            times[name].append(rec["seconds"])
            data_s[name].append(rec["data_seconds"])
            print(f"round {r + 1} {name}: {rec['seconds']:.2f} s ({rec['tokens_per_s']:,.0f} tokens/s)", file=sys.stderr)
    base = statistics.median(times[next(iter(modes))])
    tokens = a.steps * a.batch
    rows = []
    for name in modes:
        med = statistics.median(times[name])
        rows.append(f"| {name} | {med:.2f} | {min(times[name]):.2f} – {max(times[name]):.2f} | "
                    f"{tokens / med:,.0f} | {statistics.median(data_s[name]):.2f} | {med / base:.2f}x |")
    per_round = [s / m for s, m in zip(times[list(modes)[1]], times[list(modes)[0]], strict=True)]
    section = "\n".join([
        "## SAE training: streamed from the run vs from memory (`benchmarks/sae_bench.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; run `{Path(a.run).name}` ({len(run):,} prompts), hook `{a.hook}` "
        f"(d_in {sel.d_in}), {n_train:,} training tokens ({memory.nbytes / 1e6:,.0f} MB; loading them into RAM "
        f"took {load_s:.1f} s, not counted); TopK SAE {sel.d_in} -> {a.features}, k={a.k}; {a.steps} steps of "
        f"{a.batch} tokens; buffer {a.buffer:,} tokens ({a.buffer * sel.d_in * 4 / 1e6:.0f} MB). {a.repeats} rounds, "
        "modes alternating; medians. Reproduce with:",
        "",
        "```",
        f".venv/bin/python benchmarks/sae_bench.py RUN.h5 --hook {a.hook} --steps {a.steps} --repeats {a.repeats} "
        "--write BENCHMARKS.md",
        "```",
        "",
        "| mode | seconds | min – max | tokens/s | of which waiting for data (s) | time vs from memory |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Streamed / from memory per round: {', '.join(f'{x:.3f}x' for x in per_round)}; median "
        f"**{statistics.median(per_round):.3f}x** (target <= 1.2x).",
        "",
    ])
    print(section)
    if a.write:
        replace_section(a.write, section)


if __name__ == "__main__":
    main()
