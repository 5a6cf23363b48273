"""The typed run contract: the capture settings every run records, and how readers see them.

A run's ``meta/settings`` document is written from a :class:`RunSettings` by capture and by the
synthetic-run writer alike, and read back into one by :attr:`workbench.store.Run.capture_settings`,
so that no reader guesses from dictionaries (``settings.get("family") or
model_info.get("family")``). ``settings_version`` versions the document itself: a run written
before it existed reads as version 0, with the fields it lacks filled from ``model_info`` or
their defaults; a document newer than this reader understands is refused by the reader.

Numpy and the standard library only (the run store's layer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SETTINGS_VERSION = 1
"""Version of the settings document this code writes (and the newest it reads)."""


class NewerSettings(ValueError):
    """A settings document written by a newer workbench."""

FAMILIES = ("decoder", "encoder", "encoder-decoder")


@dataclass(frozen=True)
class RecordedModel:
    """The model a run was captured with: enough to reload the same weights."""

    name: str
    provenance: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"


@dataclass(frozen=True)
class RunSettings:
    """How a run was captured. Written once, when the run is created (``resumed`` grows by one
    record per ``--resume``)."""

    run_id: str
    """Identifies this capture (kept across ``--resume``); results beside the run record it."""
    model: RecordedModel
    family: str
    """``decoder``, ``encoder`` or ``encoder-decoder``."""
    hooks: list[dict[str, Any]] = field(default_factory=list)
    """The stored tensors (``HookSpec.to_dict()``), as planned."""
    hooks_requested: list[str] = field(default_factory=list)
    """What the user asked for: names, globs, presets."""
    model_hooks: list[str] | None = None
    """Every hook name of the model, so whether a run holds what an analysis needs can be decided
    without the model. ``None`` in runs from before it was recorded."""
    gated_hooks: list[str] = field(default_factory=list)
    """Hook names that fire only once a TransformerLens switch is turned on."""
    unstorable_hooks: list[str] = field(default_factory=list)
    """Requested names with no per-prompt layout (skipped)."""
    gates: list[str] = field(default_factory=list)
    """Switches turned on for this capture."""
    storage_dtype: str = "float32"
    compression: str | None = None
    top_k: int = 0
    """Predictions stored per position (0: no LM outputs)."""
    lm_target: str = "next"
    """What the loss and predictions at a position are about: ``next`` (the next token: decoders,
    and an encoder–decoder's decoder stream) or ``same`` (the token at that position: encoders)."""
    batch_size: int = 1
    bos: str | None = None
    """The BOS policy prompts were tokenized with; ``None`` in runs that did not record it (a
    reload then uses the model source's default)."""
    chat: dict[str, Any] | None = None
    """A chat capture (``--chat``): the chat template the prompts were laid out with, its
    SHA-256, and the tokenizer's special tokens; ``None`` for plain text."""
    truncate: bool = False
    generation: dict[str, Any] | None = None
    padding: str = ""
    numerics: str = ""
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    resumed: list[Any] = field(default_factory=list)
    settings_version: int = SETTINGS_VERSION

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")

    @property
    def model_name(self) -> str:
        return self.model.name

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored as ``meta/settings``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], model_info: dict[str, Any] | None = None) -> RunSettings:
        """Read a stored settings document (any version up to :data:`SETTINGS_VERSION`); fields
        an older run lacks come from ``model_info`` (family, model name) or their defaults.
        Unknown keys are ignored. Raises ``ValueError`` for a newer or malformed document."""
        info = model_info or {}
        version = int(doc.get("settings_version", 0))
        if version > SETTINGS_VERSION:
            raise NewerSettings(f"its settings are version {version}; this workbench reads up to "
                                f"{SETTINGS_VERSION} (upgrade workbench)")
        known = {f.name for f in fields(cls)}
        nullable = {"model_hooks", "compression", "generation", "chat"}
        values = {k: v for k, v in doc.items() if k in known and (v is not None or k in nullable)}
        recorded = doc.get("model") or {}
        values["model"] = RecordedModel(
            name=str(recorded.get("name") or info.get("name") or ""),
            provenance=dict(recorded.get("provenance") or info.get("provenance") or {}),
            dtype=str(recorded.get("dtype") or "float32"))
        values["family"] = str(doc.get("family") or info.get("family") or "decoder")
        values["run_id"] = str(doc.get("run_id") or "")
        values["settings_version"] = version
        return cls(**values)
