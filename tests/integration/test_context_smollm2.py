"""Context shapes meaning on the embedded default model (SmolLM2-135M): the planted fact of
examples/context.jsonl, as docs/analyses.md reports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import workbench
from workbench.capturing.prompts import load_prompts_file
from workbench.registries import analyze, build_analyses

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[2] / "examples" / "context.jsonl"


def test_smollm2_bank_senses_part_with_depth(smollm2, tmp_path):
    context = build_analyses().get("context")
    workbench.capture(smollm2, load_prompts_file(EXAMPLE), hooks=[*context.needs, *context.optional],
                      out=tmp_path / "c.h5", progress=False)
    with workbench.open_run(tmp_path / "c.h5") as run:
        results = {}
        for word in (" bank", " bat"):
            [out] = analyze(run, [context], {"context": {"word": word}}, model=smollm2)
            assert out.ok, out.stored.error
            results[word] = out.stored
    d, a = results[" bank"].data, results[" bank"].arrays
    assert d["n_contexts"] == 10 and d["senses"] == {"river": 5, "money": 5} and len(d["skipped"]) == 8
    assert d["layers"][0] == "embed" and d["layers"][-1] == "29"
    # the same token id: the same embedding (SmolLM2 has no positional embedding), whatever the context
    np.testing.assert_allclose(a["pair_cosine"][0], 1.0, atol=1e-6)
    # by the last layer the context has pulled the senses apart
    assert a["same"][-1] > a["cross"][-1] + 0.1, (a["same"][-1], a["cross"][-1])
    assert a["cross"][-1] < 0.8 and a["pair_cosine"][-1].min() < 0.6
    # from layer 4 every context's nearest other context has its sense; through layers 4-15 every
    # same-sense pair is closer than every cross-sense pair
    layer = {x: k for k, x in enumerate(d["layers"])}
    assert (a["nearest_same"][layer["4"]:] == 1.0).all()
    assert (a["margin"][layer["4"]: layer["15"] + 1] > 0).all() and a["margin"][-1] < 0
    # the figures docs/analyses.md quotes: bank-river-0 against bank-money-0
    river, money = d["prompts"][0], d["prompts"][5]
    assert (river["id"], money["id"]) == ("bank-river-0", "bank-money-0")
    rows = [d["layers"].index(x) for x in ("embed", "15", "29")]
    np.testing.assert_allclose(a["cosine"][rows, 0, 5], [1.000, 0.817, 0.715], atol=2e-3)
    assert d["output_check"] == {"compared": 10, "agree": 10}
    b = results[" bat"].arrays
    np.testing.assert_allclose(b["pair_cosine"][0], 1.0, atol=1e-6)
    assert b["same"][-1] > b["cross"][-1]
