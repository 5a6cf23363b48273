"""Tokens as they are: how the command line, the terminal UI and the views show a token.

A byte-level tokenizer (GPT-2's BPE, SmolLM2, Llama 3, SentencePiece's byte fallback) splits a
character it has no token for into pieces of its UTF-8 bytes: SmolLM2 reads 你好 (E4 BD A0 E5
A5 BD) as the pieces E4 BD, A0, E5 A5 and BD, and 🍕 as F0 9F, 8D, 95. Decoded on its own (what
TransformerLens' ``to_str_tokens`` and :meth:`Run.str_tokens` give) every such piece is ``�``.
:func:`show_tokens` shows each token as a :class:`DisplayToken`:

- a piece whose bytes are not UTF-8 by themselves is shown as its bytes, ``<E4><BD>`` (any whole
  character inside it as text: `` <E4>`` is a space and the byte E4); its ``chars`` are the
  characters it forms with its neighbours (你 for E4 BD and for A0) and its ``span`` the
  positions of the pieces forming them: a readout names them (``<E4><BD> (part of 你, tokens
  0-1)``), while labels stay the bytes, so every piece is told apart;
- a special token (BOS, ``<|im_start|>``, ``[CLS]``) is shown by its name, whatever it decodes to;
- every other token as its decoded string, unchanged.

The bytes come from the run's ``vocab/bytes`` (written at capture from the tokenizer:
``workbench.models.token_bytes``), so a run shows its tokens without the tokenizer; a run
written without them shows the decoded strings as before. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.store import schema as S

if TYPE_CHECKING:
    from workbench.store.reader import Run

__all__ = ["DisplayToken", "TokenTable", "byte_groups", "bytes_label", "generated_text", "show_tokens"]


@dataclass(frozen=True)
class DisplayToken:
    """One token as shown. ``str(token)`` is its label."""

    label: str
    """What a grid, a strip or a table shows: the decoded text, the special token's name, or the
    bytes of a byte-level piece (``<E4><BD>``)."""
    kind: str = "text"
    """``text``, ``special`` or ``bytes``."""
    chars: str = ""
    """A byte piece's characters that it forms together with its neighbours ('' if none)."""
    span: tuple[int, int] | None = None
    """Positions ``[start, stop)`` of the pieces forming :attr:`chars`."""

    def __str__(self) -> str:
        return self.label

    def describe(self) -> str:
        """For a readout: a text token quoted (``' world'``), a special token's name with
        ``(special)``, a byte piece's bytes with the characters it is part of."""
        if self.kind == "special":
            return f"{self.label} (special)"
        if self.kind == "bytes":
            shown = self.label.replace(" ", "·")
            if not self.chars:
                return f"{shown} (bytes)"
            where = ""
            if self.span is not None:
                where = f", tokens {self.span[0]}-{self.span[1] - 1}"
            return f"{shown} (part of {self.chars}{where})"
        return repr(self.label)


def bytes_label(raw: bytes) -> str:
    """``raw`` as text where it is UTF-8, and each byte that is not as ``<XX>``:
    ``b" \\xe4\\xbd"`` is `` <E4><BD>``."""
    out: list[str] = []
    while raw:
        try:
            out.append(raw.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            out.append(raw[: e.start].decode("utf-8"))
            out.extend(f"<{x:02X}>" for x in raw[e.start : e.end])
            raw = raw[e.end :]
    return "".join(out)


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence a lead byte starts (1 for a byte that starts none)."""
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 1


class TokenTable:
    """Each vocabulary entry's raw bytes and which entries are special tokens."""

    def __init__(self, blob: bytes, offsets: Sequence[int], special: Iterable[int] = ()) -> None:
        self.blob = blob
        self.offsets = [int(x) for x in offsets]
        self.special = frozenset(int(i) for i in special)

    @classmethod
    def from_pieces(cls, pieces: Sequence[bytes], special: Iterable[int] = ()) -> TokenTable:
        ends = np.cumsum([0, *(len(p) for p in pieces)])
        return cls(b"".join(pieces), ends.tolist(), special)

    @classmethod
    def read(cls, f: Any) -> TokenTable | None:
        """The table stored in an open run file (``vocab/bytes``), or ``None`` for a run written
        without it."""
        if S.VOCAB_BYTES not in f:
            return None
        special = f[S.VOCAB_SPECIAL][:].tolist() if S.VOCAB_SPECIAL in f else ()
        return cls(f[S.VOCAB_BYTES][:].tobytes(), f[S.VOCAB_BYTES_OFFSETS][:], special)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def piece(self, i: int) -> bytes | None:
        """The bytes of vocabulary entry ``i`` (``None`` outside the vocabulary)."""
        if not 0 <= i < len(self.offsets) - 1:
            return None
        return self.blob[self.offsets[i] : self.offsets[i + 1]]

    def text(self, ids: Iterable[int]) -> str:
        """The tokens ``ids`` joined as text, their bytes decoded together (pieces joined into
        their characters; bytes that form none shown as ``<XX>``)."""
        return bytes_label(b"".join(self.piece(int(i)) or b"" for i in ids))


def show_tokens(ids: Iterable[int], strings: Sequence[str], table: TokenTable | None, *,
                sequence: bool = True) -> list[DisplayToken]:
    """Tokens ``ids`` (decoded on their own as ``strings``) as shown. ``sequence``: the tokens
    follow one another (a prompt), so consecutive byte pieces are joined into the characters
    they form; ``False`` for unrelated ids (a list of predictions). Without a table every token
    is shown as its string."""
    out: list[DisplayToken] = []
    pieces: list[bytes | None] = []
    for tid, s in zip((int(i) for i in ids), strings):
        raw = table.piece(tid) if table is not None else None
        if raw is None:
            out.append(DisplayToken(s))
            pieces.append(None)
        elif tid in table.special:  # type: ignore[union-attr]
            out.append(DisplayToken(bytes_label(raw) or s or f"#{tid}", "special"))
            pieces.append(None)
        else:
            try:
                raw.decode("utf-8")
                out.append(DisplayToken(s))
                pieces.append(None)
            except UnicodeDecodeError:
                out.append(DisplayToken(bytes_label(raw), "bytes"))
                pieces.append(raw)
    if sequence:
        _join_pieces(out, pieces)
    return out


def _join_pieces(out: list[DisplayToken], pieces: list[bytes | None]) -> None:
    """Give each byte piece of ``out`` the characters it forms with its neighbours (a run of
    consecutive pieces, since a token that is UTF-8 by itself starts and ends on a character
    boundary)."""
    p = 0
    while p < len(pieces):
        if pieces[p] is None:
            p += 1
            continue
        start = p
        while p < len(pieces) and pieces[p] is not None:
            p += 1
        blob = b"".join(pieces[start:p])  # type: ignore[arg-type]
        owner = [k for k in range(start, p) for _ in range(len(pieces[k]))]  # type: ignore[arg-type]
        chars: dict[int, list[tuple[str, int, int]]] = {}
        b = 0
        while b < len(blob):
            n = _utf8_length(blob[b])
            try:
                ch = blob[b : b + n].decode("utf-8")
            except UnicodeDecodeError:
                b += 1
                continue
            first, last = owner[b], owner[b + n - 1]
            if first != last:  # a character split over pieces
                for k in range(first, last + 1):
                    chars.setdefault(k, []).append((ch, first, last + 1))
            b += n
        for k, found in chars.items():
            out[k] = DisplayToken(out[k].label, "bytes", "".join(c for c, _, _ in found),
                                  (min(a for _, a, _ in found), max(z for _, _, z in found)))


def generated_text(run: Run, i: int) -> str:
    """The tokens prompt ``i`` of a generated run continued with (after its
    :meth:`~workbench.store.reader.Run.n_input_tokens`), as text: their bytes decoded together
    (``''`` when none were generated)."""
    stream = run.lm_stream
    ids = run.tokens(i, stream)[run.n_input_tokens(i):].tolist()
    if not ids:
        return ""
    table = run.token_table
    if table is None:  # a run written before the bytes were stored
        return "".join(run.str_tokens(i, stream)[run.n_input_tokens(i):])
    return table.text(ids)


def byte_groups(shown: Sequence[DisplayToken]) -> list[tuple[int, int]]:
    """Positions ``[start, stop)`` of each run of byte pieces that form characters together
    (overlapping :attr:`DisplayToken.span` merged), in order: what a legend names."""
    out: list[tuple[int, int]] = []
    for t in shown:
        if t.span is None:
            continue
        if out and t.span[0] < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], t.span[1]))
        elif not out or out[-1] != t.span:
            out.append(t.span)
    return out
