"""A run's vocabulary and how its tokens are shown (:class:`VocabReads`, the part of
:class:`workbench.store.reader.Run` about the stored tokenizer vocabulary).

A mixin, like :mod:`workbench.store.hook_reads`: it reads through the host's checked accessors
(``_ds``, ``_read``, ``_complete``, ``tokens``, ``str_tokens``), which apply the damage checks of
:mod:`workbench.store.guard`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from workbench.store import guard
from workbench.store import schema as S
from workbench.store.tokens_display import DisplayToken, TokenTable, show_tokens


class VocabReads:
    """The stored vocabulary; mixed into :class:`~workbench.store.reader.Run`."""

    path: Path
    _vocab: tuple[np.ndarray, bytes] | None
    _ds: Any
    _read: Any
    _complete: Any
    tokens: Any
    str_tokens: Any

    @property
    def has_vocab(self) -> bool:
        """Whether the run stores its tokenizer's vocabulary (runs captured since 0.1.0 do)."""
        return self._complete(S.VOCAB, S.VOCAB_OFFSETS)

    def token_strings(self, ids: Any) -> list[str]:
        """Token ids as text, each decoded on its own like :meth:`str_tokens`, from the run's
        stored vocabulary (no tokenizer needed); ``#ID`` for an id the run cannot name."""
        if self._vocab is None:
            if not self.has_vocab:
                self._vocab = (np.zeros(1, np.int64), b"")
            else:
                blob = self._read(S.VOCAB, 0, self._ds(S.VOCAB).shape[0]).tobytes()
                n = self._ds(S.VOCAB_OFFSETS).shape[0]
                self._vocab = (guard.offsets(self.path, S.VOCAB_OFFSETS, self._read(S.VOCAB_OFFSETS, 0, n),
                                             n, len(blob)), blob)
        offsets, blob = self._vocab
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if 0 <= i < len(offsets) - 1:
                out.append(guard.text(self.path, S.VOCAB, blob[offsets[i] : offsets[i + 1]]))
            else:
                out.append(f"#{i}")
        return out

    @cached_property
    def token_table(self) -> TokenTable | None:
        """Each vocabulary entry's raw bytes and the special tokens (``vocab/bytes``), which
        :meth:`display_tokens` shows tokens with; ``None`` for a run written before they were."""
        if not self._complete(S.VOCAB_BYTES, S.VOCAB_BYTES_OFFSETS, S.VOCAB_SPECIAL):
            return None
        blob = self._read(S.VOCAB_BYTES, 0, self._ds(S.VOCAB_BYTES).shape[0]).tobytes()
        n = self._ds(S.VOCAB_BYTES_OFFSETS).shape[0]
        offsets = guard.offsets(self.path, S.VOCAB_BYTES_OFFSETS, self._read(S.VOCAB_BYTES_OFFSETS, 0, n), n, len(blob))
        special = self._read(S.VOCAB_SPECIAL, 0, self._ds(S.VOCAB_SPECIAL).shape[0], "iu").tolist()
        return TokenTable(blob, offsets, special)

    def display_tokens(self, i: int, stream: str = S.MAIN) -> list[DisplayToken]:
        """Prompt ``i``'s tokens as the UI and the command line show them: byte-level pieces as
        their bytes (``<E4><BD>``) with the characters they form, special tokens by name, the
        rest as :meth:`str_tokens` (:mod:`workbench.store.tokens_display`)."""
        return show_tokens(self.tokens(i, stream), self.str_tokens(i, stream), self.token_table)

    def display_ids(self, ids: Any) -> list[DisplayToken]:
        """Vocabulary ids (predictions) shown each on its own, like :meth:`display_tokens`."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return show_tokens(ids, self.token_strings(ids), self.token_table, sequence=False)
