"""Each vocabulary entry's raw bytes and the special tokens, read off a Hugging Face tokenizer:
what a run stores (``vocab/bytes``, ``vocab/special``) so that it shows byte-level pieces as
their bytes and special tokens by name without the tokenizer (docs/store.md).

- byte-level BPE (GPT-2, SmolLM2, Llama 3, the tiny models): the token's characters mapped back
  through GPT-2's byte-to-character table (``Ġ`` is the byte 20, ``ä½`` the bytes E4 BD);
- SentencePiece byte fallback (Gemma, Llama 2): ``<0xE4>`` is the byte E4;
- a special token: its name (``<|im_start|>``, ``[CLS]``), whatever it decodes to;
- anything else (WordPiece, SentencePiece pieces, added tokens): the UTF-8 of the entry decoded
  on its own.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's table from the printable character standing for each byte back to the byte
    (``bytes_to_unicode`` inverted): printable Latin-1 bytes stand for themselves, the others for
    the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


@cache
def _to_latin1() -> dict[int, int]:
    """A ``str.translate`` table taking each character of GPT-2's table to the Latin-1 character
    of its byte, and every other Latin-1 character out of Latin-1 (so that encoding fails)."""
    table = {ord(c): b for c, b in byte_decoder().items()}
    for b in range(256):
        table.setdefault(b, 0xFFFF)
    return table


def _mentions_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_mentions_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_mentions_byte_level(v) for v in node)
    return False


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's tokens are written in GPT-2's byte-to-character table: a fast
    tokenizer with a ``ByteLevel`` decoder, or a slow one with a ``byte_decoder``."""
    if isinstance(getattr(tokenizer, "byte_decoder", None), dict):
        return True
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return False
    try:
        return _mentions_byte_level(json.loads(decoder.__getstate__()))
    except (AttributeError, TypeError, ValueError):
        return type(decoder).__name__ == "ByteLevel"


def special_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, ``[CLS]``, and added tokens marked
    special), sorted."""
    n = len(tokenizer)
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return sorted(i for i in ids if 0 <= i < n)


def vocab_bytes(tokenizer: Any, strings: list[str], special: list[int]) -> list[bytes]:
    """Each entry's raw bytes (see the module's docstring); ``strings`` are the entries decoded
    on their own, ``special`` the special tokens' ids."""
    n = len(strings)
    names = tokenizer.convert_ids_to_tokens(list(range(n)))
    to_latin1 = _to_latin1() if is_byte_level(tokenizer) else None
    added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    specials = set(special)
    out: list[bytes] = []
    for i, (name, s) in enumerate(zip(names, strings)):
        if name is not None and i in specials:
            out.append(name.encode("utf-8", "surrogatepass"))
            continue
        if name is not None and i not in added:
            if to_latin1 is not None:
                try:  # 49k SmolLM2 tokens in 0.02 s (a bytes() per character: 0.09 s)
                    out.append(name.translate(to_latin1).encode("latin-1"))
                    continue
                except UnicodeEncodeError:  # a character outside the table: not byte-encoded
                    pass
            elif (m := _BYTE_FALLBACK.fullmatch(name)) and s != name:
                out.append(bytes([int(m.group(1), 16)]))
                continue
        out.append(s.encode("utf-8", "surrogatepass"))
    return out
