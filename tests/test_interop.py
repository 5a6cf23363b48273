"""``workbench.activation_cache(run, i)``: TransformerLens analysis code runs on a stored run, without the model, and
gives what it gives on TransformerLens' own cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens.ActivationCache import ActivationCache

import workbench

TEXTS = ["the cat sat on the mat", "hello", "zzz top of the world"]


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("interop") / "run.h5"
    workbench.capture(tiny_models["tiny-gpt2"], TEXTS, hooks=["lens", "attention", "mlp"], out=out,
                      batch_size=1, progress=False)
    return workbench.open_run(out)


def _reference(model, text):
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([model.tokenize(text)]))
    return cache


def test_cache_is_an_activation_cache_with_every_name(stored):
    cache = workbench.activation_cache(stored, 0)
    assert isinstance(cache, ActivationCache)
    assert cache["blocks.1.hook_resid_post"].shape == (1, stored.n_tokens(0), 64)
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])  # TL short names
    assert torch.equal(cache["blocks.0.hook_out"], cache["blocks.0.hook_resid_post"])  # an alias
    assert cache["pattern", 0].shape == (1, 4, stored.n_tokens(0), stored.n_tokens(0))
    no_batch = workbench.activation_cache(stored, 0, remove_batch_dim=True)
    assert no_batch["resid_post", 1].shape == (stored.n_tokens(0), 64)


def test_transformer_lens_analyses_match_the_live_cache(stored, tiny_models):
    model = tiny_models["tiny-gpt2"]
    for i, text in enumerate(TEXTS):
        ours, ref = workbench.activation_cache(stored, i), _reference(model, text)
        for name in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z",
                     "ln_final.hook_scale", "hook_embed", "hook_pos_embed", "blocks.0.mlp.hook_post"):
            torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-5)
        a, labels_a = ours.accumulated_resid(incl_mid=True, return_labels=True)
        b, labels_b = ref.accumulated_resid(incl_mid=True, return_labels=True)
        assert labels_a == labels_b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        a, labels_a = ours.decompose_resid(return_labels=True)
        b, labels_b = ref.decompose_resid(return_labels=True)
        assert labels_a == labels_b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.stack_activation("pattern"), ref.stack_activation("pattern"),
                                   rtol=0, atol=1e-6)


def test_weight_based_helpers_with_the_model(stored, tiny_models):
    model = tiny_models["tiny-gpt2"]
    ours = workbench.activation_cache(stored, 2, model=model)
    ref = _reference(model, TEXTS[2])
    torch.testing.assert_close(ours.stack_head_results(layer=-1), ref.stack_head_results(layer=-1),
                               rtol=1e-5, atol=1e-5)
    # the residual stream's direct contribution to the logit of the last token's top prediction
    token = int(stored.top_k(2)[0][-1, 0])
    attrs_ours = ours.logit_attrs(ours.accumulated_resid(), tokens=token, pos_slice=-1)
    attrs_ref = ref.logit_attrs(ref.accumulated_resid(), tokens=token, pos_slice=-1)
    torch.testing.assert_close(attrs_ours, attrs_ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_runs_give_float32_tensors(tmp_path, tiny_models):
    out = tmp_path / "bf16.h5"
    workbench.capture(tiny_models["tiny-gpt2"], TEXTS[:1], hooks=["residual"], out=out,
                      dtype="bfloat16", progress=False)
    cache = workbench.activation_cache(workbench.open_run(out), 0)
    assert cache["resid_post", 0].dtype == torch.float32
    ref = _reference(tiny_models["tiny-gpt2"], TEXTS[0])["blocks.0.hook_resid_post"]
    np.testing.assert_array_equal(cache["resid_post", 0].numpy(), ref.bfloat16().float().numpy())
