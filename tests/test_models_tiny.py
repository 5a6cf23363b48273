"""The tiny random models: every family loads through the same API, describes itself truthfully
and computes what the underlying Hugging Face model computes."""

from __future__ import annotations

import pytest
import torch

from tests.config_oracle import assert_matches_config

FAMILIES = {
    "tiny-gpt2": "decoder",
    "tiny-llama": "decoder",
    "tiny-bert": "encoder",
    "tiny-t5": "encoder-decoder",
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_description_matches_hf_config(tiny_models, name):
    model = tiny_models[name]
    info = model.info
    assert info.family == FAMILIES[name]
    assert_matches_config(info, model.bridge.original_model.config)
    assert info.provenance.source == "tiny" and info.provenance.seed == 0
    assert info.n_hook_names == len(model.hook_names) > 50
    assert info.has_lm_head


def test_norm_placement_positions_and_attention(tiny_models):
    assert tiny_models["tiny-gpt2"].info.norm_placement == "pre"
    assert tiny_models["tiny-gpt2"].info.positional == "learned absolute"
    assert tiny_models["tiny-llama"].info.positional == "rotary (RoPE)"
    assert tiny_models["tiny-llama"].info.normalization == "RMSNorm"
    assert tiny_models["tiny-llama"].info.n_kv_heads == 2  # grouped-query: 4 query heads share 2
    assert tiny_models["tiny-bert"].info.norm_placement == "post"
    assert tiny_models["tiny-bert"].info.attention == "bidirectional"
    assert tiny_models["tiny-gpt2"].info.attention == "causal"
    t5 = tiny_models["tiny-t5"]
    assert any(".cross_attn.hook_pattern" in n for n in t5.hook_names)
    assert t5.info.n_decoder_layers == 2


def test_bos_policies_are_explicit(tiny_models):
    gpt2 = tiny_models["tiny-gpt2"]
    raw = gpt2.tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert gpt2.tokenize("hi") == [1, *raw]  # its default policy is "prepend"
    assert gpt2.tokenize("hi", bos="none") == raw
    assert gpt2.tokenize("hi", bos="tokenizer") == raw  # this tokenizer adds nothing itself
    assert gpt2.info.bos.prefix == ("<bos>",) and gpt2.info.bos.suffix == ()
    bert = tiny_models["tiny-bert"]
    assert bert.info.bos.prefix == ("[CLS]",) and bert.info.bos.suffix == ("[SEP]",)
    assert tiny_models["tiny-t5"].info.bos.suffix == ("<eos>",)


def test_byte_tokenizer_handles_any_text(tiny_models):
    model = tiny_models["tiny-gpt2"]
    text = "Grüße 🙂 日本"
    ids = model.tokenize(text, bos="none")
    assert len(ids) == len(text.encode("utf-8"))
    assert model.tokenizer.decode(ids) == text


def _hf_probs_decoder(model, ids):
    with torch.no_grad():
        logits = model.bridge.original_model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_decoder_prediction_equals_hf_forward(tiny_models, name):
    model = tiny_models[name]
    pred = model.predict("hello world", k=5)
    probs = _hf_probs_decoder(model, pred.token_ids)
    top = torch.topk(probs, 5)
    assert [t.id for t in pred.top] == top.indices.tolist()
    assert [t.prob for t in pred.top] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert pred.position == len(pred.token_ids) - 1


def test_encoder_predicts_at_mask(tiny_models):
    model = tiny_models["tiny-bert"]
    pred = model.predict("a [MASK] b", k=3)
    ids = pred.token_ids
    mask_pos = ids.index(model.tokenizer.mask_token_id)
    assert pred.position == mask_pos and pred.kind == "masked token"
    with torch.no_grad():
        logits = model.bridge.original_model(torch.tensor([ids])).logits[0, mask_pos]
    assert [t.id for t in pred.top] == torch.topk(logits, 3).indices.tolist()


def test_encoder_decoder_predicts_first_output_token(tiny_models):
    model = tiny_models["tiny-t5"]
    pred = model.predict("abc", k=3)
    hf = model.bridge.original_model
    start = hf.config.decoder_start_token_id
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([pred.token_ids]),
                    decoder_input_ids=torch.tensor([[start]])).logits[0, -1]
    assert [t.id for t in pred.top] == torch.topk(logits, 3).indices.tolist()


def test_tiny_loads_are_reproducible(tiny_models):
    import workbench

    again = workbench.load_model("tiny-gpt2", device="cpu", progress=False)
    a = tiny_models["tiny-gpt2"].bridge.original_model.state_dict()
    b = again.bridge.original_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_context_limit_is_enforced(tiny_models):
    from workbench.errors import UserError

    with pytest.raises(UserError, match="accepts at most 512"):
        tiny_models["tiny-gpt2"].predict("x" * 600)


def test_run_with_cache_works_through_the_bridge(tiny_models):
    model = tiny_models["tiny-llama"]
    ids = torch.tensor([model.tokenize("cache me")])
    _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert cache["blocks.1.hook_resid_post"].shape == (1, ids.shape[1], 64)


def test_local_model_folder_loads_with_fingerprinted_provenance(tmp_path):
    """A save_pretrained folder loads through TransformerLens' own loader and computes what the
    Hugging Face model computes."""
    import hashlib

    from workbench_plugins.tiny_models import build_hf_model

    import workbench

    hf, tok, _ = build_hf_model("gpt2")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = workbench.load_model(str(tmp_path), device="cpu", progress=False)
    assert model.info.provenance.source == "directory"
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert model.info.provenance.sha256 == digest
    ids = torch.tensor([model.tokenize("folder", bos="none")])
    with torch.no_grad():
        assert torch.allclose(model.forward(ids), hf(ids).logits, atol=1e-6)
