"""Incremental decoding through the TransformerBridge: a key-value cache that works.

The bridge's attention components extend Hugging Face's cache in ``_update_kv_cache``, which
reads it from the keyword ``past_key_values``. Since transformers 5 a decoder layer hands the
cache to its attention module as ``cache=`` instead, so the bridge never sees it: each decoding
step attends to its new token alone, and generation ignores the prompt (TransformerLens 4.x with
transformers 5.24: ``bridge.generate(use_past_kv_cache=True)`` on SmolLM2 continues "..., John
gave a drink to" with "Mary, , , , , ,"). :func:`install` adds a forward pre-hook to each
attention component that passes the cache under the name the bridge reads, inside
:func:`passing` only: incremental decoding (``workbench.capturing.sampling``) turns it on; every
other forward pass is left exactly as the bridge runs it (an ordinary pass, where transformers
also hands a fresh cache down, would otherwise start filling it, and a replay of recorded block
inputs, as the intervention engine does, would extend a cache already full). With it, cached
decoding equals recomputing the whole sequence to 4e-5 on SmolLM2's logits (1.5e-7 on the tiny
models); ``tests/test_generation.py`` checks the tokens.

Written here because neither library has the fix in the versions this project pins; it is a
no-op for a component that already receives ``past_key_values`` or gets no cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["install", "passing"]

_state = threading.local()


@contextmanager
def passing() -> Iterator[None]:
    """Within this block (on this thread), the bridge's attention sees the cache it is handed."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def _pass_cache(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if getattr(_state, "on", False) and kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


def install(bridge: Any) -> int:
    """Add the pre-hook to every attention component of ``bridge`` that extends the cache
    itself (``_update_kv_cache``); returns how many. Idempotent."""
    n = 0
    for module in bridge.modules():
        if hasattr(module, "_update_kv_cache") and not getattr(module, "_workbench_cache_hook", False):
            module.register_forward_pre_hook(_pass_cache, with_kwargs=True)
            module._workbench_cache_hook = True
            n += 1
    return n
