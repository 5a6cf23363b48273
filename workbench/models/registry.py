"""Named model sources and the registry that holds them by name and alias.

The registry is filled from the ``register_models`` plugin hook by :mod:`workbench.registries`
(above the plugin manager); how a name that is no registered one (a hub id, a folder, a ``.gguf``)
becomes a source is :func:`workbench.models.sources.resolve`'s job.

Nothing here imports torch or transformers: listing and resolving models must stay instant.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from workbench.errors import UserError

Family = Literal["decoder", "encoder", "encoder-decoder"]
BosPolicy = Literal["tokenizer", "prepend", "none"]
BOS_POLICIES: tuple[str, ...] = ("tokenizer", "prepend", "none")
BOS_POLICY_HELP = (
    "tokenizer: add exactly the special tokens the model's own tokenizer adds; "
    "prepend: put the BOS token first (TransformerLens' habit); "
    "none: no special tokens at all"
)


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from: enough to reload the same weights and to tell when a
    reload would give different ones."""

    source: str
    """What kind of source: ``package``, ``hub``, ``directory``, ``gguf``, ``tiny``."""
    location: str
    """A hub id, a path, or a package name with version."""
    sha256: str | None = None
    """SHA-256 of the original weights file (the GGUF, or the safetensors of a directory)."""
    quantization: str | None = None
    """Quantisation of the original file, e.g. ``GGUF Q4_1``; ``None`` for full-precision weights."""
    revision: str | None = None
    """Hub commit or package version."""
    converted: str | None = None
    """How the weights were converted before use (e.g. de-quantised to float32), if at all."""
    seed: int | None = None
    """Seed of a randomly initialised model."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadRequest:
    """What the caller asked of a load; passed to :attr:`ModelSource.load`."""

    name: str
    device: str = "cpu"
    progress: bool = True


@dataclass
class LoadedParts:
    """What a source's loader returns. Either ``hf_model`` + ``tokenizer`` (the core boots the
    TransformerBridge around them), or an already booted ``bridge``."""

    provenance: Provenance
    hf_model: Any = None
    tokenizer: Any = None
    bridge: Any = None
    tokenizer_path: str | None = None
    """A folder TransformerLens can re-read the tokenizer from (it reloads it with BOS settings)."""


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class ModelSource:
    """A named model a user can load. Plugins register these through ``register_models``."""

    name: str
    description: str
    family: Family
    load: Callable[[LoadRequest], LoadedParts]
    """Loads the weights. Import heavy libraries inside, not at module level."""
    check: Callable[[], str | None] = _always_available
    """Cheap availability check: ``None`` when loadable here, else one line saying why not and how
    to fix it. Must not import torch."""
    aliases: tuple[str, ...] = ()
    default_bos: BosPolicy = "tokenizer"
    has_lm_head: bool = True
    """False when the checkpoint carries no trained language-model head (its logits are noise)."""
    origin: str = ""
    """Where the weights come from, in a few words (shown by ``workbench models``)."""
    is_cached: Callable[[], bool] | None = None
    """Whether converted weights are already in the cache (for listings); ``None`` if not cached."""
    plugin: str = field(default="", compare=False)
    """Name of the plugin that registered this source (filled in by the registry)."""

    def availability(self) -> str | None:
        try:
            return self.check()
        except Exception as exc:  # noqa: BLE001 - a broken check reports, never crashes a listing
            return f"availability check failed: {type(exc).__name__}: {exc}"


# Sources that are not registered names but patterns (shown by ``workbench models``).
GENERIC_SOURCES: tuple[tuple[str, str], ...] = (
    ("ORG/NAME or hf:NAME", "any Hugging Face model id TransformerLens supports (hub or local HF cache)"),
    ("DIR", "a local folder with config.json, weights and tokenizer (save_pretrained layout)"),
    ("FILE.gguf", "a local GGUF file, de-quantised to float32 and cached"),
)


class ModelRegistry:
    """All registered model sources, by name and alias."""

    def __init__(self) -> None:
        self._sources: dict[str, ModelSource] = {}
        self._names: dict[str, str] = {}  # name or alias -> canonical name

    def add(self, source: ModelSource) -> None:
        for key in (source.name, *source.aliases):
            if key in self._names:
                other = self._sources[self._names[key]]
                raise UserError(
                    f"model name {key!r} is registered twice: by plugin {other.plugin!r} "
                    f"and by plugin {source.plugin!r}"
                )
        self._sources[source.name] = source
        for key in (source.name, *source.aliases):
            self._names[key] = source.name

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._sources.values())

    def __len__(self) -> int:
        return len(self._sources)

    def get(self, name: str) -> ModelSource | None:
        canonical = self._names.get(name)
        return self._sources[canonical] if canonical else None

    def names(self) -> list[str]:
        return list(self._names)

    def close_matches(self, name: str, n: int = 3) -> list[str]:
        """Canonical names (not aliases) close to ``name``, best first."""
        close: list[str] = []
        for match in difflib.get_close_matches(name, self.names(), n=6, cutoff=0.6):
            if self._names[match] not in close:
                close.append(self._names[match])
        return close[:n]
