"""Models: named sources (a registry plugins extend), loading through TransformerLens'
``TransformerBridge``, and a converted-weights cache for GGUF files.

Importing this package does not import torch; :func:`load_model` does.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from workbench.errors import ModelNotFound, ModelUnavailable, UserError
from workbench.models.registry import (
    BOS_POLICIES,
    BosPolicy,
    Family,
    LoadedParts,
    LoadRequest,
    ModelRegistry,
    ModelSource,
    Provenance,
)

if TYPE_CHECKING:
    from workbench.models.model import Model, ModelInfo

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "float16", "bfloat16")

__all__ = [
    "BOS_POLICIES",
    "DEFAULT_MODEL",
    "DTYPES",
    "BosPolicy",
    "Family",
    "LoadRequest",
    "LoadedParts",
    "Model",
    "ModelInfo",
    "ModelRegistry",
    "ModelSource",
    "Provenance",
    "load_model",
    "resolve_device",
]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in ("Model", "ModelInfo"):
        from workbench.models import model

        return getattr(model, name)
    raise AttributeError(name)


def resolve_device(device: str | None) -> str:
    """``auto`` (or ``None``) means CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = "auto",
    dtype: str = "float32",
    bos: BosPolicy | None = None,
    progress: bool = True,
    registry: ModelRegistry | None = None,
) -> Model:
    """Load a model by registered name (``workbench models`` lists them), Hugging Face id
    (``ORG/NAME`` or ``hf:NAME``), local model folder or ``.gguf`` file.

    :param device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``, ...
    :param dtype: weights dtype: ``float32`` (default; GGUF weights are de-quantised to it),
        ``float16`` or ``bfloat16``.
    :param bos: how prompts are tokenized (:data:`BOS_POLICIES`); the source's default if None.
    :param progress: show progress of long steps (the first GGUF conversion) on stderr.
    :param registry: the names to resolve against; default: the sources that ship with workbench
        only. ``workbench.load_model`` (:func:`workbench.registries.load_model`) passes the
        registry of every plugin's models.
    :raises UserError: unknown name (with close matches), unavailable source, bad option.
    """
    from workbench.models import sources

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if bos is not None and bos not in BOS_POLICIES:
        raise UserError(f"unknown BOS policy {bos!r}; choose one of {', '.join(BOS_POLICIES)}")
    if registry is None:
        try:
            source = sources.resolve(name, sources.builtin_registry())
        except ModelNotFound as exc:
            raise ModelNotFound(f"{exc}; workbench.models.load_model without a registry knows the "
                                "built-in models only: workbench.load_model knows every plugin's") from None
    else:
        source = sources.resolve(name, registry)
    problem = source.availability()
    if problem:
        raise ModelUnavailable(f"model {source.name} is not available here: {problem}")

    device = resolve_device(device)
    start = time.monotonic()
    with _quiet_transformers():
        model = _boot(source, name, device, dtype, bos, progress)
    if progress and time.monotonic() - start > 5:
        print(f"workbench: loaded {source.name} in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load progress bars ("Loading weights"); the one long step, the
    first GGUF conversion, turns its own bar back on."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _boot(source: ModelSource, name: str, device: str, dtype: str, bos: BosPolicy | None,
          progress: bool) -> Model:
    import torch

    from workbench.models.model import Model

    parts = source.load(LoadRequest(name=name, device=device, progress=progress))
    torch_dtype = getattr(torch, dtype)
    if parts.bridge is None:
        from transformer_lens.model_bridge import TransformerBridge

        hf_model = parts.hf_model.to(device=device, dtype=torch_dtype).eval()
        bridge = TransformerBridge.boot_transformers(
            parts.tokenizer_path or source.name,
            hf_model=hf_model,
            # TransformerLens' setup_tokenizer mutates the tokenizer it is given (it invents
            # BOS/EOS/pad tokens, even adding them to the vocabulary, for tokenizers without
            # them): give it a copy so ours stays exactly the model's.
            tokenizer=copy.deepcopy(parts.tokenizer),
            device=device,
            dtype=torch_dtype,
        )
        tokenizer = parts.tokenizer
    else:
        bridge = parts.bridge
        if torch_dtype != torch.float32:
            bridge.original_model.to(dtype=torch_dtype)
        # TransformerLens re-reads the tokenizer with add_bos_token=True; our own tokenization
        # must follow the model's tokenizer as published, so read that one.
        tokenizer = _original_tokenizer(parts, bridge)
    bridge.eval()
    return Model(
        source=source,
        bridge=bridge,
        tokenizer=tokenizer,
        provenance=parts.provenance,
        bos=bos or source.default_bos,
        device=device,
    )


def _original_tokenizer(parts: LoadedParts, bridge: object):  # type: ignore[no-untyped-def]
    if parts.tokenizer is not None:
        return parts.tokenizer
    if parts.tokenizer_path:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(parts.tokenizer_path)
        except (OSError, ValueError):
            pass
    return bridge.tokenizer  # type: ignore[attr-defined]
