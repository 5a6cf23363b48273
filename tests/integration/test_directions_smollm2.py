"""Embedding geometry and a contrast-set direction on the embedded default model (SmolLM2-135M):
the numbers docs/analyses.md reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import workbench
from workbench.registries import analyze, build_analyses
from workbench.capturing.prompts import load_prompts_file

pytestmark = pytest.mark.integration

SENTIMENT = Path(__file__).parents[2] / "examples" / "sentiment.jsonl"


def test_smollm2_sentiment_direction_separates_held_out_prompts(smollm2, tmp_path):
    prompts = load_prompts_file(SENTIMENT)
    assert len(prompts) == 120
    workbench.capture(smollm2, prompts, hooks=list(build_analyses().get("direction").needs), out=tmp_path / "s.h5",
                      progress=False)
    direction = build_analyses().get("direction")
    with workbench.open_run(tmp_path / "s.h5") as run:
        [out] = analyze(run, [direction], {"direction": {"holdout": 0.5, "name": "sentiment"}})
        d = out.stored.data
        assert d["contrast"]["positive"] == "positive" and d["contrast"]["n_test_positive"] == 30
        aucs = {x["layer"]: x["auc"] for x in d["layers"]}
        assert aucs[d["layer"]] > 0.9 and 10 <= int(d["layer"]) <= 22, aucs  # mid-network
        assert aucs["embed"] < 0.8
        chosen = d["rows"].index(d["layer"])
        shuffled = []
        for seed in range(10):  # the control: labels shuffled, ten splits
            [o] = analyze(run, [direction], {"direction": {"holdout": 0.5, "shuffle": True, "seed": seed,
                                                           "name": f"shuffled-{seed}"}})
            shuffled.append(o.stored.data["layers"][chosen]["auc"])
        assert abs(np.mean(shuffled) - 0.5) < 0.1, shuffled
        [proj] = analyze(run, [build_analyses().get("projection")], {"projection": {"direction": "sentiment"}})
        means = {lb: np.mean([p["mean"][chosen] for p in proj.stored.data["prompts"] if p["label"] == lb])
                 for lb in ("positive", "negative")}
        assert means["positive"] > means["negative"]


def test_smollm2_neighbours_and_analogy(smollm2, tmp_path):
    workbench.capture(smollm2, ["The capital of France is"], hooks=[], out=tmp_path / "e.h5", progress=False)
    with workbench.open_run(tmp_path / "e.h5") as run:
        [out] = analyze(run, [build_analyses().get("embeddings")], model=smollm2)
    d = out.stored.data
    assert out.ok and d["tied"] and d["matrices"] == ["embed"] and not d["skipped"]
    assert d["analogy"]["embed"]["cosine"][0]["token"] == " queen"
    w = smollm2.bridge.original_model.get_input_embeddings().weight.detach().double().numpy()
    paris = next(t for t in d["tokens"] if t["token"] == " Paris")
    cos = w @ w[paris["id"]] / (np.linalg.norm(w, axis=1) * np.linalg.norm(w[paris["id"]]))
    cos[paris["id"]] = -np.inf
    want = np.argsort(-cos)[:10]
    got = d["neighbours"]["embed"][d["tokens"].index(paris)]["cosine"]
    assert [x["id"] for x in got] == want.tolist()
    np.testing.assert_allclose([x["score"] for x in got], cos[want], atol=1e-5)
    assert " London" in [x["token"] for x in got[:3]]
