"""Capture for encoders (BERT) and encoder-decoders (T5), against TransformerLens' own
``run_with_cache`` on each prompt alone; and the token streams each axis is indexed by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from tests.test_capture import BATCH_RTOL, assert_close_to_tensor, random_prompts


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_models):
    prompts = random_prompts(40, seed=21, lo=1, hi=120)
    out = tmp_path_factory.mktemp("bert") / "bert.h5"
    workbench.capture(tiny_models["tiny-bert"], prompts, hooks=["all"], out=out, batch_size=6,
                      progress=False)
    return prompts, workbench.open_run(out)


def test_encoder_equals_run_with_cache(bert_run, tiny_models):
    prompts, run = bert_run
    model = tiny_models["tiny-bert"]
    assert run.streams == ("tokens",)
    for i, text in enumerate(prompts):
        ids = model.tokenize(text)
        assert run.tokens(i).tolist() == ids
        assert run.str_tokens(i)[0] == "[CLS]" and run.str_tokens(i)[-1] == "[SEP]"
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(torch.tensor([ids]))
        for name in run.hooks:
            assert_close_to_tensor(run.activation(name, i), cache[name][0].numpy(), f"{name}[{i}]",
                                   BATCH_RTOL)


def test_encoder_attention_is_bidirectional(bert_run):
    _, run = bert_run
    i = max(range(len(run)), key=run.n_tokens)
    pattern = run.activation("blocks.0.attn.hook_pattern", i)
    assert (np.triu(pattern, k=1) > 0).any()  # no causal mask
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)


def test_masked_lm_predictions_score_the_token_in_place(bert_run, tiny_models):
    prompts, run = bert_run
    model = tiny_models["tiny-bert"]
    assert run.lm_target == "same"
    ids = torch.tensor([model.tokenize(prompts[3])])
    with torch.no_grad():
        logp = torch.log_softmax(model.bridge(ids)[0].double(), -1)
    expected = -logp[torch.arange(ids.shape[1]), ids[0]]
    np.testing.assert_allclose(run.loss(3), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.isnan(run.loss(3)).any()


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, tiny_models):
    prompts = random_prompts(30, seed=22, lo=1, hi=80)
    rows = [{"prompt": p, "target": p[::-1][:40] or "x"} for p in prompts]
    rows[5] = {"prompt": prompts[5]}  # no target: the decoder reads only its start token
    out = tmp_path_factory.mktemp("t5") / "t5.h5"
    workbench.capture(tiny_models["tiny-t5"], rows, hooks=["all"], out=out, batch_size=4,
                      progress=False)
    return rows, workbench.open_run(out)


def _t5_inputs(model, row):
    enc = model.tokenize(row["prompt"])
    start = model.bridge.original_model.config.decoder_start_token_id
    if "target" in row:
        target = model.tokenizer(row["target"])["input_ids"]
        return enc, [start, *target[:-1]], target
    return enc, [start], [-1]


def test_encoder_decoder_equals_run_with_cache(t5_run, tiny_models):
    rows, run = t5_run
    model = tiny_models["tiny-t5"]
    assert run.streams == ("tokens", "dec_tokens") and run.lm_stream == "dec_tokens"
    for i, row in enumerate(rows):
        enc, dec, target = _t5_inputs(model, row)
        assert run.tokens(i).tolist() == enc
        assert run.tokens(i, "dec_tokens").tolist() == dec
        assert run.targets(i).tolist() == target
        with torch.no_grad():
            logits, cache = model.bridge.run_with_cache(torch.tensor([enc]),
                                                        decoder_input=torch.tensor([dec]))
        for name in run.hooks:
            assert_close_to_tensor(run.activation(name, i), cache[name][0].numpy(), f"{name}[{i}]",
                                   BATCH_RTOL)
        logp = torch.log_softmax(logits[0].double(), -1)
        loss = run.loss(i)
        for t, tok in enumerate(target):
            if tok < 0:
                assert np.isnan(loss[t])
            else:
                assert loss[t] == pytest.approx(float(-logp[t, tok]), rel=1e-4, abs=1e-5)


def test_each_axis_knows_its_tokens(t5_run):
    _, run = t5_run
    i = 2
    n_enc, n_dec = run.n_tokens(i), run.n_tokens(i, "dec_tokens")
    cross = "decoder_blocks.1.cross_attn.hook_pattern"
    assert run.activation(cross, i).shape == (4, n_dec, n_enc)
    assert run.axes(cross) == ("head", "dec_query_pos", "enc_key_pos")
    _, q_tokens, k_tokens = run.axis_tokens(cross, i)
    assert q_tokens == run.str_tokens(i, "dec_tokens") and k_tokens == run.str_tokens(i)
    self_dec = "decoder_blocks.0.self_attn.hook_pattern"
    assert run.activation(self_dec, i).shape == (4, n_dec, n_dec)
    assert (np.triu(run.activation(self_dec, i), k=1) == 0).all()  # the decoder is causal
    enc_resid = "encoder_blocks.1.hook_resid_post"
    assert run.activation(enc_resid, i).shape == (n_enc, 64) and run.axes(enc_resid)[0] == "enc_pos"
    dec_resid = "decoder_blocks.1.hook_resid_post"
    assert run.activation(dec_resid, i).shape == (n_dec, 64) and run.axes(dec_resid)[0] == "dec_pos"
    np.testing.assert_allclose(run.activation(cross, i).sum(-1), 1.0, rtol=1e-5)


def test_minilm_capture_has_no_lm_outputs(tmp_path, tiny_models):
    out = tmp_path / "mini.h5"
    workbench.capture("minilm-l6", ["Paris is the capital of France.", "Hi"], hooks=["residual"],
                      out=out, progress=False)
    with workbench.open_run(out) as run:
        assert not run.has_lm_outputs and "tokens/loss" not in run.f
        with pytest.raises(workbench.UserError, match="no trained LM head"):
            run.loss(0)


@pytest.mark.integration
def test_minilm_equals_run_with_cache(tmp_path):
    model = workbench.load_model("minilm-l6", device="cpu", progress=False)
    texts = ["Paris is the capital of France.", "A man is playing a guitar.", "Hi",
             "Transformers attend to every token in both directions, unlike GPT."]
    out = tmp_path / "mini.h5"
    workbench.capture(model, texts, hooks=["all"], out=out, batch_size=3, progress=False)
    with workbench.open_run(out) as run:
        assert len(run.hooks) > 50
        for i, text in enumerate(texts):
            ids = model.tokenize(text)
            with torch.no_grad():
                _, cache = model.bridge.run_with_cache(torch.tensor([ids]))
            for name in run.hooks:
                assert_close_to_tensor(run.activation(name, i), cache[name][0].numpy(),
                                       f"{name}[{i}]", BATCH_RTOL)
