"""A/B: ``ablation`` and ``patching`` of this checkout against an earlier commit, on the same work.

The work (issue 30): SmolLM2-135M, the 4 prompts of examples/ioi.jsonl, every component
(``ablation``: zero ablation of 270 heads, 30 MLPs, 30 layers and 30 x 14 residual positions,
750 rows a prompt; ``patching``: resid, attn and mlp at every layer and position and the 270
heads, 1,530 rows a prompt, plus the attribution pass).

Checks out REF into a temporary git worktree. Each tree runs in its own fresh process (its own
``workbench`` and ``workbench_plugins``, through a shim folder on PYTHONPATH, since the editable
install points at this checkout), on its own copy of one captured run: the model is loaded (not
timed), then ``workbench.analyze(run, NAME, force=True)`` runs each analysis, timed as a user
sees it. The trees alternate which goes first. Printed: each pair's seconds, the median ratio
new/old per analysis, the load average before each process, and the largest difference between
the two trees' stored arrays (the results must not change).

    .venv/bin/python benchmarks/ab_interventions.py a8dc60a --pairs 3
    .venv/bin/python benchmarks/ab_interventions.py a8dc60a --pairs 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sections import publish

ROOT = Path(__file__).resolve().parents[1]
HEAD = "## Interventions: ablation and patching before and after"
ANALYSES = ("ablation", "patching")

WORKER = r"""
import json, os, sys, time
import numpy as np
import workbench
from workbench.registries import analyze
run_path, out = sys.argv[1], sys.argv[2]
model = workbench.load_model("smollm2-135m", device="cpu", progress=False)
seconds = {}
with workbench.open_run(run_path) as run:
    for name in %r:
        t = time.perf_counter()
        [o] = analyze(run, [name], force=True, model=model)
        seconds[name] = time.perf_counter() - t
        assert o.ok, o.stored.data
        np.savez(f"{out}-{name}.npz", **o.stored.arrays)
import workbench_plugins
print(json.dumps({"seconds": seconds, "plugins": workbench_plugins.__file__}))
""" % (ANALYSES,)


def capture_ioi(out: Path) -> None:
    """The run both intervention benchmarks analyse: SmolLM2 on examples/ioi.jsonl (one small
    hook: the analyses run the model themselves), captured by this checkout's CLI."""
    subprocess.run([sys.executable, "-m", "workbench.cli", "capture", "-m", "smollm2-135m", "--prompts",
                    str(ROOT / "examples" / "ioi.jsonl"), "--hooks", "blocks.0.hook_resid_pre",
                    "--predictions", "0", "-o", str(out)],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT, capture_output=True)


def worker(tree: Path, shim: Path, run: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{tree}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(run), str(out)], capture_output=True, text=True,
                          env=env, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["plugins"]).resolve().parent == (tree / "plugins").resolve(), report["plugins"]
    return report["seconds"]  # type: ignore[no-any-return]


def largest_difference(a: Path, b: Path) -> float:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files), (x.files, y.files)
        return max(float(np.nanmax(np.abs(x[k] - y[k]))) if x[k].size else 0.0 for k in x.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="the earlier commit")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--write", metavar="FILE", help="Replace this benchmark's section of FILE.")
    args = parser.parse_args()
    ref = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    new_ref = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "plugins", "workbench"],
                                capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="ab-iv-") as tmp:
        base = Path(tmp)
        old = base / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), ref], check=True)
        try:
            trees = {"old": old, "new": ROOT}
            runs, shims = {}, {}
            first = base / "ioi.h5"
            capture_ioi(first)
            for name, tree in trees.items():
                shims[name] = base / f"shim-{name}"
                shims[name].mkdir()
                (shims[name] / "workbench_plugins").symlink_to(tree / "plugins")
                runs[name] = base / f"{name}.h5"
                shutil.copy(first, runs[name])
            seconds: dict[str, dict[str, list[float]]] = {t: {a: [] for a in ANALYSES} for t in trees}
            loads, diffs = [], {a: 0.0 for a in ANALYSES}
            for k in range(args.pairs):
                order = ["new", "old"] if k % 2 == 0 else ["old", "new"]
                for name in order:
                    loads.append(os.getloadavg()[0])
                    got = worker(trees[name], shims[name], runs[name], base / name)
                    for a in ANALYSES:
                        seconds[name][a].append(got[a])
                for a in ANALYSES:
                    diffs[a] = max(diffs[a], largest_difference(base / f"new-{a}.npz", base / f"old-{a}.npz"))
                print(f"pair {k + 1}: " + "; ".join(
                    f"{a} old {seconds['old'][a][-1]:.1f} s, new {seconds['new'][a][-1]:.1f} s "
                    f"({seconds['old'][a][-1] / seconds['new'][a][-1]:.2f}x)" for a in ANALYSES), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)

    import torch

    lines = [HEAD, "",
             (f"`python benchmarks/ab_interventions.py {ref} --pairs {args.pairs}` — {platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}; SmolLM2-135M, the 4 prompts of "
              f"examples/ioi.jsonl (14 tokens each), every component: `ablation` (zero; 750 rows a prompt) "
              f"and `patching` (1,530 rows a prompt and the attribution pass). Old: commit {ref}; new: "
              f"{new_ref}{' with uncommitted changes' if dirty else ''}. Each tree in its own fresh process "
              f"per pair, alternating which goes first; model loading not timed. Load average (1 min) "
              f"before each process: {min(loads):.2f}–{max(loads):.2f}."),
             "",
             "| analysis | old (median) | new (median) | old / new per pair | speed-up (medians) | "
             "largest difference of the stored arrays |",
             "|---|---:|---:|---|---:|---:|"]
    for a in ANALYSES:
        o, n = np.median(seconds["old"][a]), np.median(seconds["new"][a])
        per = ", ".join(f"{x / y:.2f}" for x, y in zip(seconds["old"][a], seconds["new"][a], strict=True))
        lines.append(f"| {a} | {o:.1f} s | {n:.1f} s | {per} | {o / n:.2f}× | {diffs[a]:.1e} |")
    lines += ["", "What changed, and why ablation gains less than patching: docs/analyses.md, \"The engine\"."]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
