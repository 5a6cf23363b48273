"""Many damaged runs through every reader: the figures behind docs/store.md's "Hostile and damaged
files" (tests/test_hostile.py runs 40 per suite run; this runs as many as asked).

Each file is one random mutation (tests/hostile.py: ``KINDS``) of one of two real seed runs (a
tiny GPT-2 and a tiny T5, each with stored results). Every reader runs on it in a forked child
limited to 10 s and 1 GB of extra memory; the outcome of each is "read" (and then, except for
damage to raw values, every value read equals the undamaged run's), a one-line user error, or a
broken promise (a crash, a hang, a traceback, too much memory, other values read silently).

    .venv/bin/python benchmarks/hostile_files.py --files 2000 [--tui-every 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--tui-every", type=int, default=10, help="open every Nth file in the TUI too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import workbench
    from tests import hostile as H
    from tests.test_hostile import make_seeds

    work = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    models = {n: workbench.load_model(n, device="cpu", progress=False) for n in ("tiny-gpt2", "tiny-t5")}
    seeds = make_seeds(work, models)
    names = {k: H.dataset_names(v) for k, v in seeds.items()}
    rng = random.Random(args.seed)
    checker = H.Checker()
    digests = {k: checker.check(v)["digest"] for k, v in seeds.items()}
    outcomes: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    broken: list[tuple[str, list[str]]] = []
    slowest = (0.0, "")
    hungriest = (0.0, "")
    steps = 0
    t0 = time.monotonic()
    try:
        for k in range(args.files):
            seed = rng.choice(sorted(seeds))
            kind = rng.choice(H.KINDS)
            m = H.Mutation(seed, kind, rng.choice(H.targets_for(kind, names[seed])),
                           rng.randrange(1 << 30), rng.randrange(1 << 20))
            folder = work / f"m{k}"
            path = H.apply(m, seeds[seed], folder)
            o = checker.check(path, tui=args.tui_every > 0 and k % args.tui_every == 0)
            shutil.rmtree(folder, ignore_errors=True)
            kinds[kind] += 1
            steps += len(o["steps"])
            for v in o["steps"].values():
                outcomes[v.split(":")[0]] += 1
            if o["seconds"] > slowest[0]:
                slowest = (o["seconds"], m.describe())
            if o["extra_mb"] > hungriest[0]:
                hungriest = (o["extra_mb"], m.describe())
            failed = H.failures(o, digests[seed], kind)
            if failed:
                broken.append((m.describe(), failed))
                print(f"BROKEN {m.describe()}: {failed[0][:300]}", file=sys.stderr)
            if (k + 1) % 100 == 0:
                print(f"{k + 1} files, {len(broken)} broken, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    finally:
        checker.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.files} damaged files ({len(H.KINDS)} kinds of damage: "
          + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")")
    print(f"{steps} reader runs: " + ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items())))
    print(f"broken promises: {len(broken)}")
    print(f"slowest file: {slowest[0]:.2f} s ({slowest[1]}); most extra memory: {hungriest[0]:.1f} MB "
          f"({hungriest[1]}); {time.monotonic() - t0:.0f} s in all")
    for desc, failed in broken[:20]:
        print(f"  {desc}: {failed[0][:500]}")


if __name__ == "__main__":
    main()
