"""Capture on the embedded default model: every stored tensor equals TransformerLens'
``run_with_cache`` on each prompt alone, for English, other scripts and emoji."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from tests.test_capture import BATCH_RTOL, assert_close_to_tensor

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "Grüße aus Köln — straße, ñandú, smørrebrød",
    "日本語のテキストです。東京は",
    "I love pizza 🍕🍕 and rockets 🚀",
    "1, 2, 3, 4,",
]


def test_every_hook_equals_run_with_cache(tmp_path, smollm2):
    out = tmp_path / "smol.h5"
    workbench.capture(smollm2, PROMPTS, hooks=["all"], out=out, batch_size=4, progress=False)
    with workbench.open_run(out) as run:
        assert len(run.hooks) > 600  # every distinct tensor of a 30-layer model
        assert run.model_info["provenance"]["quantization"].startswith("GGUF Q4_1")
        for i, text in enumerate(PROMPTS):
            ids = smollm2.tokenize(text)
            assert run.tokens(i).tolist() == ids
            # as TransformerLens shows them: each token decoded alone (a character split across
            # tokens shows as U+FFFD in each part)
            assert run.str_tokens(i) == smollm2.bridge.to_str_tokens(torch.tensor(ids))
            with torch.no_grad():
                logits, cache = smollm2.bridge.run_with_cache(torch.tensor([ids]))
            for name in run.hooks:
                assert_close_to_tensor(run.activation(name, i), cache[name][0].numpy(),
                                       f"{name}[{i}]", BATCH_RTOL)
            logp = torch.log_softmax(logits[0].double(), -1)
            np.testing.assert_allclose(run.loss(i)[:-1],
                                       -logp[torch.arange(len(ids) - 1), ids[1:]].numpy(),
                                       rtol=1e-3, atol=1e-4)
        top_ids, top_lp = run.top_k(0)
        assert smollm2.tokenizer.decode([int(top_ids[-1, 0])]) == " Paris"
        assert np.exp(top_lp[-1, 0]) == pytest.approx(0.7725, abs=3e-3)
