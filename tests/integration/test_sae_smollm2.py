"""An SAE trained on SmolLM2-135M's residual stream, then the run encoded with it: the attention
sink is measured and left out, the clean next-token loss equals the run's own stored loss, the
reconstruction spliced in costs less than zeros, and the logit effects equal W_dec @ W_U."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from workbench_plugins.sae import stored_sae

import workbench
from workbench.capturing.prompts import Prompt
from workbench.registries import analyze, build_analyses

pytestmark = pytest.mark.integration

HOOK = "blocks.15.hook_resid_post"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_smollm2_sae_and_features(smollm2, tmp_path):
    texts = [json.loads(line)["prompt"] for line in (EXAMPLES / "sentiment.jsonl").read_text().splitlines()]
    path = tmp_path / "s.h5"
    workbench.capture(smollm2, [Prompt(text=t, id=f"p{i}") for i, t in enumerate(texts)], hooks=[HOOK],
                      out=path, progress=False)
    run = workbench.open_run(path)
    a = build_analyses()
    [out] = analyze(run, [a.get("sae")], {"sae": {"hook": HOOK, "features": 1152, "k": 16, "batch": 128,
                                                   "tokens": 40_000, "lr": 0.002, "ce_prompts": 12}},
                    model=smollm2)
    assert out.ok, out.stored.error
    d = out.stored.data
    assert d["skipped"]["first_position"] and d["skipped"]["sink_ratio"] > 20  # the sink, ~100x
    assert d["heldout"]["explained_variance"] > 0.5 and d["heldout"]["l0"] <= 16
    ce = d["ce"]
    held = set(range(len(run))) - set(_train(run, out.stored))
    stored = np.concatenate([run.loss(i)[:-1] for i in sorted(held)[:12]])
    assert ce["loss_clean"] == pytest.approx(float(stored.mean()), rel=1e-3)
    assert ce["loss_sae"] < ce["loss_zero"] and ce["ce_recovered"] > 0.5
    [feat] = analyze(run, [a.get("features")], {"features": {"logits": 5, "top": 5}}, model=smollm2)
    assert feat.ok, feat.stored.error
    sae = stored_sae(out.stored)
    w_u = smollm2.bridge.unembed.W_U.detach().to(torch.float32).numpy()
    arr = feat.stored.arrays
    for f in np.flatnonzero(arr["fires"])[:3]:
        want = np.argsort(-(sae.W_dec[f] @ w_u))[:5]
        np.testing.assert_array_equal(arr["promoted_ids"][f], want)
    assert feat.stored.data["tokens_encoded"] == sum(run.n_tokens(i) - 1 for i in range(len(run)))


def _train(run, stored):
    from workbench_plugins import sae_data

    p = stored.params
    return sae_data.select(run, p["hook"], range(len(run)), p["holdout"], p["skip"], p["seed"]).train
