"""The toy-induction checkpoints show the induction heads forming: ``toy-induction@STEP`` models,
``examples/training_dynamics.py`` run on them, and the scores recomputed here from the stored
patterns and tokens (numpy, not the example's code)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from workbench_plugins import toy_models

import workbench
from tests.clitools import run_cli
from workbench.registries import analyze, build_analyses

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "training_dynamics.py"
PATTERN = "blocks.1.attn.hook_pattern"
STEPS = toy_models.checkpoint_steps()


def induction_and_loss(run: workbench.Run) -> tuple[np.ndarray, float, float]:
    """Per layer-1 head: mean over the second copy's queries of the weight on the key right after
    the query letter's earlier occurrence; the mean loss of predicting the second copy; and the
    score of uniform attention."""
    scores, losses, chance = [], [], []
    for i in range(len(run)):
        tokens, pattern, loss = run.tokens(i), run.activation(PATTERN, i), run.loss(i)
        assert tokens[0] == toy_models.VOCAB["<bos>"] and len(tokens) % 2 == 1
        n = (len(tokens) - 1) // 2
        assert np.array_equal(tokens[1 : n + 1], tokens[n + 1 :]) and len(set(tokens[1 : n + 1])) == n
        queries = np.arange(n + 1, 2 * n + 1)  # the second copy; its letter is at q - n, the next one at q - n + 1
        scores.append(pattern[:, queries, queries - n + 1].mean(axis=1))
        losses.append(loss[n : 2 * n].mean())  # loss[t]: predicting token t + 1
        chance.append((1.0 / (queries + 1)).mean())
    return np.mean(scores, axis=0), float(np.mean(losses)), float(np.mean(chance))


@pytest.fixture(scope="module")
def dynamics(tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamics")
    spec = importlib.util.spec_from_file_location("training_dynamics_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--out", str(out), "--prompts", "8", "--plot", str(out / "dynamics.png")])
    workbench.capture("toy-induction", str(out / "prompts.jsonl"), hooks=["attention"], out=out / "final.h5",
                      device="cpu", progress=False)
    return out, rows


def test_checkpoints_are_registered_models_with_their_own_provenance(dynamics):
    out, rows = dynamics
    assert len(STEPS) >= 5 and STEPS[0] == 0 and [r["step"] for r in rows] == STEPS
    listing = run_cli("models")
    assert listing.returncode == 0, listing.stderr
    assert all(f"toy-induction@{s}" in listing.stdout for s in STEPS)
    provenance = []
    for s in STEPS:
        with workbench.open_run(out / f"step-{s:05d}.h5") as run:
            assert run.model_name == f"toy-induction@{s}"
            provenance.append(run.capture_settings.model.provenance)
    assert len({p["sha256"] for p in provenance}) == len(STEPS)
    assert [p["revision"] for p in provenance] == [f"step {s}" for s in STEPS]
    assert (out / "dynamics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_induction_head_forms_at_the_phase_change(dynamics):
    out, rows = dynamics
    with workbench.open_run(out / "final.h5") as run:
        own, _, chance = induction_and_loss(run)
    head = int(np.argmax(own))  # the shipped model's induction head
    scores, losses = [], []
    for s, row in zip(STEPS, rows, strict=True):
        with workbench.open_run(out / f"step-{s:05d}.h5") as run:
            score, loss, _ = induction_and_loss(run)
        np.testing.assert_allclose(row["induction"], score, atol=1e-5)  # the example agrees
        assert row["loss_second_copy"] == pytest.approx(loss, abs=1e-5)
        scores.append(score[head])
        losses.append(loss)
    assert scores[0] < min(0.2, 2 * chance)  # about uniform attention at initialisation
    assert scores[-1] > 0.8 and abs(scores[-1] - own[head]) < 0.1 * own[head]
    assert all(b > a - 0.05 for a, b in itertools.pairwise(scores))  # rises, never falls back

    lo, hi = toy_models.checkpoint_info()["phase_change"]["steepest_between"]
    before = max(k for k, s in enumerate(STEPS) if s < lo)
    after = min(k for k, s in enumerate(STEPS) if s > hi)
    assert scores[before] < 0.2 and scores[after] > 0.8
    assert losses[before] > 3.0 and losses[after] < 1.5 and losses[-1] < 0.6  # ln 52 = 3.95: chance

    with workbench.open_run(out / f"step-{STEPS[before]:05d}.h5") as run:
        [o] = analyze(run, [build_analyses().get("diff")],
                      {"diff": {"other": str(out / f"step-{STEPS[after]:05d}.h5"), "lens": "off"}})
    ranked = [(h["hook"], h["head"]) for h in o.stored.result().data["ranked"]["heads"]]
    assert (PATTERN, head) in ranked[:3] and ranked[0][0] == PATTERN  # layer 1 changed most
