"""Tiny randomly initialised models, one per family, for fast tests and experiments.

``tiny-gpt2`` and ``tiny-llama`` (decoders; the Llama one grouped-query), ``tiny-bert`` (encoder)
and ``tiny-t5`` (encoder-decoder with cross-attention). 2 layers, d_model 64, 4 heads, 512
positions. Weights are drawn from the architecture's own initialisation under a fixed seed, so a
load is reproducible. The tokenizer is byte-level (one token per UTF-8 byte, plus specials), built
in code: nothing is downloaded, and any text, emoji included, tokenizes.

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench import hookimpl
from workbench.models import LoadedParts, LoadRequest, ModelSource, Provenance
from workbench.paths import cache_dir

SEED = 0
D_MODEL, N_LAYERS, N_HEADS, D_MLP, N_CTX = 64, 2, 4, 128, 512
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_VERSION = 1


def _tokenizer_dir(variant: str) -> Path:
    """Write (once) and return a folder holding the byte-level tokenizer for ``variant``
    (``plain``, ``bert`` with [CLS]/[SEP], ``t5`` appending <eos>). TransformerLens re-reads
    tokenizers from disk, so it must live in a folder, not only in memory."""
    folder = cache_dir() / "tiny-tokenizers" / f"{variant}-v{TOKENIZER_VERSION}"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    kwargs: dict[str, Any] = {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "<eos>"}
    if variant == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        del kwargs["eos_token"]
    elif variant == "t5":
        backend.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", vocab["<eos>"])]
        )
    else:
        kwargs["bos_token"] = "<bos>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=N_CTX, **kwargs)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tokenizer.save_pretrained(str(tmp))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _make_config(kind: str, vocab_size: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": vocab_size, "pad_token_id": 0}
    if kind == "gpt2":
        return tf.GPT2Config(
            n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=N_CTX,
            bos_token_id=1, eos_token_id=2, architectures=["GPT2LMHeadModel"], **common,
        )
    if kind == "llama":
        return tf.LlamaConfig(
            hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
            num_key_value_heads=2, intermediate_size=D_MLP, max_position_embeddings=N_CTX,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"], **common,
        )
    if kind == "bert":
        return tf.BertConfig(
            hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
            intermediate_size=D_MLP, max_position_embeddings=N_CTX,
            architectures=["BertForMaskedLM"], **common,
        )
    if kind == "t5":
        return tf.T5Config(  # type: ignore[call-arg]  # extra kwargs are stored on the config
            d_model=D_MODEL, d_kv=D_MODEL // N_HEADS, d_ff=D_MLP, num_layers=N_LAYERS,
            num_decoder_layers=N_LAYERS, num_heads=N_HEADS, n_positions=N_CTX,
            eos_token_id=2, decoder_start_token_id=0,
            architectures=["T5ForConditionalGeneration"], **common,
        )
    raise ValueError(kind)


MODEL_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
}
TOKENIZER_VARIANT = {"gpt2": "plain", "llama": "plain", "bert": "bert", "t5": "t5"}


def build_hf_model(kind: str) -> tuple[Any, Any, Path]:
    """The Hugging Face model, tokenizer and tokenizer folder of ``tiny-<kind>`` (seeded)."""
    import torch
    import transformers as tf

    tok_dir = _tokenizer_dir(TOKENIZER_VARIANT[kind])
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    config = _make_config(kind, len(tokenizer))
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        hf_model = getattr(tf, MODEL_CLASSES[kind])(config)
    return hf_model.eval(), tokenizer, tok_dir


def _loader(kind: str) -> Callable[[LoadRequest], LoadedParts]:
    def load(request: LoadRequest) -> LoadedParts:
        hf_model, tokenizer, tok_dir = build_hf_model(kind)
        return LoadedParts(
            hf_model=hf_model,
            tokenizer=tokenizer,
            tokenizer_path=str(tok_dir),
            provenance=Provenance(
                source="tiny",
                location=f"workbench_plugins.tiny_models:{kind}",
                seed=SEED,
                converted=f"random init (seed {SEED}) of {MODEL_CLASSES[kind]}",
            ),
        )

    return load


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    shape = f"{N_LAYERS} layers, d_model {D_MODEL}, {N_HEADS} heads, byte tokenizer; random weights"
    register(ModelSource(
        name="tiny-gpt2", family="decoder", load=_loader("gpt2"), default_bos="prepend",
        description=f"tiny GPT-2 style decoder ({shape})", origin="built in code (test model)",
    ))
    register(ModelSource(
        name="tiny-llama", family="decoder", load=_loader("llama"), default_bos="prepend",
        description=f"tiny Llama style decoder, grouped-query 4/2 heads ({shape})",
        origin="built in code (test model)",
    ))
    register(ModelSource(
        name="tiny-bert", family="encoder", load=_loader("bert"),
        description=f"tiny BERT encoder ({shape})", origin="built in code (test model)",
    ))
    register(ModelSource(
        name="tiny-t5", family="encoder-decoder", load=_loader("t5"),
        description=f"tiny T5 encoder-decoder with cross-attention ({shape})",
        origin="built in code (test model)",
    ))
