"""Terminal UI benchmark: time from starting ``workbench tui RUN`` in a real terminal (tmux, 80x24)
to its first full screen, for a small run, a multi-GB run and a run with many prompts, in one
run of this script. Also times stepping to the next prompt on the multi-GB run.

    .venv/bin/python benchmarks/tui_bench.py            # prints the table
    .venv/bin/python benchmarks/tui_bench.py --write BENCHMARKS.md

The runs are synthetic (``workbench.store.synthetic``: seeded, the shapes of a real capture), so
no model is loaded. Each case starts the app 5 times; the median is reported. Needs tmux.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import publish

ROUNDS = 5
CASES = {
    # name: (description, write_synthetic_run keyword arguments)
    "small": ("6 prompts of 4-12 tokens, 2 layers", {"n_prompts": 6}),
    "big": ("16 prompts of ~700 tokens, all attention patterns of 8 layers x 8 heads",
            {"n_prompts": 16, "n_layers": 8, "n_heads": 8, "d_model": 64, "lengths": (680, 720)}),
    "many": ("20,000 prompts of 4-12 tokens", {"n_prompts": 20_000, "batch_size": 500}),
}


def workbench_exe() -> str:
    return str(Path(sys.executable).with_name("workbench"))


def screen(server: str) -> str:
    return subprocess.run(["tmux", "-L", server, "capture-pane", "-p", "-t", "b"],
                          capture_output=True, text=True, check=False).stdout


def wait_for(server: str, needle: str, timeout: float = 60) -> float:
    start = time.perf_counter()
    while needle not in screen(server):
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{needle!r} did not appear:\n{screen(server)}")
        time.sleep(0.01)
    return time.perf_counter() - start


def first_screen(run: Path, step: bool = False) -> tuple[float, float | None]:
    server = f"wbbench{os.getpid()}-{time.monotonic_ns()}"
    start = time.perf_counter()
    subprocess.run(["tmux", "-L", server, "new-session", "-d", "-s", "b", "-x", "80", "-y", "24",
                    f"TERM=xterm-256color {workbench_exe()} tui {run}"], check=True)
    try:
        wait_for(server, "query 0 ")
        seconds = time.perf_counter() - start
        stepped = None
        if step:
            t = time.perf_counter()
            subprocess.run(["tmux", "-L", server, "send-keys", "-t", "b", "n"], check=True)
            wait_for(server, "prompt 2/")
            stepped = time.perf_counter() - t
        return seconds, stepped
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="Replace the UI section of FILE with the table.")
    parser.add_argument("--folder", default=None, help="Where to write the runs (default: a temp folder).")
    args = parser.parse_args()
    if not shutil.which("tmux"):
        sys.exit("tui_bench: needs tmux")
    from workbench.store.synthetic import write_synthetic_run

    folder = Path(args.folder or tempfile.mkdtemp(prefix="wb-tui-bench-"))
    rows = []
    for name, (desc, kw) in CASES.items():
        path = folder / f"{name}.h5"
        if not path.exists():
            print(f"writing {name} ...", file=sys.stderr)
            write_synthetic_run(path, **kw)  # type: ignore[arg-type]
        times, steps = [], []
        for _ in range(ROUNDS):
            t, s = first_screen(path, step=True)
            times.append(t)
            steps.append(s)
        rows.append((name, desc, path.stat().st_size, statistics.median(times), min(times), max(times),
                     statistics.median([s for s in steps if s is not None])))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    lines = [
        "## Terminal UI: time to the first screen",
        "",
        (f"`python benchmarks/tui_bench.py` — {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} cores, Python {platform.python_version()}; `workbench tui RUN` started in "
        f"tmux (80×24) until the attention view's cursor line is drawn; median of {ROUNDS} starts "
        "(process start, imports, opening the run and drawing included). \"Next prompt\": pressing "
        "`n` until the new prompt is drawn."),
        "",
        "| run | file size | first screen (median) | min – max | next prompt | ratio to small |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    small = rows[0][3]
    for name, desc, size, med, lo, hi, step in rows:
        lines.append(f"| {name}: {desc} | {size / 1e6:,.1f} MB | {med:.2f} s | {lo:.2f} – {hi:.2f} s "
                     f"| {step:.2f} s | {med / small:.2f}× |")
    publish(lines, args.write)
    if not args.folder:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
