"""The first-party analyses on the embedded default model, whose answers are known."""

from __future__ import annotations

import pytest

import workbench
from workbench.registries import analyze, build_analyses

pytestmark = pytest.mark.integration

TASKS = [
    workbench.Prompt("The capital of France is", "france", {"answer": " Paris", "wrong": " London"}),
    workbench.Prompt("When Mary and John went to the store, John gave a drink to", "ioi",
                     {"answer": " Mary", "wrong": " John"}),
]


def test_answer_and_next_token_on_smollm2(smollm2, tmp_path):
    workbench.capture(smollm2, TASKS, hooks=[], out=tmp_path / "r.h5", progress=False)
    run = workbench.open_run(tmp_path / "r.h5")
    registry = build_analyses()
    answer, next_token = analyze(run, [registry.get("answer"), registry.get("next-token")], model=smollm2)
    france, ioi = answer.stored.data["prompts"]
    assert france["rank"] == 1 and france["answer_token"] == " Paris" and france["logit_diff"] > 3
    assert ioi["rank"] == 1 and ioi["logit_diff"] > 3
    # the stored top-1 log-probability at the last position is the answer's, as the analysis found
    top_ids, top_lp = run.top_k(0)
    assert int(top_ids[-1, 0]) == france["answer_id"]
    assert float(top_lp[-1, 0]) == pytest.approx(france["logprob"], abs=1e-4)
    assert 0 < next_token.stored.data["mean_loss"] < 10
