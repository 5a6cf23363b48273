"""What TransformerLens hook names mean: presets, globs, attention patterns, depth order, layers.

One module interprets hook names for every layer above it — capture (which tensors to record),
analyses (what a run holds), the terminal UI and ``workbench plot`` (what to draw, in which order)
— so that "is this an attention pattern?" or "which residual point comes first?" has one answer.
It works on names only: no model, no run, no torch, no h5py.

Patterns use TransformerLens hook names. ``*`` matches within one dot-separated segment
(``blocks.*.hook_resid_post``), ``**`` matches across segments (``**.hook_pattern``), ``?`` one
character. A leading ``*`` in a preset (``*blocks.*``) also matches ``encoder_blocks`` and
``decoder_blocks`` of an encoder–decoder.
"""

from __future__ import annotations

import functools
import re

PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "residual": (
        "the residual stream: embeddings and every block's resid_pre, resid_mid, resid_post",
        ("hook_embed", "hook_pos_embed", "*blocks.*.hook_resid_pre", "*blocks.*.hook_resid_mid",
         "*blocks.*.hook_resid_post"),
    ),
    "attention": (
        "attention patterns (heads x query x key per prompt)",
        ("*blocks.*.*attn.hook_pattern",),
    ),
    "attention-full": (
        ("queries, keys (also after the rotary embedding, where the model rotates), values, "
         "scores, patterns, per-head outputs (z) and attention outputs"),
        ("*blocks.*.*attn.hook_q", "*blocks.*.*attn.hook_k", "*blocks.*.*attn.hook_rot_q",
         "*blocks.*.*attn.hook_rot_k", "*blocks.*.*attn.hook_v",
         "*blocks.*.*attn.hook_attn_scores", "*blocks.*.*attn.hook_pattern",
         "*blocks.*.*attn.hook_z", "*blocks.*.hook_attn_out"),
    ),
    "mlp": (
        "MLP inputs to the nonlinearity, its outputs, and the MLP's output to the residual stream",
        ("*blocks.*.mlp.hook_pre", "*blocks.*.mlp.hook_post", "*blocks.*.hook_mlp_out"),
    ),
    "lens": (
        ("what direct logit attribution and the neuron analysis read: residual stream (pre, "
         "mid, post), per-head z, sublayer outputs, final-norm and post-norm scales"),
        ("hook_embed", "hook_pos_embed", "*blocks.*.hook_resid_pre", "*blocks.*.hook_resid_mid",
         "*blocks.*.hook_resid_post", "*blocks.*.*attn.hook_z", "*blocks.*.hook_attn_out",
         "*blocks.*.hook_mlp_out", "*ln_final.hook_scale", "*blocks.*.ln1_post.hook_scale",
         "*blocks.*.ln2_post.hook_scale"),
    ),
    "all": (
        "every distinct tensor with a per-prompt layout that fires without changing the model",
        ("**",),
    ),
}
"""Named groups of hook patterns: ``name -> (description, patterns)``."""

EMBED_HOOKS = ("hook_embed", "embed.hook_out")
"""Names the token embedding is stored under (TransformerLens' and the bridge's)."""

_RESID_SUBLAYER = {"hook_resid_pre": 0, "hook_resid_mid": 1, "hook_resid_post": 2}
_RESID_RE = re.compile(r"(?:encoder_)?blocks\.(\d+)\.(hook_resid_(?:pre|mid|post))")
_LAYER_RE = re.compile(r"(?:^|\.|_)blocks\.(\d+)\.")
_INDEX_RE = re.compile(r"(^|\.)(\d+)(?=\.)")


@functools.lru_cache(maxsize=256)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """``*`` within one dot-separated segment, ``**`` across segments, ``?`` one character."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` has a wildcard (``*`` or ``?``)."""
    return any(c in pattern for c in "*?")


def preset_patterns(name: str) -> tuple[str, ...] | None:
    """The patterns of preset ``name``, or ``None`` when it is no preset."""
    found = PRESETS.get(name)
    return found[1] if found else None


def matches(pattern: str, name: str) -> bool:
    """Whether hook ``name`` matches glob ``pattern``."""
    return glob_to_regex(pattern).match(name) is not None


def collapse_layers(name: str) -> str:
    """A hook name with its layer indices as ``*``: ``blocks.3.attn.hook_q`` ->
    ``blocks.*.attn.hook_q`` (listings group the layers of one hook this way)."""
    return _INDEX_RE.sub(r"\1*", name)


def layer_of(name: str) -> int | None:
    """The block index in a hook name (``blocks.3.attn.hook_pattern`` -> 3), else ``None``."""
    m = _LAYER_RE.search(name if name.startswith(".") else "." + name)
    return int(m.group(1)) if m else None


def part_of(name: str) -> str:
    """Which stack a hook belongs to: ``encoder`` (``encoder_blocks``), ``cross`` (a decoder's
    cross-attention), ``decoder`` (``decoder_blocks``) or ``""`` (a decoder-only or encoder-only
    model's ``blocks``, and hooks outside the blocks)."""
    if name.startswith("encoder_blocks") or name.startswith("encoder."):
        return "encoder"
    if name.startswith("decoder_blocks"):
        return "cross" if ".cross_attn." in name else "decoder"
    return ""


def is_attention_pattern(name: str) -> bool:
    """Whether a hook name is an attention pattern (post-softmax weights, ``hook_pattern``)."""
    return name.endswith("hook_pattern")


def depth_key(name: str) -> tuple[int, int, int, str]:
    """Sort key putting hooks in the order the forward pass reaches them: the encoder's layers,
    then the decoder's (self-attention before cross-attention in each layer), layer by layer;
    hooks outside the blocks (embeddings) first."""
    part = {"": 0, "encoder": 0, "decoder": 1, "cross": 1}[part_of(name)]
    layer = layer_of(name)
    sub = 1 if part_of(name) == "cross" else 0
    return (part, -1 if layer is None else layer, sub, name)


def residual_point(name: str) -> tuple[tuple[int, int], str] | None:
    """Where a hook sits on the residual stream: ``((layer, sublayer), label)`` for the embedding
    (``((-1, 0), "embed")``) and each block's ``resid_pre`` (0), ``resid_mid`` (1) and
    ``resid_post`` (2) (``((3, 2), "L3:post")``); ``None`` for any other hook."""
    if name in EMBED_HOOKS:
        return (-1, 0), "embed"
    m = _RESID_RE.fullmatch(name)
    if not m:
        return None
    layer, hook = int(m.group(1)), m.group(2)
    return (layer, _RESID_SUBLAYER[hook]), f"L{layer}:{hook[len('hook_resid_'):]}"


def resid_post(layer: int) -> str:
    """The residual stream after block ``layer`` of a decoder-only or encoder-only model."""
    return f"blocks.{layer}.hook_resid_post"


def resid_pre(layer: int) -> str:
    """The residual stream entering block ``layer`` (``resid_pre(0)`` is the embedding)."""
    return f"blocks.{layer}.hook_resid_pre"
