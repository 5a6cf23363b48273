"""Logit lens and direct logit attribution on real models: the embedded default (SmolLM2-135M,
RMSNorm, grouped-query) with prompts whose answers are known, and Gemma 3 (post-norms around every
sublayer). The numbers docs/analyses.md reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from workbench.registries import analyze, build_analyses
from workbench.capturing.prompts import Prompt

pytestmark = pytest.mark.integration

KNOWN = [
    Prompt(text="The capital of France is", id="france", metadata={"answer": " Paris", "wrong": " London"}),
    Prompt(text="When Mary and John went to the store, John gave a drink to", id="ioi",
           metadata={"answer": " Mary", "wrong": " John"}),
]


def _capture(model, tmp_path, analyses):
    needs = sorted({n for a in analyses for n in build_analyses().get(a).needs})
    workbench.capture(model, KNOWN, hooks=needs, out=tmp_path / "r.h5", progress=False)
    return workbench.open_run(tmp_path / "r.h5")


def _real_diff(model, run, rec):
    with torch.inference_mode():
        logits = model.forward(torch.as_tensor(run.tokens(rec["index"]), dtype=torch.long)[None])[0, rec["position"]]
    return float(logits[rec["target_id"]].double() - logits[rec["wrong_id"]].double())


def test_smollm2_lens_and_attribution_on_known_answers(smollm2, tmp_path):
    with _capture(smollm2, tmp_path, ["logit-lens", "dla"]) as run:
        lens, dla = analyze(run, [build_analyses().get("logit-lens"), build_analyses().get("dla")], model=smollm2)
        assert lens.ok and dla.ok
        d, a = lens.stored.data, lens.stored.arrays
        assert d["max_kl_to_model"] < 1e-6
        for p, answer in zip(d["prompts"], (" Paris", " Mary")):
            last = p["last"]
            assert last["target"] == answer and last["rows"][-1]["target_rank"] == 1
            ranks = a["target_rank"][p["offset"] + last["position"]]
            # the answer climbs in the late layers: far down the list in the first half
            assert np.median(ranks[:16]) > 500 and ranks[24] < np.median(ranks[:16]) and ranks[28] < ranks[24]
        for rec in dla.stored.data["prompts"]:
            real = _real_diff(smollm2, run, rec)
            assert rec["total"] == pytest.approx(real, rel=1e-4)
            assert rec["resid_check"] < 1e-5 and rec["attn_check"] < 1e-4
        france, ioi = dla.stored.data["prompts"]
        assert france["top"][0]["component"] == "L23H4" and france["top"][0]["value"] > 2
        assert ioi["top"][0]["component"] == "L23H3" and ioi["top"][0]["value"] > 2


def test_gemma3_attribution_adds_up_through_its_post_norms(gemma3, tmp_path):
    with _capture(gemma3, tmp_path, ["dla"]) as run:
        [dla] = analyze(run, [build_analyses().get("dla")], model=gemma3)
        assert dla.ok, dla.stored.error
        for rec in dla.stored.data["prompts"]:
            assert rec["total"] == pytest.approx(_real_diff(gemma3, run, rec), rel=1e-4)
            assert rec["attn_check"] < 1e-4  # heads through ln1_post add up to the stored attn_out
            assert rec["actual"] > 0  # the answer beats the wrong name
