"""A loaded model: the TransformerBridge, the model's own tokenizer, the BOS policy in force, and a
self-description (:class:`ModelInfo`) derived from what TransformerLens built.

Tokenization is done here, not by the bridge: the bridge would prepend a BOS token on its own
(``default_prepend_bos``), while we make that an explicit, recorded choice (:data:`BosPolicy`).
The bridge is always given token ids.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from workbench.errors import UserError
from workbench.models import chat as chat_format
from workbench.models import kv_cache, token_bytes
from workbench.models.registry import BOS_POLICIES, BosPolicy, Family, ModelSource, Provenance

# Architectures whose normalisation follows each sublayer (residual -> sublayer -> add -> norm).
POST_NORM_ARCHITECTURES = frozenset(
    {"BertForMaskedLM", "BertLMHeadModel", "RobertaForMaskedLM", "OpenAIGPTLMHeadModel"}
)
POSITIONAL_NAMES = {
    "standard": "learned absolute",
    "rotary": "rotary (RoPE)",
    "shortformer": "learned absolute (shortformer)",
    "relative_positional_bias": "relative position bias",
    "alibi": "ALiBi",
}
NORM_NAMES = {"RMS": "RMSNorm", "RMSPre": "RMSNorm", "LN": "LayerNorm", "LNPre": "LayerNorm"}
# Hook points that only fire once a TransformerLens switch changes how attention/MLP compute:
# switch -> the bridge's setter.
GATE_SETTERS = {
    "use_attn_result": "set_use_attn_result",
    "use_split_qkv_input": "set_use_split_qkv_input",
    "use_hook_mlp_in": "set_use_hook_mlp_in",
    "use_attn_in": "set_use_attn_in",
}


@dataclass(frozen=True)
class BosInfo:
    """How prompts become tokens for this model."""

    policy: BosPolicy
    token: str | None
    """The model's BOS token, if it has one."""
    token_id: int | None
    prefix: tuple[str, ...]
    """Special tokens the policy puts before the text (e.g. ``('[CLS]',)``)."""
    suffix: tuple[str, ...]
    """Special tokens the policy puts after the text (e.g. ``('[SEP]',)``, T5's ``('</s>',)``)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, in TransformerLens' terms. JSON-serialisable via :meth:`to_dict`."""

    name: str
    family: Family
    architecture: str
    n_layers: int
    """Transformer blocks (the encoder's, for an encoder-decoder)."""
    n_decoder_layers: int | None
    n_heads: int
    """Query heads per layer."""
    n_kv_heads: int
    """Key/value heads per layer (fewer than ``n_heads`` for grouped-query attention)."""
    d_model: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int | None
    """Longest sequence the model accepts (positions it was built for)."""
    normalization: str
    norm_placement: str
    """``pre`` (norm before each sublayer), ``post`` (after the residual add, BERT) or
    ``pre+post`` (Gemma's sandwich norms)."""
    positional: str
    attention: str
    tied_embeddings: bool
    has_lm_head: bool
    """False when the checkpoint has no trained language-model head: logits, loss and
    predictions would be noise, and workbench refuses to show them."""
    bos: BosInfo
    dtype: str
    device: str
    numerics: str
    """Which numerics produced the activations (TransformerBridge without weight folding matches
    Hugging Face eager attention)."""
    n_hook_names: int
    provenance: Provenance
    description: str = ""
    tl_config: dict[str, Any] = field(default_factory=dict)
    """TransformerLens' config of the bridge (plain values only), with the shapes above written
    over it; enough for a TransformerLens ``ActivationCache`` built from a stored run."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bos"]["prefix"] = list(self.bos.prefix)
        d["bos"]["suffix"] = list(self.bos.suffix)
        return d


@dataclass(frozen=True)
class TopToken:
    id: int
    token: str
    prob: float
    logit: float


@dataclass(frozen=True)
class Prediction:
    """The model's distribution over the next token (or the masked token) after a prompt."""

    prompt: str
    token_ids: list[int]
    str_tokens: list[str]
    position: int
    """Index (in ``token_ids``) whose output distribution is shown."""
    top: list[TopToken]
    bos_policy: BosPolicy
    kind: str = "next token"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_blocks(hook_names: list[str], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    layers = {int(m.group(1)) for name in hook_names if (m := pattern.match(name))}
    return max(layers) + 1 if layers else 0


def _plain_backend(tokenizer: Any) -> Any | None:
    """The Rust ``tokenizers`` object behind ``tokenizer`` where ``tokenizer.decode(ids)`` is
    exactly its ``decode(ids, skip_special_tokens=False)``: a transformers fast tokenizer whose
    ``_decode`` is not overridden and that does no clean-up of spaces. Otherwise None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if (not isinstance(tokenizer, TokenizersBackend)
            or type(tokenizer)._decode is not TokenizersBackend._decode
            or getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return None
    return getattr(tokenizer, "_tokenizer", None)


class Model:
    """A model ready to run: ``model.bridge`` is the TransformerLens ``TransformerBridge``."""

    def __init__(
        self,
        *,
        source: ModelSource,
        bridge: Any,
        tokenizer: Any,
        provenance: Provenance,
        bos: BosPolicy,
        device: str,
    ) -> None:
        if bos not in BOS_POLICIES:
            raise UserError(f"unknown BOS policy {bos!r}; choose one of {', '.join(BOS_POLICIES)}")
        self.source = source
        self.name = source.name
        self.family: Family = source.family
        self.bridge = bridge
        kv_cache.install(bridge)  # cached decoding that sees the prompt (workbench.models.kv_cache)
        self.tokenizer = tokenizer
        self.provenance = provenance
        self.device = device
        self.hook_names: list[str] = list(bridge.hook_dict)
        self._vocab: list[str] | None = None
        self._vocab_bytes: list[bytes] | None = None
        if bos == "prepend" and self.bos_token_id is None:
            raise UserError(f"{self.name} has no BOS token to prepend; use --bos tokenizer or none")
        self.bos: BosPolicy = bos
        self.info = self._describe()

    # --- tokens --------------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        # TransformerLens' setup_tokenizer may invent a BOS (= EOS) for tokenizers that have
        # none; we ask the model's own tokenizer.
        return getattr(self.tokenizer, "bos_token_id", None)

    def tokenize(self, text: str, *, bos: BosPolicy | None = None) -> list[int]:
        """Token ids of ``text`` under the BOS policy (the model's default unless given)."""
        if not text:
            raise UserError("empty prompt")
        policy = bos or self.bos
        if policy not in BOS_POLICIES:
            raise UserError(f"unknown BOS policy {policy!r}; choose one of {', '.join(BOS_POLICIES)}")
        if policy == "tokenizer":
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if policy == "prepend":
                if self.bos_token_id is None:
                    raise UserError(f"{self.name} has no BOS token to prepend")
                ids = [self.bos_token_id, *ids]
        if not ids:
            raise UserError(f"prompt {text!r} has no tokens")
        return [int(i) for i in ids]

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """A conversation as its chat template lays it out (:mod:`workbench.models.chat`)."""
        return chat_format.render(self.tokenizer, messages, self.name)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation: exactly the tokenizer's ``apply_chat_template`` with the
        assistant's turn opened (the template writes its own special tokens; no BOS policy)."""
        return chat_format.chat_ids(self.tokenizer, messages, self.name)

    def str_tokens(self, ids: list[int]) -> list[str]:
        """Each token decoded on its own (as TransformerLens' ``to_str_tokens``)."""
        return [self.tokenizer.decode([i]) for i in ids]

    def weights_sha256(self) -> str:
        """SHA-256 of the loaded weights: every parameter and buffer of the underlying Hugging Face
        model, by its (stable) name, as raw bytes. (The bridge's own state-dict names of T5's
        blocks vary between processes, so they are not hashed.)"""
        import hashlib

        import torch

        h = hashlib.sha256()
        for name, tensor in sorted(self.bridge.original_model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def vocab_strings(self) -> list[str]:
        """Every id of the tokenizer decoded on its own (what :meth:`str_tokens` gives for it).
        Computed once per model (every capture stores it)."""
        if self._vocab is None:
            n = len(self.tokenizer)
            backend = _plain_backend(self.tokenizer)
            if backend is not None:
                # One call into the Rust tokenizer: what decode([i]) returns for such a
                # tokenizer (49k ids in 0.05 s instead of 0.4 s through batch_decode). The ids
                # go in as tuples, not lists: 49k lists alive at once push Python's cyclic
                # garbage collector into a full collection of the whole heap, model included
                # (0.28-0.39 s with SmolLM2 loaded); tuples of ints are untracked at once.
                self._vocab = list(backend.decode_batch([(i,) for i in range(n)], skip_special_tokens=False))
            else:
                self._vocab = [self.tokenizer.decode([i]) for i in range(n)]
        return self._vocab

    def vocab_bytes(self) -> list[bytes]:
        """Every id's raw bytes: a byte-level piece's bytes (``ä½`` is E4 BD), a special token's
        name, else the UTF-8 of :meth:`vocab_strings` (``workbench.models.token_bytes``); what a
        run stores to show tokens as they are. Computed once per model."""
        if self._vocab_bytes is None:
            self._vocab_bytes = token_bytes.vocab_bytes(self.tokenizer, self.vocab_strings(), self.special_ids())
        return self._vocab_bytes

    def special_ids(self) -> list[int]:
        """Ids of the tokenizer's special tokens (BOS, ``[CLS]``, added tokens marked special)."""
        return token_bytes.special_ids(self.tokenizer)

    def _bos_info(self) -> BosInfo:
        probe = "a"
        raw = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenize(probe)
        start = next(
            (i for i in range(len(full) - len(raw) + 1) if full[i : i + len(raw)] == raw), 0
        )
        prefix = tuple(self.tokenizer.convert_ids_to_tokens(full[:start]))
        suffix = tuple(self.tokenizer.convert_ids_to_tokens(full[start + len(raw) :]))
        return BosInfo(
            policy=self.bos,
            token=getattr(self.tokenizer, "bos_token", None) if self.bos_token_id is not None else None,
            token_id=self.bos_token_id,
            prefix=prefix,
            suffix=suffix,
        )

    # --- hook switches ---------------------------------------------------------------------------

    def gated_hook_reason(self, name: str) -> str | None:
        """The TransformerLens switch (a key of :data:`GATE_SETTERS`) hook ``name`` needs before
        it fires, or ``None`` when it fires as the model stands."""
        return self.bridge._gated_hook_reason(name)

    def gate_enabled(self, gate: str) -> bool:
        """Whether the TransformerLens switch ``gate`` (e.g. ``use_attn_result``) is on."""
        return bool(getattr(self.bridge.cfg, gate, False))

    def set_gate(self, gate: str, on: bool) -> None:
        """Turn the TransformerLens switch ``gate`` on or off (a key of :data:`GATE_SETTERS`)."""
        getattr(self.bridge, GATE_SETTERS[gate])(on)

    # --- running -----------------------------------------------------------------------------

    @property
    def decoder_start_token_id(self) -> int:
        """The token an encoder-decoder's decoder starts from."""
        return int(self.bridge.original_model.config.decoder_start_token_id)

    def _decoder_start(self, batch: int = 1) -> Any:
        import torch

        return torch.full((batch, 1), self.decoder_start_token_id, device=self.device)

    def forward(self, tokens: Any, **kwargs: Any) -> Any:
        """The bridge's forward pass on a ``(batch, seq)`` tensor of token ids. For an
        encoder-decoder, ``tokens`` feed the encoder and the decoder gets its start token unless
        ``decoder_input=`` is given."""
        if self.family == "encoder-decoder" and "decoder_input" not in kwargs:
            kwargs["decoder_input"] = self._decoder_start(tokens.shape[0])
        return self.bridge(tokens, **kwargs)

    def _probe_shapes(self) -> dict[str, int]:
        """Shapes read off one real forward pass over a single token: what the model computes,
        not what a config claims (TransformerLens' config reports T5's d_mlp as 4 * d_model)."""
        import torch

        block = "encoder_blocks.0" if self.family == "encoder-decoder" else "blocks.0"
        wanted = {
            "q": f"{block}.attn.hook_q",
            "k": f"{block}.attn.hook_k",
            "mlp": f"{block}.mlp.hook_pre",
            "resid": f"{block}.hook_resid_post",
        }
        present = {k: v for k, v in wanted.items() if v in self.bridge.hook_dict}
        tokens = torch.tensor([[self.tokenize("a")[0]]], device=self.device)
        kwargs = {}
        if self.family == "encoder-decoder":
            kwargs["decoder_input"] = self._decoder_start()
        with torch.inference_mode():
            logits, cache = self.bridge.run_with_cache(
                tokens, names_filter=lambda n: n in present.values(), **kwargs
            )
        shapes: dict[str, int] = {"d_vocab": int(logits.shape[-1])}
        if "q" in present:
            shapes["n_heads"], shapes["d_head"] = map(int, cache[present["q"]].shape[-2:])
        if "k" in present:
            shapes["n_kv_heads"] = int(cache[present["k"]].shape[-2])
        if "mlp" in present:
            shapes["d_mlp"] = int(cache[present["mlp"]].shape[-1])
        if "resid" in present:
            shapes["d_model"] = int(cache[present["resid"]].shape[-1])
        return shapes

    # --- self-description ------------------------------------------------------------------------

    def _describe(self) -> ModelInfo:
        cfg = self.bridge.cfg
        names = self.hook_names
        if self.family == "encoder-decoder":
            n_layers = _count_blocks(names, "encoder_blocks")
            n_dec: int | None = _count_blocks(names, "decoder_blocks")
            attention = "bidirectional encoder; causal decoder with cross-attention"
        else:
            n_layers = _count_blocks(names, "blocks")
            n_dec = None
            attention = str(getattr(cfg, "attention_dir", "causal"))
        architecture = str(getattr(cfg, "architecture", None) or type(self.bridge.original_model).__name__)
        if architecture in POST_NORM_ARCHITECTURES:
            placement = "post"
        elif any(n.startswith("blocks.0.ln1_post.") for n in names):
            placement = "pre+post"
        else:
            placement = "pre"
        probed = self._probe_shapes()
        n_heads = probed.get("n_heads", int(cfg.n_heads))
        d_mlp = probed.get("d_mlp", getattr(cfg, "d_mlp", None))
        dtype = str(next(self.bridge.original_model.parameters()).dtype).removeprefix("torch.")
        raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        tl_config = {k: v for k, v in raw.items()
                     if isinstance(v, (int, float, str, bool, type(None)))
                     and k not in ("device", "model_name", "tokenizer_name")}
        tl_config.update(
            n_layers=n_layers, n_heads=n_heads, d_vocab=probed["d_vocab"],
            **{k: probed[p] for k, p in (("d_model", "d_model"), ("d_head", "d_head"),
                                         ("d_mlp", "d_mlp"), ("n_key_value_heads", "n_kv_heads"))
               if p in probed},
        )
        return ModelInfo(
            name=self.name,
            family=self.family,
            architecture=architecture,
            n_layers=n_layers,
            n_decoder_layers=n_dec,
            n_heads=n_heads,
            n_kv_heads=probed.get("n_kv_heads", int(getattr(cfg, "n_key_value_heads", None) or n_heads)),
            d_model=probed.get("d_model", int(cfg.d_model)),
            d_head=probed.get("d_head", int(cfg.d_head)),
            d_mlp=int(d_mlp) if d_mlp else None,
            d_vocab=probed["d_vocab"],
            n_ctx=int(cfg.n_ctx) if getattr(cfg, "n_ctx", None) else None,
            normalization=NORM_NAMES.get(str(cfg.normalization_type), str(cfg.normalization_type)),
            norm_placement=placement,
            positional=POSITIONAL_NAMES.get(
                str(cfg.positional_embedding_type), str(cfg.positional_embedding_type)
            ),
            attention=attention,
            tied_embeddings=bool(getattr(getattr(self.bridge.original_model, "config", None),
                                         "tie_word_embeddings", False)),
            has_lm_head=self.source.has_lm_head,
            bos=self._bos_info(),
            dtype=dtype,
            device=self.device,
            numerics=("TransformerBridge, raw Hugging Face weights (no folding), eager attention"
                      if hasattr(self.bridge.original_model, "config")
                      else "TransformerBridge over a TransformerLens native model (no folding)"),
            n_hook_names=len(names),
            provenance=self.provenance,
            description=self.source.description,
            tl_config=tl_config,
        )

    def _require_lm_head(self) -> None:
        if not self.info.has_lm_head:
            raise UserError(
                f"{self.name} has no trained language-model head: its predictions would be noise"
            )

    def predict(self, text: str, *, k: int = 10, bos: BosPolicy | None = None, chat: bool = False) -> Prediction:
        """Top-``k`` tokens the model predicts after ``text`` (decoder), as the first output token
        (encoder-decoder), or at the first mask token (encoder). ``chat``: ``text`` is a user's
        turn, laid out by the model's chat template (the prediction opens the assistant's reply)."""
        import torch

        self._require_lm_head()
        if k < 1:
            raise UserError("k must be at least 1")
        if chat:
            ids = self.chat_ids(chat_format.user_turn(text))
        else:
            ids = self.tokenize(text, bos=bos)
        if self.info.n_ctx and len(ids) > self.info.n_ctx:
            raise UserError(
                f"prompt has {len(ids)} tokens; {self.name} accepts at most {self.info.n_ctx}"
            )
        tokens = torch.tensor([ids], device=self.device)
        kind = "next token"
        with torch.inference_mode():
            if self.family == "encoder-decoder":
                logits = self.forward(tokens)[0, -1]
                position = len(ids) - 1
                kind = "first decoder token"
            elif self.family == "encoder":
                mask_id = getattr(self.tokenizer, "mask_token_id", None)
                if mask_id is None or mask_id not in ids:
                    mask = getattr(self.tokenizer, "mask_token", None) or "[MASK]"
                    raise UserError(f"an encoder predicts masked tokens: put {mask} in the prompt")
                position = ids.index(mask_id)
                logits = self.bridge(tokens)[0, position]
                kind = "masked token"
            else:
                position = len(ids) - 1
                logits = self.bridge(tokens)[0, position]
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, k=min(k, probs.shape[-1]))
        return Prediction(
            prompt=text,
            token_ids=ids,
            str_tokens=self.str_tokens(ids),
            position=position,
            top=[
                TopToken(int(i), self.tokenizer.decode([int(i)]), float(p), float(logits[i]))
                for p, i in zip(top.values, top.indices)
            ],
            bos_policy="none" if chat else (bos or self.bos),
            kind=kind,
            extra={"chat_text": self.chat_text(chat_format.user_turn(text))} if chat else {},
        )

    def __repr__(self) -> str:
        i = self.info
        return (
            f"<Model {self.name}: {i.family} {i.architecture}, {i.n_layers} layers, "
            f"{i.n_heads} heads, d_model {i.d_model}, bos={self.bos}>"
        )
