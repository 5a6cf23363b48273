"""What a model's Hugging Face config says about its shape, read field by field.

This is the independent side of the self-description tests: ``ModelInfo`` is derived from
TransformerLens' bridge (its config and the hook points it exposes); these numbers come straight
from the Hugging Face config object.
"""

from __future__ import annotations

from typing import Any


def _first(config: Any, *names: str) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    raise AttributeError(f"config has none of {names}")


def expected_shape(config: Any) -> dict[str, Any]:
    text = getattr(config, "text_config", None) or config
    n_heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    d_model = _first(text, "hidden_size", "n_embd", "d_model")
    out = {
        "n_layers": _first(text, "num_hidden_layers", "n_layer", "num_layers"),
        "n_heads": n_heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", None) or n_heads,
        "d_model": d_model,
        "d_vocab": text.vocab_size,
    }
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None)
    out["d_head"] = head_dim or d_model // n_heads
    d_mlp = getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None)
    if d_mlp is None and hasattr(text, "n_inner"):
        d_mlp = text.n_inner or 4 * d_model
    out["d_mlp"] = d_mlp
    n_ctx = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if n_ctx is not None:
        out["n_ctx"] = n_ctx
    if getattr(text, "num_decoder_layers", None) is not None:
        out["n_decoder_layers"] = text.num_decoder_layers
    return out


def assert_matches_config(info: Any, config: Any) -> None:
    expected = expected_shape(config)
    actual = {k: getattr(info, k) for k in expected}
    assert actual == expected, f"{info.name}: description {actual} != config {expected}"
    assert info.tied_embeddings == bool(getattr(config, "tie_word_embeddings", False))
