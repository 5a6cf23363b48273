"""The run file's layout: names, versions and value encodings shared by the writer and the reader.

Nothing here imports torch. See ``docs/store.md`` for the format as users and other tools see it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA = "workbench-run"
SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"

# Root attributes.
ATTR_SCHEMA = "schema"
ATTR_VERSION = "schema_version"
ATTR_TOOL = "workbench_version"
ATTR_CREATED = "created"
ATTR_PLANNED = "planned_prompts"

# JSON documents, stored as fixed-length UTF-8 string datasets under /meta (attributes must stay
# under 64 KiB; the alias map of a real model does not).
META_MODEL = "meta/model"
META_SETTINGS = "meta/settings"
META_HOOKS = "meta/hooks"

# Per-prompt and per-token datasets. Every ragged field is (data, offsets) with offsets[0] = 0.
TOKEN_OFFSETS = "prompts/token_offsets"  # (n + 1,) -- the commit marker readers trust
PROMPT_TEXT = "prompts/text"
PROMPT_ID = "prompts/id"
PROMPT_META = "prompts/meta"
N_INPUT = "prompts/n_input_tokens"  # (n,) tokens that came from the prompt (the rest generated)
ACTS = "acts"
ACTS_OFFSETS = "acts_offsets"

# Token streams. Every model has "tokens" (a decoder's or encoder's input; an encoder-decoder's
# encoder input); encoder-decoders also have "dec_tokens" (the decoder's input).
MAIN = "tokens"
DEC = "dec_tokens"
STREAMS = (MAIN, DEC)


def offsets_name(data_name: str) -> str:
    """The offsets dataset of a ragged byte field (``prompts/text`` -> ``prompts/text_offsets``)."""
    return f"{data_name}_offsets"


def stream_offsets(stream: str) -> str:
    """Per-prompt token offsets of a stream; the main stream's are the commit marker."""
    return TOKEN_OFFSETS if stream == MAIN else f"prompts/{stream}_offsets"


def ids_name(stream: str) -> str:
    return f"{stream}/ids"


def str_name(stream: str) -> str:
    return f"{stream}/str"


# Language-model outputs live on the stream the LM head reads (dec_tokens for encoder-decoders).
LOSS, TOPK_IDS, TOPK_LOGPROBS, TARGET = "loss", "topk_ids", "topk_logprobs", "target"
# Generation: per token, NaN where the token came from the prompt.
GEN_FIELDS = ("sample_prob", "sample_entropy", "model_prob", "model_entropy")

# The tokenizer's vocabulary, each id decoded on its own (as the token strings are): lets a reader
# name predicted tokens without the tokenizer. Optional (runs written before it lack it).
VOCAB = "vocab/str"
VOCAB_OFFSETS = "vocab/str_offsets"
# Each entry's raw bytes (a byte-level piece's bytes, a special token's name) and the special
# tokens' ids: how tokens are shown (workbench/store/tokens_display.py). Optional likewise.
VOCAB_BYTES = "vocab/bytes"
VOCAB_BYTES_OFFSETS = "vocab/bytes_offsets"
VOCAB_SPECIAL = "vocab/special"

RAGGED_BYTES = (PROMPT_TEXT, PROMPT_ID, PROMPT_META)  # one entry per prompt
TOKEN_IDS = ids_name(MAIN)
TOKEN_STR = str_name(MAIN)
TOKEN_STR_OFFSETS = offsets_name(TOKEN_STR)
TOKEN_LOSS = f"{MAIN}/{LOSS}"

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# Relative tolerance of a stored value against the model's float32 value (round to nearest).
DTYPE_TOLERANCE = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class HookSpec:
    """One stored tensor. ``name`` is the dataset under ``/acts``; ``aliases`` are the other hook
    names that give the same tensor."""

    name: str
    layout: str
    """``token``: per-token rows ``(tokens, *feature_shape)``; ``square``: one flat block per prompt
    of shape ``(feature_shape[0], q, k)`` (attention patterns and scores)."""
    feature_shape: tuple[int, ...]
    axes: tuple[str, ...]
    """Names of the per-prompt array's axes, e.g. ``("pos", "d_model")`` or
    ``("head", "query_pos", "key_pos")``."""
    kind: str = "float"
    """``float`` (stored in the run's dtype) or ``int`` (stored as int64)."""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    streams: tuple[str, ...] = ()
    """Token stream of each positional axis: ``("tokens",)`` for a token layout, ``(query, key)``
    for a square one (``("dec_tokens", "tokens")`` for cross-attention). Empty means the main
    stream throughout."""

    def stream_of_rows(self) -> str:
        return self.streams[0] if self.streams else MAIN

    def square_streams(self) -> tuple[str, str]:
        return (self.streams[0], self.streams[1]) if len(self.streams) == 2 else (MAIN, MAIN)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_shape"] = list(self.feature_shape)
        d["axes"] = list(self.axes)
        d["aliases"] = list(self.aliases)
        d["streams"] = list(self.streams)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HookSpec:
        return cls(
            name=str(d["name"]),
            layout=str(d["layout"]),
            feature_shape=tuple(int(x) for x in d["feature_shape"]),
            axes=tuple(str(x) for x in d["axes"]),
            kind=str(d.get("kind", "float")),
            aliases=tuple(str(x) for x in d.get("aliases", ())),
            streams=tuple(str(x) for x in d.get("streams", ())),
        )

    def row_elements(self) -> int:
        return math.prod(self.feature_shape)  # Python ints: no int64 wrap-around for a hostile shape

    def bytes_for(self, lengths: dict[str, int], itemsize: int) -> int:
        """Stored bytes for one prompt whose streams have these token counts."""
        if self.layout == "square":
            q, k = self.square_streams()
            return self.feature_shape[0] * lengths[q] * lengths[k] * itemsize
        return lengths[self.stream_of_rows()] * self.row_elements() * itemsize

    def elements_for(self, lengths: dict[str, int]) -> int:
        return self.bytes_for(lengths, 1)


def storage_numpy_dtype(storage: str, kind: str = "float") -> np.dtype:
    if kind == "int":
        return np.dtype(np.int64)
    if storage == "bfloat16":
        return np.dtype(np.uint16)  # raw bfloat16 bits; HDF5 has no bfloat16 type
    return np.dtype(storage)


def decode_values(array: np.ndarray, encoding: str | None) -> np.ndarray:
    """Stored values as numbers: raw bfloat16 bits become float32 (exactly: every bfloat16 is a
    float32 with the low 16 bits zero)."""
    if encoding == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=True)


def default_prompt_id(index: int) -> str:
    """The id of prompt ``index`` when none is given: ``p0``, ``p1``, ... (the one place it is
    made: capture's prompts, the command line, synthetic runs)."""
    return f"p{index}"
