"""``workbench serve`` benchmark: what each browser visitor costs. For 1 and for 3 visitors at once
(pages opened together in a headless Chromium), the time from asking for the page to the app's
first full screen in it, and the memory of each visitor's app process and of the server.

    .venv/bin/python benchmarks/serve_bench.py            # prints the table
    .venv/bin/python benchmarks/serve_bench.py --write BENCHMARKS.md

The run is synthetic (``workbench.store.synthetic``: 6 prompts, 2 layers, as tui_bench's "small").
"First screen" is read from the page's terminal (xterm.js's buffer, tests/browser.py): the token
strip and the attention view's cursor line are drawn. Memory is read from /proc once every page
shows its screen: RSS, and USS (the process's private pages: what one more visitor adds, the
shared libraries not counted twice). For one visitor, `workbench tui` in tmux is timed in turn
with the page (where tmux is installed), so the two share the machine's load. Needs Debian's chromium and Playwright (extra 'test') and
textual-serve (extra 'serve'); Linux only. Each case runs 3 times; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/browser.py
from sections import publish  # noqa: E402
from tui_bench import first_screen  # noqa: E402

from tests import browser as B  # noqa: E402

ROUNDS = 3
VISITORS = (1, 3)
MB = 1024 * 1024


def visit(browser: object, url: str, server: int, n: int, needles: list[str]) -> dict[str, object]:
    """Open ``n`` pages at once; the seconds each took to its first screen, and memory."""
    pages, started = [], []
    for _ in range(n):
        started.append(time.perf_counter())
        pages.append(B.open_page(browser, url))
    seconds = [0.0] * n
    waiting = set(range(n))
    deadline = time.monotonic() + 120
    while waiting and time.monotonic() < deadline:
        for i in list(waiting):
            text = "\n".join(B.screen(pages[i]))
            if all(s in text for s in needles):
                seconds[i] = time.perf_counter() - started[i]
                waiting.discard(i)
        time.sleep(0.02)
    if waiting:
        raise RuntimeError(f"{len(waiting)} page(s) showed no screen in 120 s")
    apps = B.app_processes(server)
    assert len(apps) == n, apps
    memory = [B.memory(pid) for pid in apps]
    server_memory = B.memory(server)
    for page in pages:
        page.close()
    while B.app_processes(server) and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    return {"seconds": seconds, "memory": memory, "server": server_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="Replace the serve section of FILE with the table.")
    args = parser.parse_args()
    if (why := B.missing()) is not None:
        sys.exit(f"serve_bench: {why}")
    from playwright.sync_api import sync_playwright

    from workbench.store.synthetic import write_synthetic_run

    folder = Path(tempfile.mkdtemp(prefix="wb-serve-bench-"))
    run = write_synthetic_run(folder / "small.h5", n_prompts=6)
    port = B.free_port()
    server = B.start_server([run], port, folder / "serve.log")
    idle = B.memory(server.pid)
    load = os.getloadavg()[0]
    needles = ["query 0 ", "1 Attention"]
    rows = []
    try:
        with sync_playwright() as pw:
            browser = B.launch(pw)
            visit(browser, f"http://127.0.0.1:{port}/", server.pid, 1, needles)  # warm the file cache
            for n in VISITORS:
                results, terminal = [], []
                for _ in range(ROUNDS):  # the same app in tmux, in turn with the page: same load
                    if n == 1 and shutil.which("tmux"):
                        terminal.append(first_screen(run)[0])
                    results.append(visit(browser, f"http://127.0.0.1:{port}/", server.pid, n, needles))
                seconds = [s for r in results for s in r["seconds"]]  # type: ignore[union-attr]
                rss = [m["rss"] for r in results for m in r["memory"]]  # type: ignore[union-attr]
                uss = [m["uss"] for r in results for m in r["memory"]]  # type: ignore[union-attr]
                server_rss = [r["server"]["rss"] for r in results]  # type: ignore[index]
                rows.append((n, statistics.median(seconds), min(seconds), max(seconds),
                             statistics.median(rss), statistics.median(uss), statistics.median(server_rss),
                             statistics.median(terminal) if terminal else None))
                print(f"{n} visitor(s): {rows[-1]}", file=sys.stderr)
            browser.close()
    finally:
        B.stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    lines = [
        "## Terminal UI in a browser: cost per visitor (`benchmarks/serve_bench.py`)",
        "",
        (f"`python benchmarks/serve_bench.py` — {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} cores, Python {platform.python_version()}; `workbench serve RUN` (tui_bench's "
         "small run) and headless Chromium on the same machine, pages 1200×800; 1 or 3 pages opened "
         "together, each starting its own `workbench tui` process. \"First screen\": from asking for "
         "the page to the attention view's cursor line in the page's terminal (page load, websocket, "
         "process start, imports, opening the run, drawing); beside it, for one visitor, the same app "
         "started in tmux (80×24, tui_bench's measure) in turn with the page, under the same load. "
         "Memory once every page shows its screen: "
         "RSS of each visitor's app process, USS (its private memory: what one more visitor adds), and "
         f"the server's RSS ({idle['rss'] / MB:.0f} MB with no visitor). Medians of {ROUNDS} rounds; "
         f"load average {load:.1f} at the start (times grow with it: the machine may be shared)."),
        "",
        "| visitors at once | first screen (median) | min – max | `tui` in tmux | app RSS each "
        "| app USS each | server RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, med, lo, hi, rss_, uss_, srv, tmux in rows:
        lines.append(f"| {n} | {med:.2f} s | {lo:.2f} – {hi:.2f} s | "
                     f"{f'{tmux:.2f} s' if tmux is not None else '–'} | {rss_ / MB:.0f} MB "
                     f"| {uss_ / MB:.0f} MB | {srv / MB:.0f} MB |")
    publish(lines, args.write)


if __name__ == "__main__":
    main()
