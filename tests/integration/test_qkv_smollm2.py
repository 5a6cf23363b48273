"""Q·K·V step by step on the embedded default model (SmolLM2-135M: rotary, grouped-query 9/3
heads), and the live prompt loop on it: every step equals what the model stored."""

from __future__ import annotations

import math

import numpy as np
import pytest

import workbench
from workbench.store.attention_steps import attention_blocks, steps

pytestmark = pytest.mark.integration


def test_smollm2_qkv_steps_equal_the_stored_hooks(smollm2, tmp_path):
    path = tmp_path / "q.h5"
    workbench.capture(smollm2, ["When Mary and John went to the store, John gave a drink to"],
                      hooks=["attention-full"], out=path, progress=False)
    with workbench.open_run(path) as run:
        blocks = attention_blocks(run)
        assert len(blocks) == 30 and "blocks.0.attn.hook_rot_q" in run.aliases
        n = run.n_tokens(0)
        for prefix in (blocks[0], blocks[15], blocks[29]):
            for head in (0, 4, 8):
                for pos in (0, 5, n - 1):
                    s = steps(run, 0, prefix, head, pos)
                    assert s.kv_head == head // 3 and s.scale == pytest.approx(1 / 8)
                    assert s.errors.keys() == {"scores", "weights", "z"}
                    assert max(s.errors.values()) <= 1e-5, (prefix, head, pos, s.errors)
        # the pre-rotary hook_q / hook_k do not reproduce the stored scores (row 5)
        q = run.activation("blocks.0.attn.hook_q", 0)[5, 0].astype(np.float64)
        k = run.activation("blocks.0.attn.hook_k", 0)[:6, 0].astype(np.float64)
        stored = run.activation("blocks.0.attn.hook_attn_scores", 0)[0, 5, :6]
        assert np.abs(k @ q / math.sqrt(64) - stored).max() > 0.1
