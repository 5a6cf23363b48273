"""A/B: capture of this checkout against an earlier commit, on case (a) of capture_bench.py.

Checks out REF into a temporary git worktree and runs each tree's own ``capture_bench.py``
worker (``--worker a capture``: SmolLM2, 256 short prompts, the residual stream, model loading
not timed) in fresh processes, alternating which tree goes first, so both see the same machine.
Prints each pair and the median ratio new/old (below 1: this checkout is faster).

    .venv/bin/python benchmarks/ab_capture.py 342d356 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(tree: Path, folder: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "capture_bench.py"), "--worker",
                           "a", "capture", folder], capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="the earlier commit (e.g. the one before a refactor)")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.ref],
                       check=True)
        try:
            folder = Path(tmp) / "runs"
            folder.mkdir()
            worker(ROOT, str(folder))  # warm-up: converted-weights cache, page cache
            ratios = []
            for k in range(args.pairs):
                order = [("new", ROOT), ("old", old)] if k % 2 == 0 else [("old", old), ("new", ROOT)]
                seconds = {name: worker(tree, str(folder))["seconds"] for name, tree in order}
                ratios.append(seconds["new"] / seconds["old"])
                print(f"pair {k + 1}: old {seconds['old']:.2f} s, new {seconds['new']:.2f} s, "
                      f"new/old {ratios[-1]:.3f}", flush=True)
            ratios.sort()
            print(f"median new/old over {args.pairs} pairs: {ratios[len(ratios) // 2]:.3f} "
                  f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
