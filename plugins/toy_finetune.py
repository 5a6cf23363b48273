"""``toy-induction-ft``: ``toy-induction`` fine-tuned on a narrow rule, for seeing what a fine-tune
changes (the ``diff`` analysis between the two).

The rule: *after the letter ``a`` comes ``z``*. ``examples/finetune_toy.py`` continues training
the shipped ``toy-induction`` for a few hundred steps on its usual data (48 random letters with a
repeated segment) in which every ``a`` is followed by ``z``, so the fine-tune must change the
prediction after ``a`` while keeping the induction circuit for everything else. Same architecture,
config and tokenizer as ``toy-induction`` (read from ``toys/induction/``); only the weights
differ, in ``toys/induction_ft/model.safetensors``, with ``training.json`` (the seed, the steps,
the base weights' hash, and the figures before and after: ``p(z|a)`` and the loss on the usual
repeated-sequence data).

:func:`boot` loads any weights of that architecture (a test builds a variant that differs from the
base in the unembedding bias only). Registered through the ``workbench`` entry-point group like
any third-party plugin.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from workbench import hookimpl
from workbench.errors import UserError
from workbench.models import LoadedParts, LoadRequest, ModelSource, Provenance

TOYS = Path(__file__).parent / "toys"
BASE = TOYS / "induction"
"""``toy-induction``: the architecture (``config.json``), the tokenizer and the base weights."""
FINETUNE = TOYS / "induction_ft"
"""``toy-induction-ft``: ``model.safetensors`` and ``training.json``."""
NAME = "toy-induction-ft"
RULE = ("a", "z")
"""The fine-tune's rule: after ``RULE[0]`` comes ``RULE[1]``."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_info() -> dict[str, object]:
    """``toys/induction_ft/training.json`` (empty when missing)."""
    path = FINETUNE / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def boot(request: LoadRequest, weights: Path, provenance: Provenance) -> LoadedParts:
    """The ``toy-induction`` architecture (``toys/induction/config.json`` and tokenizer) with the
    weights of ``weights`` (a safetensors file of the native model, as the training scripts save)."""
    import safetensors.torch
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    if not (BASE / "config.json").is_file():
        raise UserError(f"the toy-induction config is missing from {BASE} (retrain with "
                        "examples/train_toy_induction.py)")
    if not weights.is_file():
        raise UserError(f"no weights at {weights}")
    cfg = TransformerBridgeConfig.from_dict(json.loads((BASE / "config.json").read_text()))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(BASE))
    bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer)  # type: ignore[attr-defined]
    safetensors.torch.load_model(bridge.original_model, str(weights))
    bridge.eval()
    if request.device != "cpu":
        bridge.to(request.device)
    return LoadedParts(bridge=bridge, tokenizer=tokenizer, tokenizer_path=str(BASE), provenance=provenance)


def provenance() -> Provenance:
    meta = training_info()
    base = str(meta.get("base_sha256", "?"))[:12]
    return Provenance(
        source="package", location="workbench_plugins/toys/induction_ft",
        sha256=sha256(FINETUNE / "model.safetensors"), seed=meta.get("seed"),  # type: ignore[arg-type]
        converted=f"fine-tuned from toy-induction (sha256 {base}...) by examples/finetune_toy.py "
                  f"({meta.get('summary', 'fine-tune')})")


def load_finetune(request: LoadRequest) -> LoadedParts:
    if not (FINETUNE / "model.safetensors").is_file():
        raise UserError(f"the {NAME} weights are missing from {FINETUNE} (fine-tune again with "
                        f"examples/finetune_toy.py --out {FINETUNE})")
    return boot(request, FINETUNE / "model.safetensors", provenance())


def _available() -> str | None:
    for path in (FINETUNE / "model.safetensors", BASE / "config.json", BASE / "tokenizer.json"):
        if not path.is_file():
            return f"{path} missing"
    return None


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    register(ModelSource(
        name=NAME, family="decoder", load=load_finetune, check=_available, default_bos="tokenizer",
        description=f"toy-induction fine-tuned so that after '{RULE[0]}' comes '{RULE[1]}' (it keeps "
                    "induction elsewhere); prompts: letters separated by spaces",
        origin="fine-tuned toy (examples/finetune_toy.py)",
    ))
