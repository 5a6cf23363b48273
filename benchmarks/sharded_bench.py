"""Sharded capture benchmark (issue 24), in one run: case (a) of ``capture_bench.py`` (the
residual stream of 256 short prompts, SmolLM2, batch 8) captured

  * in one process with one torch thread ("1 process, 1 thread"),
  * in one process with two torch threads (today's default on two cores),
  * on Ray with 1 worker and with 2 workers, one torch thread (one CPU) each;

Ray's fixed start-up cost (the local runtime plus the workers loading the model), and reading
one hook of every prompt from the sharded index against the same data in one file.

    .venv/bin/python benchmarks/sharded_bench.py [--rounds N] [--write BENCHMARKS.md]

Each capture runs in a fresh subprocess, and the modes are interleaved round by round (reversed
every other round); the median round is reported. Capture times count the forward passes and
writing, not loading the model (nor, for Ray, starting it: reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capture_bench import CASES, make_prompts
from sections import replace_section

MODES = {
    "1 process, 1 thread": {"threads": 1},
    "1 process, 2 threads": {"threads": 2},
    "Ray, 1 worker (1 CPU)": {"workers": 1},
    "Ray, 2 workers (1 CPU each)": {"workers": 2},
}
HOOK = "blocks.15.hook_resid_post"


def worker(mode: str, out: str) -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import workbench

    _, hooks, n, (lo, hi), batch = CASES["a"]
    prompts = make_prompts(n, lo, hi)
    spec = MODES[mode]
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
        model = workbench.load_model("smollm2-135m", device="cpu")
        r = workbench.capture(model, prompts, hooks=hooks, out=out, batch_size=batch, progress=False)
        startup = 0.0
    else:
        r = workbench.capture("smollm2-135m", prompts, hooks=hooks, out=out, batch_size=batch,
                              progress=False, device="cpu", workers=spec["workers"],
                              ray_address="local", worker_cpus=1)
        startup = r.startup_seconds
    tokens = r.plan.n_tokens
    return {"seconds": r.seconds, "tokens": tokens, "startup": startup}


def run_worker(mode: str, out: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, out], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def read_hook(path: Path, repeats: int = 7) -> tuple[float, float, float, float]:
    """Median seconds (warm page cache) to open the run with ``open_run`` (for an index: every
    unit file checked); to read ``HOOK`` of every prompt through ``run.activation``, the run
    open; to read every ``blocks.*.hook_resid_post`` whole with ``run.rows``; and the same with
    plain h5py (through the virtual datasets, for an index)."""
    import h5py

    from workbench.store import open_run

    opening, per_prompt, rows, whole = [], [], [], []
    names = [f"blocks.{k}.hook_resid_post" for k in range(30)]
    for _ in range(repeats):
        t = time.perf_counter()
        run = open_run(path)
        opening.append(time.perf_counter() - t)
        run.close()
    with open_run(path) as run:
        for i in range(len(run)):  # warm-up: handles opened
            run.activation(HOOK, i)
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(len(run)):
                run.activation(HOOK, i)
            per_prompt.append(time.perf_counter() - t)
        for _ in range(3):
            t = time.perf_counter()
            for name in names:
                run.rows(name)
            rows.append(time.perf_counter() - t)
    with h5py.File(path, "r") as f:
        for _ in range(3):
            t = time.perf_counter()
            for name in names:
                f[f"acts/{name}"][()]
            whole.append(time.perf_counter() - t)
    return (statistics.median(opening), statistics.median(per_prompt), statistics.median(rows),
            statistics.median(whole))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", metavar="FILE")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        paths = {}
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                out = Path(tmp) / f"{abs(hash(mode))}-{r}.h5"
                results[mode].append(run_worker(mode, str(out)))
                paths[mode] = out
                print(f"round {r + 1} {mode}: {results[mode][-1]}", file=sys.stderr)
        one, sharded = paths["1 process, 1 thread"], paths["Ray, 2 workers (1 CPU each)"]
        reads = {"one file": read_hook(one), "sharded index (8 units)": read_hook(sharded)}
        for label, times in reads.items():
            print(f"read {label}: open, per prompt, whole: {times}", file=sys.stderr)
    print(render(results, reads, args.rounds))
    if args.write:
        replace_section(args.write, render(results, reads, args.rounds))


def render(results: dict[str, list[dict[str, float]]], reads: dict[str, tuple[float, float, float, float]],
           rounds: int) -> str:
    med = {m: sorted(v, key=lambda d: d["seconds"])[len(v) // 2] for m, v in results.items()}
    base = med["1 process, 1 thread"]
    rate = {m: d["tokens"] / d["seconds"] for m, d in med.items()}
    lines = [
        "## Sharded capture on Ray (`benchmarks/sharded_bench.py`)",
        "",
        f"Case (a) of the capture benchmark (the residual stream of 256 short prompts, "
        f"{base['tokens']:,.0f} tokens, SmolLM2-135M, batch 8) on this machine "
        f"({os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}); "
        f"median of {rounds} rounds, each capture in a fresh process, modes interleaved. "
        "Capture time counts the forward passes and writing, not loading the model or "
        "starting Ray.",
        "",
        "| mode | capture s | tokens/s | vs 1 process, 1 thread | scaling efficiency | Ray start-up s |",
        "|---|---|---|---|---|---|",
    ]
    for m, d in med.items():
        workers = 2 if "2 workers" in m else 1
        speedup = rate[m] / rate["1 process, 1 thread"]
        eff = f"{speedup / workers:.0%}" if m.startswith("Ray") else ""
        start = f"{d['startup']:.1f}" if m.startswith("Ray") else ""
        lines.append(f"| {m} | {d['seconds']:.1f} | {rate[m]:,.0f} | {speedup:.2f}x | {eff} | {start} |")
    lines += [
        "",
        "Scaling efficiency: tokens/s over (workers x the 1-process, 1-thread rate). Ray start-up: "
        "from the call to the workers ready (a local runtime, each worker loading the model and "
        "its weights fingerprinted), paid once per capture.",
        "",
        "Reading the same data (2 workers' run: 8 units, 618 MB) from one file and from the "
        "sharded index; median of 7 (3 for whole hooks), warm page cache:",
        "",
        f"| source | `open_run` ms | `run.activation('{HOOK}', i)` for every prompt ms | "
        "`run.rows(hook)` for all 30 `blocks.*.hook_resid_post` ms | the same with plain h5py ms |",
        "|---|---|---|---|---|",
    ]
    for label, (o, a, r, b) in reads.items():
        lines.append(f"| {label} | {o * 1e3:.1f} | {a * 1e3:.1f} | {r * 1e3:.1f} | {b * 1e3:.1f} |")
    (o1, a1, r1, b1), (o2, a2, r2, b2) = reads.values()
    lines += ["", f"Sharded index / one file: {a2 / a1:.2f}x prompt by prompt, {r2 / r1:.2f}x whole "
                  f"hooks with `run.rows` (target <= 1.1x); plain h5py through the virtual datasets "
                  f"{b2 / b1:.2f}x; opening {o2 / o1:.1f}x (every unit file is checked: present, "
                  "complete, of this run). `open_run` reads a sharded run's rows from the unit "
                  "files directly, with the virtual datasets' own mapping."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
