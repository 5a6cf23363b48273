"""Where a capture's time goes, cause by cause, beside the plain forward pass (issue 30's case).

Case ``n`` of capture_bench.py: SmolLM2-135M, 64 prompts of 48 words, batch 8, the residual stream
after all 30 layers. In one process, round by round (the order reversed every other round), three
modes on the same batches:

- ``forward``: the bridge's forward pass over the batches, freed memory kept (as capture runs it),
  no key-value cache: what capture cannot avoid;
- ``capture``: ``workbench.capture`` as users run it (LM outputs: loss and top-10);
- ``capture --predictions 0``: no LM outputs (a decoder's pass ends at the last stored hook).

Captures are timed whole and, by wrapping capture's own functions for the length of a run, cause
by cause: set-up and finish (plan, hook probe, vocabulary, settings, lock, fsync and rename: the
capture's time outside its batch loop), the hooks' copies into the storage dtype, the LM outputs,
the main thread's waits to hand values to the writer thread, and the rest of each batch (the
forward pass itself, under capture's hooks). The writer thread's own HDF5 time is reported
beside them: it overlaps the forward pass, on the second core. Medians over the rounds.

    .venv/bin/python benchmarks/capture_causes.py
    .venv/bin/python benchmarks/capture_causes.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sections import publish

HEAD = "## Capture: where the time goes (`benchmarks/capture_causes.py`)"
ROUNDS = 3
MODES = ("forward", "capture", "capture --predictions 0")
CAUSES = ("set-up and finish", "hooks: copies into the storage dtype", "LM outputs (loss, top-10)",
          "waits to hand values to the writer thread", "forward pass under capture's hooks")


@contextmanager
def timed(owner: Any, name: str, into: dict[str, float], key: str) -> Iterator[None]:
    """For the block's length, ``owner.name`` also adds its seconds to ``into[key]``."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[key] += time.perf_counter() - t

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def capture_causes(model: Any, prompts: list[str], hooks: list[str], batch_size: int, out: Path,
                   predictions: int) -> dict[str, float]:
    import workbench
    from workbench.capturing import entry, forward
    from workbench.store.writer import RunWriter
    from workbench.store.writer_thread import WriterThread

    t: dict[str, float] = defaultdict(float)
    patches: list[tuple[Any, str, str]] = [
        (entry, "write_batches", "loop"), (entry, "run_batch", "batches"),
        (forward, "_to_storage", "copies"), (forward, "_lm_outputs", "lm"),
        (WriterThread, "put_act", "waits"), (WriterThread, "put_commit", "waits"),
        (RunWriter, "write_act", "writer"), (RunWriter, "commit", "writer"),
    ]
    start = time.perf_counter()
    with ExitStack() as stack:
        for owner, name, key in patches:
            stack.enter_context(timed(owner, name, t, key))
        workbench.capture(model, prompts, hooks=hooks, out=out, batch_size=batch_size, overwrite=True,
                          progress=False, predictions=predictions)
    total = time.perf_counter() - start
    out.unlink()
    return {"total": total, CAUSES[0]: total - t["loop"], CAUSES[1]: t["copies"], CAUSES[2]: t["lm"],
            CAUSES[3]: t["waits"], CAUSES[4]: t["batches"] - t["copies"] - t["lm"] - t["waits"],
            "writer": t["writer"]}


def plain_forward(model: Any, token_ids: list[list[int]], batch_size: int) -> float:
    import torch

    from workbench.capturing.malloc import freed_memory_kept

    start = time.perf_counter()
    with torch.inference_mode(), freed_memory_kept():
        for s in range(0, len(token_ids), batch_size):
            ids = token_ids[s : s + batch_size]
            tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
            for r, ids_r in enumerate(ids):
                tokens[r, : len(ids_r)] = torch.tensor(ids_r)
            model.bridge(tokens, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="FILE", help="Replace this benchmark's section of FILE.")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from capture_bench import CASES, make_prompts

    import workbench

    _, hooks, n, (lo, hi), batch_size = CASES["n"]
    model = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    prompts = make_prompts(n, lo, hi)
    token_ids = [model.tokenize(p) for p in prompts]
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    loads = []
    work: dict[str, Callable[[Path], dict[str, float]]] = {
        "forward": lambda out: {"total": plain_forward(model, token_ids, batch_size)},
        "capture": lambda out: capture_causes(model, prompts, hooks, batch_size, out, 10),
        "capture --predictions 0": lambda out: capture_causes(model, prompts, hooks, batch_size, out, 0),
    }
    with tempfile.TemporaryDirectory(prefix="causes-") as tmp:
        work["capture --predictions 0"](Path(tmp) / "warm.h5")  # warm-up: page cache, allocator
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                loads.append(os.getloadavg()[0])
                runs[mode].append(work[mode](Path(tmp) / "run.h5"))
                print(f"round {r + 1} {mode}: {runs[mode][-1]['total']:.2f} s", file=sys.stderr, flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    fwd = med("forward", "total")
    n_tokens = sum(map(len, token_ids))
    lines = [HEAD, "",
             (f"`python benchmarks/capture_causes.py` — 2 cores, torch {torch.__version__}; SmolLM2-135M, "
              f"{n} prompts of {lo} words ({n_tokens:,} tokens), batch {batch_size}, the residual stream after "
              f"all 30 layers (case n of capture_bench.py), float32; medians of {args.rounds} rounds in one "
              f"process, model loading not timed; load average (1 min) {min(loads):.2f}–{max(loads):.2f}. "
              "Causes are measured by timing capture's own functions during the run (main thread); the "
              "writer thread's HDF5 time overlaps the forward pass on the second core."),
             "",
             "| | capture | capture --predictions 0 |",
             "|---|---:|---:|"]
    lines.append(f"| whole capture | {med('capture', 'total'):.2f} s ({med('capture', 'total') / fwd:.2f}×) | "
                 f"{med('capture --predictions 0', 'total'):.2f} s ({med('capture --predictions 0', 'total') / fwd:.2f}×) |")
    for cause in CAUSES:
        lines.append(f"| {cause} | {med('capture', cause):.2f} s | {med('capture --predictions 0', cause):.2f} s |")
    lines.append(f"| (writer thread: HDF5 writes and commits, alongside) | {med('capture', 'writer'):.2f} s | "
                 f"{med('capture --predictions 0', 'writer'):.2f} s |")
    lines += ["", f"The plain forward pass over the same batches: {fwd:.2f} s (the ratios above are to it); "
              f"per round: {', '.join(format(x['total'], '.2f') for x in runs['forward'])} s. Without LM outputs "
              "a decoder's pass ends once the last stored hook has fired (here after block 29): the final norm "
              "and the 576 x 49,152 unembedding, which the plain forward runs, are skipped."]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
