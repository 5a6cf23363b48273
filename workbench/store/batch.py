"""What a capture hands the run writer: one batch of prompts (:class:`BatchRecord`), and the
per-token datasets a run has besides tokens and activations (:class:`TokenField`).

Numpy only (the run store's layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TokenField:
    """A per-token dataset ``<stream>/<name>`` of shape ``(tokens,)`` or ``(tokens, width)``."""

    stream: str
    name: str
    dtype: str
    width: int = 0

    @property
    def path(self) -> str:
        return f"{self.stream}/{self.name}"


@dataclass
class BatchRecord:
    """Everything stored for one batch of prompts, already on the CPU in storage dtype."""

    prompt_ids: list[str]
    texts: list[str]
    metas: list[str]
    """Per-prompt metadata as JSON text."""
    tokens: dict[str, list[np.ndarray]]
    """Per stream, the token ids of each prompt."""
    str_tokens: dict[str, list[list[str]]]
    n_input: list[int]
    """Per prompt, how many tokens came from the prompt (the rest were generated)."""
    acts: dict[str, np.ndarray] = field(default_factory=dict)
    """Per stored hook: token layout ``(batch_tokens, *feature_shape)``; square layout flat."""
    square_sizes: dict[str, list[int]] = field(default_factory=dict)
    """Per square hook: number of elements for each prompt of the batch."""
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    """Per :class:`TokenField` path, values for every token of the batch."""

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for ids in self.tokens.values() for t in ids))

    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.acts.values())
                + sum(a.nbytes for a in self.fields.values())
                + sum(t.nbytes for ids in self.tokens.values() for t in ids))

    @classmethod
    def merge(cls, records: list[BatchRecord]) -> BatchRecord:
        """The consecutive batches ``records`` as one (committed together). Their activations
        must have been written already: ``acts`` are not merged."""
        if any(r.acts for r in records):
            raise ValueError("merge records whose activations are written, not held")
        if len(records) == 1:
            return records[0]
        first = records[0]
        return cls(
            prompt_ids=[x for r in records for x in r.prompt_ids],
            texts=[x for r in records for x in r.texts],
            metas=[x for r in records for x in r.metas],
            tokens={s: [x for r in records for x in r.tokens[s]] for s in first.tokens},
            str_tokens={s: [x for r in records for x in r.str_tokens[s]] for s in first.str_tokens},
            n_input=[x for r in records for x in r.n_input],
            square_sizes={h: [x for r in records for x in r.square_sizes[h]] for h in first.square_sizes},
            fields={f: np.concatenate([r.fields[f] for r in records]) for f in first.fields},
        )
