"""Head roles on the embedded default model (SmolLM2-135M): the numbers docs/analyses.md reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from workbench.registries import analyze, build_analyses

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "The animal didn't cross the street because it was too tired.",
    "Alice gave Bob a book, and then Bob gave Alice a pen.",
]


def test_smollm2_has_induction_heads_that_matter(smollm2, tmp_path):
    workbench.capture(smollm2, PROMPTS, hooks=["attention"], out=tmp_path / "r.h5", progress=False)
    with workbench.open_run(tmp_path / "r.h5") as run:
        [out] = analyze(run, [build_analyses().get("head-roles")], model=smollm2)
        data = out.stored.result().data
        tokens = out.stored.arrays["induction_tokens"]
    assert data["checks_ok"] and len(data["heads"]) == 30 * 9
    assert {r["kv_head"] for r in data["heads"]} == {0, 1, 2}
    ind = data["induction"]
    assert ind["loss_first_half"] - ind["loss_second_half"] > 5  # in-context repetition
    ranked = sorted(data["heads"], key=lambda r: -r["induction"])
    assert ranked[0]["induction"] > 0.5

    length, prefix = ind["length"], ind["prefix_tokens"]

    def losses(heads):
        """Loss on (first copy, second copy) with ``heads`` zeroed."""
        def zero(z, hook, hs):
            z = z.clone()
            z[:, :, hs] = 0
            return z

        by_layer: dict[int, list[int]] = {}
        for r in heads:
            by_layer.setdefault(r["layer"], []).append(r["head"])
        hooks = [(f"blocks.{layer}.attn.hook_z", lambda z, hook, hs=hs: zero(z, hook, hs))
                 for layer, hs in by_layer.items()]
        t = torch.as_tensor(tokens)
        with torch.inference_mode():
            logits = smollm2.bridge.run_with_hooks(t, fwd_hooks=hooks)
        logp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, t[:, 1:, None])[..., 0]
        return float(-logp[:, prefix : prefix + length - 1].mean()), float(-logp[:, prefix + length :].mean())

    first, second = losses([])
    assert second == pytest.approx(ind["loss_second_half"], abs=1e-6)
    top = ranked[:5]
    layers = {r["layer"] for r in top}
    # control: the heads of the same layers that score lowest on induction
    low = sorted((r for r in data["heads"] if min(layers) <= r["layer"] <= max(layers)),
                 key=lambda r: r["induction"])[:5]
    f_top, s_top = losses(top)
    f_low, s_low = losses(low)
    assert s_top - second > 5 and abs(f_top - first) < 0.2  # repetition breaks, the rest does not
    assert s_low - second < 1.5
    assert np.isfinite([f_low, s_low]).all()
