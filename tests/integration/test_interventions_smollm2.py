"""Interventions on the embedded default model (SmolLM2-135M) with the indirect-object prompts of
examples/ioi.jsonl: the engine against TransformerLens hooks, and the figures docs/analyses.md
reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from workbench_plugins.intervene import Edit, Intervener, Metric, hook_names

import workbench
from workbench.registries import analyze, build_analyses
from workbench.capturing.prompts import load_prompts_file

pytestmark = pytest.mark.integration

IOI = Path(__file__).parents[2] / "examples" / "ioi.jsonl"


def test_smollm2_batched_ablations_equal_hooked_passes(smollm2):
    tokens = smollm2.tokenize("When Mary and John went to the store, John gave a drink to")
    first = smollm2.tokenizer  # " Mary", " John": one token each
    mary, john = (first(w, add_special_tokens=False)["input_ids"][0] for w in (" Mary", " John"))
    metric = Metric("logit_diff", tokens, mary, john)
    iv = Intervener(smollm2, tokens, metric)
    assert iv.shared_prefix, iv.fallback_reason
    rows = [(Edit(hook_names(layer)["z"], layer, head=h),) for layer in (0, 23, 29) for h in range(9)]
    rows += [(Edit(hook_names(layer)["resid"], layer, pos=p),) for layer in (10, 12) for p in range(len(tokens))]
    acts = iv.activations([e.hook for row in rows for e in row])
    source = {h: torch.zeros_like(a) for h, a in acts.items()}
    batched = iv.run(rows, source)
    oracle = []
    for row in rows:
        (e,) = row

        def zero(act, hook, e=e):
            if e.head is not None:
                act[:, :, e.head] = 0.0
            else:
                act[:, e.pos] = 0.0
            return act

        with torch.inference_mode():
            logits = smollm2.bridge.run_with_hooks(torch.tensor([tokens]), fwd_hooks=[(e.hook, zero)])
        oracle.append(float(logits[0, -1, mary] - logits[0, -1, john]))
    # A residual row at position p runs positions p.. only (its earlier positions attend to the
    # clean pass's keys and values): shorter float32 products round differently. Over all 750
    # ablation rows of this prompt: up to 4.3e-5 (blocks.10, position 13); rows run from position
    # 0: 0.0. A wrong key-value prefix moves these values by 0.1 or more.
    np.testing.assert_allclose(batched, oracle, atol=1e-4, rtol=0)
    assert iv.shared_positions, iv.positions_reason
    assert iv.baseline == pytest.approx(6.12, abs=0.01)


def test_smollm2_ioi_patching_finds_the_name_movers(smollm2, tmp_path):
    workbench.capture(smollm2, load_prompts_file(IOI)[:1], hooks=["residual"], out=tmp_path / "i.h5", progress=False)
    with workbench.open_run(tmp_path / "i.h5") as run:
        [out] = analyze(run, [build_analyses().get("patching")], {"patching": {"component": "heads"}}, model=smollm2)
    rec = out.stored.data["prompts"][0]
    heads = out.stored.arrays["heads"][0]
    assert rec["clean"] == pytest.approx(6.12, abs=0.01) and rec["corrupted_value"] == pytest.approx(-5.49, abs=0.01)
    assert np.unravel_index(np.argmax(heads), heads.shape) == (23, 3) and heads[23, 3] > 0.5
    assert heads[24, 4] < -0.2  # a head that works against the answer
    assert rec["correlation"]["heads"] > 0.9
