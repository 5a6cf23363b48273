"""Toy models with known mechanisms, trained by seeded scripts and shipped as small fixtures.

``toy-induction``
    A 2-layer attention-only decoder (TransformerLens' native architecture, learned positions,
    LayerNorm) trained on random letter sequences holding a repeated segment
    (``examples/train_toy_induction.py``): it predicts the repeat by an induction circuit, a
    previous-token head in layer 0 feeding an induction head in layer 1.
``toy-induction@STEP``
    The same training run saved at several steps (``--checkpoints`` of the training script, in
    ``toys/induction_ckpt/``): before, during and after the induction heads form, for training
    dynamics (``examples/training_dynamics.py``). Same architecture and tokenizer; each
    checkpoint's provenance names its step and the hash of its weights.
``toy-reversal``
    A small T5 encoder-decoder trained to reverse a sequence of letters
    (``examples/train_toy_reversal.py``): to write output token j of an input of n tokens its
    cross-attention must look at input position n - 1 - j.

Both read words separated by spaces from a 52-letter vocabulary (``a``-``z``, ``A``-``Z``) plus
``<pad>``, ``<bos>`` and ``<eos>``: prompts look like ``"q x b q x"``. The weights live in
``toys/<name>/`` beside this module (safetensors, config and tokenizer); the training scripts write
the same files, so a retrained model replaces the shipped one.

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench import hookimpl
from workbench.errors import UserError
from workbench.models import LoadedParts, LoadRequest, ModelSource, Provenance

TOYS = Path(__file__).parent / "toys"
CHECKPOINTS = TOYS / "induction_ckpt"
"""``toy-induction``'s training run at several steps: ``step-NNNNN.safetensors`` and
``checkpoints.json`` (each checkpoint's evaluation, the learning curve, the phase change)."""
SPECIALS = ("<pad>", "<bos>", "<eos>")
LETTERS = tuple(string.ascii_lowercase + string.ascii_uppercase)
VOCAB = {tok: i for i, tok in enumerate((*SPECIALS, *LETTERS))}
FIRST_LETTER = len(SPECIALS)
"""Token id of ``a``; ids ``FIRST_LETTER`` .. ``len(VOCAB) - 1`` are the letters."""


def make_tokenizer(variant: str) -> Any:
    """A word-level tokenizer over :data:`VOCAB`. ``decoder``: prepends ``<bos>`` (as the
    toy decoder was trained); ``t5``: appends ``<eos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    kwargs: dict[str, Any] = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<pad>"}
    if variant == "decoder":
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", VOCAB["<bos>"])])
        kwargs["bos_token"] = "<bos>"
    elif variant == "t5":
        backend.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", VOCAB["<eos>"])])
    else:
        raise ValueError(variant)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **kwargs)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder(name: str) -> Path:
    folder = TOYS / name
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"the {name} weights are missing from {folder} (retrain with "
                        f"examples/train_toy_{name}.py --out {folder})")
    return folder


def _provenance(name: str, folder: Path) -> Provenance:
    meta = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
    return Provenance(source="package", location=f"workbench_plugins/toys/{name}",
                      sha256=_sha256(folder / "model.safetensors"), seed=meta.get("seed"),
                      converted=f"trained by examples/train_toy_{name}.py ({meta.get('summary', 'toy')})")


def _boot_induction(request: LoadRequest, weights: Path, provenance: Provenance) -> LoadedParts:
    """The toy decoder of ``toys/induction/config.json`` with ``weights`` (its tokenizer too)."""
    import safetensors.torch
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    folder = TOYS / "induction"
    cfg = TransformerBridgeConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer)  # type: ignore[attr-defined]
    safetensors.torch.load_model(bridge.original_model, str(weights))
    if request.device != "cpu":
        bridge.to(request.device)  # (TransformerLens prints "Moving model to device")
    return LoadedParts(bridge=bridge, tokenizer=tokenizer, tokenizer_path=str(folder), provenance=provenance)


def load_induction(request: LoadRequest) -> LoadedParts:
    folder = _folder("induction")
    return _boot_induction(request, folder / "model.safetensors", _provenance("induction", folder))


def checkpoint_steps() -> list[int]:
    """The training steps of the shipped ``toy-induction@STEP`` checkpoints."""
    return sorted(int(p.stem.split("-")[1]) for p in CHECKPOINTS.glob("step-*.safetensors"))


def checkpoint_info() -> dict[str, Any]:
    """``checkpoints.json``: the training run, each checkpoint's losses, the learning curve and
    where the phase change is (empty when the file is missing)."""
    path = CHECKPOINTS / "checkpoints.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_path(step: int) -> Path:
    return CHECKPOINTS / f"step-{step:05d}.safetensors"


def _checkpoint_loader(step: int) -> Callable[[LoadRequest], LoadedParts]:
    def load(request: LoadRequest) -> LoadedParts:
        path = checkpoint_path(step)
        if not path.is_file():
            raise UserError(f"the toy-induction checkpoint of step {step} is missing ({path}; retrain with "
                            f"examples/train_toy_induction.py --checkpoints {step})")
        meta = checkpoint_info()
        provenance = Provenance(
            source="package", location=f"workbench_plugins/toys/induction_ckpt/{path.name}",
            sha256=_sha256(path), seed=meta.get("seed"), revision=f"step {step}",
            converted=f"trained by examples/train_toy_induction.py: step {step} of {meta.get('steps', '?')} "
                      f"(seed {meta.get('seed')}, --checkpoints)")
        return _boot_induction(request, path, provenance)
    return load


def _checkpoint_available(step: int) -> Callable[[], str | None]:
    def check() -> str | None:
        path = checkpoint_path(step)
        return None if path.is_file() and (TOYS / "induction" / "config.json").is_file() else f"{path} missing"
    return check


def load_reversal(request: LoadRequest) -> LoadedParts:
    from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration

    folder = _folder("reversal")
    model = T5ForConditionalGeneration.from_pretrained(str(folder), attn_implementation="eager")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return LoadedParts(hf_model=model.eval(), tokenizer=tokenizer, tokenizer_path=str(folder),
                       provenance=_provenance("reversal", folder))


def _available(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if (TOYS / name / "model.safetensors").is_file() else f"weights missing from {TOYS / name}"
    return check


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    register(ModelSource(
        name="toy-induction", family="decoder", load=load_induction, check=_available("induction"),
        default_bos="tokenizer",
        description="2-layer attention-only decoder trained to continue repeated letter sequences "
                    "(an induction circuit); prompts: letters separated by spaces",
        origin="trained toy (examples/train_toy_induction.py)",
    ))
    curve = {c["step"]: c for c in checkpoint_info().get("curve", [])}
    for step in checkpoint_steps():
        loss = curve.get(step, {}).get("loss_second_copy")
        register(ModelSource(
            name=f"toy-induction@{step}", family="decoder", load=_checkpoint_loader(step),
            check=_checkpoint_available(step), default_bos="tokenizer",
            description=f"toy-induction after {step} training steps"
                        + (f" (loss on a repeated copy {loss:.2f} nats)" if loss is not None else ""),
            origin="checkpoint of examples/train_toy_induction.py --checkpoints",
        ))
    register(ModelSource(
        name="toy-reversal", family="encoder-decoder", load=load_reversal, check=_available("reversal"),
        description="small T5 trained to reverse a sequence of letters (cross-attention aligns "
                    "output j with input n-1-j); prompts: letters separated by spaces",
        origin="trained toy (examples/train_toy_reversal.py)",
    ))
