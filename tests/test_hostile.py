"""Hostile and damaged run files (docs/store.md, "Hostile and damaged files").

Real runs of two tiny models (a decoder with loss and predictions; an encoder-decoder with gzip,
cross-attention and a second token stream), each with stored results, are damaged by Hypothesis:
truncated at random offsets, bytes flipped anywhere or in the metadata only, offsets that
decrease or point past the data or to 2**40, datasets deleted, given the wrong dtype or a shape
claiming terabytes, hook descriptions claiming terabytes, JSON documents of the wrong kind,
attributes of the wrong type, a future format version, result folders with truncated, foreign,
random or garbled files, and symlinked runs pointing at themselves. ``open_run`` (reading every
part), ``workbench inspect`` (text and JSON) and ``workbench analyze`` must read each one
correctly or fail with one ``workbench: error:`` line, within 10 s and 1 GB of extra memory, and
the process must survive (tests/hostile.py runs them in a forked, limited child). The cases
found while building this are kept in tests/data/hostile/ and are also opened in the terminal UI.

``WORKBENCH_HOSTILE_EXAMPLES`` sets the number of Hypothesis examples (default 40; the closing
figures in docs/store.md come from ``benchmarks/hostile_files.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench
from tests import hostile as H

CORPUS = Path(__file__).parent / "data" / "hostile"
EXAMPLES = int(os.environ.get("WORKBENCH_HOSTILE_EXAMPLES", "40"))
PROMPTS = [{"id": "p0", "prompt": "The cat sat on the mat.", "answer": " x"},
           {"id": "p1", "prompt": "你好 world 🍕", "answer": " y"},
           {"id": "p2", "prompt": "a"}]


def make_seeds(folder: Path, models: dict) -> dict[str, Path]:
    """The two undamaged runs every mutation starts from, with results beside them."""
    from tests.hostile import run_cli

    seeds = {"gpt2": folder / "gpt2.h5", "t5": folder / "t5.h5"}
    workbench.capture(models["tiny-gpt2"], PROMPTS, hooks=["residual", "attention"], out=seeds["gpt2"],
                      batch_size=2, progress=False)
    workbench.capture(models["tiny-t5"], PROMPTS, hooks=["residual", "attention"], out=seeds["t5"],
                      batch_size=2, progress=False, compression="gzip")
    for path in seeds.values():
        code, err = run_cli(["analyze", str(path), "attends-to", "next-token"])
        assert code == 0, err
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_models):  # type: ignore[no-untyped-def]
    return make_seeds(tmp_path_factory.mktemp("seeds"), tiny_models)


@pytest.fixture(scope="module")
def checker():  # type: ignore[no-untyped-def]
    c = H.Checker()
    yield c
    c.close()


@pytest.fixture(scope="module")
def digests(seeds, checker):  # type: ignore[no-untyped-def]
    """What each undamaged run reads back as (tests/hostile.py: read_everything)."""
    return {name: checker.check(path)["digest"] for name, path in seeds.items()}


def test_the_seed_runs_read_cleanly(seeds, checker, digests) -> None:
    """The undamaged runs pass every step: the checker itself can tell a good file."""
    for name, path in seeds.items():
        outcome = checker.check(path, tui=True)
        assert outcome["steps"] == {k: "ok" for k in ("open_run", "inspect", "inspect_json", "analyze", "tui")}
        assert not outcome["died"] and outcome["digest"] == digests[name]
        assert H.failures(outcome, digests[name]) == []


def test_the_checker_catches_a_crash_a_hang_and_a_traceback(tmp_path, seeds, checker) -> None:
    """The limits are real: a reader that dies, hangs or raises a bug is reported as such."""
    outcome = checker.check(tmp_path / "crash", tui=False)  # no such file: a user error ...
    assert outcome["steps"]["open_run"].startswith("user: no such run")
    assert H.failures(outcome) == []
    for kind, expect in (("segv", "killed by signal 11"), ("hang", "timeout after 10 s"),
                         ("bug", "bug: Traceback")):
        outcome = checker.check(tmp_path / f"selftest-{kind}", tui=False)
        assert any(expect in f for f in H.failures(outcome)), outcome


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_runs_fail_cleanly(data, seeds, checker, digests) -> None:
    seed = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    kind = data.draw(st.sampled_from(H.KINDS), label="kind")
    target = data.draw(st.sampled_from(H.targets_for(kind, H.dataset_names(seeds[seed]))), label="target")
    m = H.Mutation(seed, kind, target, data.draw(st.integers(0, 1 << 30), label="a"),
                   data.draw(st.integers(0, 1 << 20), label="b"))
    folder = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        path = H.apply(m, seeds[seed], folder)
        outcome = checker.check(path)
        assert H.failures(outcome, digests[seed], kind) == [], m.describe()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("case", sorted(p.name.removesuffix(".tar.gz") for p in CORPUS.glob("*.tar.gz")))
def test_the_corpus_of_found_cases(case, tmp_path, checker) -> None:
    """Each file that once crashed a reader (tests/data/hostile/README.md), now in the TUI too."""
    with tarfile.open(CORPUS / f"{case}.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    outcome = checker.check(tmp_path / case / "run.h5", tui=True)
    seed, kind = case.split("-")[:2]
    digest = json.loads((CORPUS / "seed_digests.json").read_text())[seed]
    assert H.failures(outcome, digest, kind) == [], outcome


def test_the_corpus_is_there() -> None:
    assert len(list(CORPUS.glob("*.tar.gz"))) >= 10


def test_a_sharded_index_cannot_name_files_outside_its_folder(tmp_path) -> None:
    from workbench.errors import UserError
    from workbench.store.shards import confined

    for bad in ("/etc/passwd", "../x.h5", "run.h5.shards/../../b.h5", ""):
        with pytest.raises(UserError, match="outside its folder"):
            confined(tmp_path / "run.h5", bad)
    assert confined(tmp_path / "run.h5", "run.h5.shards/unit-00001.h5") == "run.h5.shards/unit-00001.h5"
