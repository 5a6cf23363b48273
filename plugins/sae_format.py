"""Sparse autoencoders in SAELens' on-disk format, read and written without SAELens.

SAELens (the library the field uses to share SAEs) does not work with TransformerLens 4.x today
(it pins ``transformer-lens<4``), so this module reads and writes its folder format by hand, which
is small and documented by SAELens' own loader:

- ``cfg.json``: ``architecture`` (``standard``, ``topk`` or ``jumprelu``), ``d_in``, ``d_sae``,
  ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations`` (``none``,
  ``expected_average_only_in``, ``constant_norm_rescale`` or ``layer_norm``), ``k`` for ``topk``
  (and ``rescale_acts_by_decoder_norm``), ``metadata`` with ``hook_name`` and ``model_name``
  (older folders put ``hook_name`` at the top level: read too);
- ``sae_weights.safetensors``: ``W_enc`` ``(d_in, d_sae)``, ``b_enc`` ``(d_sae,)``, ``W_dec``
  ``(d_sae, d_in)``, ``b_dec`` ``(d_in,)``, and ``threshold`` ``(d_sae,)`` for ``jumprelu``.

Encoding is SAELens' inference path: ``x' = norm_in(x) - b_dec`` (when ``apply_b_dec_to_input``),
``pre = x' W_enc + b_enc``, then ReLU (``standard``), ReLU of the ``k`` largest (``topk``; with
``rescale_acts_by_decoder_norm`` the pre-activations are first multiplied by the decoder rows'
norms) or ``pre * (pre > threshold)`` after ReLU (``jumprelu``). Decoding is ``acts W_dec + b_dec``
(then the inverse of ``norm_in``). ``expected_average_only_in`` is a training-time scale SAELens
folds into the weights only for its hub releases; loaded from disk it is the identity, as here.

Everything is numpy (the terminal view encodes one token without torch); :meth:`SAE.torch_encode`
is the same computation on torch tensors for encoding whole runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURES",
    "CFG_FILE",
    "NORMALIZATIONS",
    "SAE",
    "WEIGHTS_FILE",
    "from_bytes",
    "load_folder",
]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
SAELENS_VERSION = "6.54.12"
"""The SAELens version whose format this writes (recorded in ``metadata.sae_lens_version``)."""


@dataclass
class SAE:
    """A sparse autoencoder's weights and the settings its encoding depends on."""

    architecture: str
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    k: int | None = None
    threshold: np.ndarray | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    hook_name: str = ""
    model_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Everything else ``cfg.json``'s ``metadata`` held (kept when written back)."""
    extra_cfg: dict[str, Any] = field(default_factory=dict)
    """Top-level ``cfg.json`` fields this module does not interpret (kept when written back)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"SAE architecture {self.architecture!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
        if self.normalize_activations not in NORMALIZATIONS:
            raise UserError(f"SAE normalize_activations {self.normalize_activations!r} is unknown "
                            f"(known: {', '.join(NORMALIZATIONS)})")
        d_in, d_sae = self.W_enc.shape if self.W_enc.ndim == 2 else (-1, -1)
        shapes = {"W_enc": (self.W_enc.shape, (d_in, d_sae)), "b_enc": (self.b_enc.shape, (d_sae,)),
                  "W_dec": (self.W_dec.shape, (d_sae, d_in)), "b_dec": (self.b_dec.shape, (d_in,))}
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise UserError("a jumprelu SAE needs a 'threshold' tensor")
            shapes["threshold"] = (self.threshold.shape, (d_sae,))
        bad = [f"{n} {tuple(got)} (expected {want})" for n, (got, want) in shapes.items()
               if tuple(got) != want]
        if d_in < 1 or bad:
            raise UserError("SAE weights have inconsistent shapes: " + "; ".join(bad or ["W_enc is not 2-D"]))
        if self.architecture == "topk":
            if self.k is None or not 1 <= int(self.k) <= d_sae:
                raise UserError(f"a topk SAE needs k between 1 and d_sae={d_sae}, not {self.k!r}")
            self.k = int(self.k)

    # --- shape ---------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def describe(self) -> str:
        sparsity = f", k={self.k}" if self.architecture == "topk" else ""
        return f"{self.architecture} SAE {self.d_in}->{self.d_sae}{sparsity} on {self.hook_name or '?'}"

    # --- numpy encoding ------------------------------------------------------------------------

    def _norm_in(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        if self.normalize_activations == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / np.linalg.norm(x, axis=-1, keepdims=True)
            return x * coeff, ("scale", coeff)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(-1, keepdims=True)
            centred = x - mu
            std = centred.std(-1, ddof=1, keepdims=True)
            return centred / (std + 1e-5), ("ln", mu, std)
        return x, None

    def pre_acts(self, x: np.ndarray) -> np.ndarray:
        """``(..., d_sae)`` pre-activations of ``(..., d_in)`` inputs."""
        x = np.asarray(x, dtype=np.float32)
        x, _ = self._norm_in(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            pre = pre * np.linalg.norm(self.W_dec, axis=-1)
        return pre

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``(..., d_sae)`` feature activations of ``(..., d_in)`` inputs (dense)."""
        pre = self.pre_acts(x)
        if self.architecture == "standard":
            return np.maximum(pre, 0)
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return np.where(pre > self.threshold, np.maximum(pre, 0), 0).astype(pre.dtype)
        assert self.k is not None
        idx = np.argpartition(-pre, self.k - 1, axis=-1)[..., : self.k]
        out = np.zeros_like(pre)
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
        return out

    def encode_sparse(self, x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The active features of ``(n, d_in)`` rows as ``(rows, features, values)``, encoded
        ``chunk`` rows at a time (a dense ``(n, d_sae)`` array of a long prompt and a wide SAE
        would not fit)."""
        rows, cols, vals = [], [], []
        for s in range(0, len(x), chunk):
            acts = self.encode(x[s:s + chunk])
            r, c = np.nonzero(acts > 0)
            rows.append(r + s)
            cols.append(c)
            vals.append(acts[r, c])
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def decode(self, acts: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """The reconstruction of the inputs whose activations are ``acts``. Normalisations that
        depend on the input (``constant_norm_rescale``, ``layer_norm``) need ``x`` to undo."""
        acts = np.asarray(acts, dtype=np.float32)
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            acts = acts / np.linalg.norm(self.W_dec, axis=-1)
        out = acts @ self.W_dec + self.b_dec
        if self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if x is None:
                raise ValueError(f"decoding an SAE with {self.normalize_activations} needs the input")
            _, undo = self._norm_in(np.asarray(x, dtype=np.float32))
            out = out / undo[1] if undo[0] == "scale" else out * undo[2] + undo[1]
        return out

    # --- torch encoding ------------------------------------------------------------------------

    def torch_weights(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        import torch

        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.threshold is not None else [])
        return {n: torch.as_tensor(getattr(self, n), dtype=torch.float32, device=device) for n in names}

    def torch_encode(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`encode` on a ``(..., d_in)`` float32 tensor with :meth:`torch_weights`."""
        import torch

        if self.normalize_activations == "constant_norm_rescale":
            x = x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        elif self.normalize_activations == "layer_norm":
            x = x - x.mean(-1, keepdim=True)
            x = x / (x.std(-1, keepdim=True) + 1e-5)
        if self.apply_b_dec_to_input:
            x = x - w["b_dec"]
        pre = x @ w["W_enc"] + w["b_enc"]
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > w["threshold"])
        if self.rescale_acts_by_decoder_norm:
            pre = pre * w["W_dec"].norm(dim=-1)
        assert self.k is not None
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def torch_decode(self, acts: torch.Tensor, w: dict[str, torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        if self.rescale_acts_by_decoder_norm and self.architecture == "topk":
            acts = acts / w["W_dec"].norm(dim=-1)
        out = acts @ w["W_dec"] + w["b_dec"]
        if self.normalize_activations == "constant_norm_rescale":
            assert x is not None
            out = out / (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        elif self.normalize_activations == "layer_norm":
            assert x is not None
            mu = x.mean(-1, keepdim=True)
            out = out * ((x - mu).std(-1, keepdim=True)) + mu
        return out

    # --- the folder ----------------------------------------------------------------------------

    def cfg(self) -> dict[str, Any]:
        """``cfg.json`` as SAELens writes it."""
        cfg: dict[str, Any] = dict(self.extra_cfg)
        cfg.update({"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                    "dtype": "float32", "device": "cpu",
                    "apply_b_dec_to_input": bool(self.apply_b_dec_to_input),
                    "normalize_activations": self.normalize_activations,
                    "reshape_activations": "none"})
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = bool(self.rescale_acts_by_decoder_norm)
        meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                **self.metadata}
        meta.update({"hook_name": self.hook_name, "model_name": self.model_name})
        cfg["metadata"] = meta
        return cfg

    def tensors(self) -> dict[str, np.ndarray]:
        out = {n: np.ascontiguousarray(getattr(self, n), dtype=np.float32)
               for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.threshold is not None:
            out["threshold"] = np.ascontiguousarray(self.threshold, dtype=np.float32)
        return out

    def to_bytes(self) -> tuple[bytes, bytes]:
        """``(cfg.json, sae_weights.safetensors)`` contents."""
        from safetensors.numpy import save

        return (json.dumps(self.cfg(), indent=1).encode("utf-8"),
                save(self.tensors(), metadata={"format": "pt"}))

    def save(self, folder: str | Path) -> Path:
        """Write the SAELens folder (created; files replaced atomically)."""
        import os

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, raw in zip((CFG_FILE, WEIGHTS_FILE), self.to_bytes(), strict=True):
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(raw)
            os.replace(tmp, folder / name)
        return folder


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None}


def load_tensors(raw: bytes) -> dict[str, np.ndarray]:
    """A safetensors file's float tensors as float32 numpy arrays. Read here rather than with
    ``safetensors.numpy``, which has no bfloat16 (SAELens writes weights in the SAE's own dtype):
    the format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
    shape and byte range, then the bytes."""
    if len(raw) < 8:
        raise ValueError("too short")
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    body = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, not a float")
        if not 0 <= a <= b <= len(body):
            raise ValueError(f"tensor {name!r} lies outside the file")
        chunk = bytes(body[a:b])
        if dtype == "BF16":
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(chunk, dtype=np.dtype(SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
        out[name] = arr.astype(np.float32).reshape(shape)
    return out


def from_bytes(cfg_raw: bytes, weights_raw: bytes, where: str = "SAE") -> SAE:
    """An :class:`SAE` from the contents of ``cfg.json`` and ``sae_weights.safetensors``; a
    malformed pair is a :class:`UserError` naming ``where``."""
    try:
        cfg = json.loads(cfg_raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{where}: {CFG_FILE} is not JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: {CFG_FILE} is not a JSON object")
    try:
        tensors = load_tensors(weights_raw)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: {WEIGHTS_FILE} is not a safetensors file of float tensors ({exc})"
                        .splitlines()[0]) from None
    try:
        return _from_parts(cfg, tensors, where)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{where}: {CFG_FILE} is malformed ({exc})".splitlines()[0]) from None


def _from_parts(cfg: dict[str, Any], tensors: dict[str, np.ndarray], where: str) -> SAE:
    arch = cfg.get("architecture")
    if arch is None:
        raise UserError(f"{where}: {CFG_FILE} has no 'architecture' (not a SAELens SAE folder?)")
    if not isinstance(cfg.get("metadata") or {}, dict):
        raise UserError(f"{where}: {CFG_FILE}'s metadata is not an object")
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise UserError(f"{where}: {WEIGHTS_FILE} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))})")
    known = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
             "normalize_activations", "reshape_activations", "k", "rescale_acts_by_decoder_norm",
             "metadata", "hook_name", "model_name"}
    # SAELens before 6 wrote a TopK SAE as architecture "standard" with activation_fn_str "topk"
    act = cfg.get("activation_fn_str")
    if act == "topk":
        arch = "topk"
        cfg = {**cfg, "k": (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))}
    elif act not in (None, "relu"):
        raise UserError(f"{where}: activation_fn_str={act!r} is not supported (relu, topk)")
    if act is not None:
        known |= {"activation_fn_str", "activation_fn_kwargs"}
    if cfg.get("finetuning_scaling_factor"):
        raise UserError(f"{where}: finetuning_scaling_factor is not supported")
    meta = dict(cfg.get("metadata") or {})
    hook = meta.pop("hook_name", None) or cfg.get("hook_name") or ""
    model = meta.pop("model_name", None) or cfg.get("model_name") or ""
    if cfg.get("reshape_activations", "none") != "none":
        raise UserError(f"{where}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    f32 = tensors
    sae = SAE(architecture=str(arch), W_enc=f32["W_enc"], b_enc=f32["b_enc"], W_dec=f32["W_dec"],
              b_dec=f32["b_dec"], k=cfg.get("k"), threshold=f32.get("threshold"),
              apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
              normalize_activations=str(cfg.get("normalize_activations", "none")),
              rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
              hook_name=str(hook), model_name=str(model), metadata=meta,
              extra_cfg={k: v for k, v in cfg.items() if k not in known})
    for key, have in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if key in cfg and int(cfg[key]) != have:
            raise UserError(f"{where}: {CFG_FILE} says {key}={cfg[key]} but the weights have {have}")
    return sae


def load_folder(folder: str | Path) -> SAE:
    """Read a SAELens SAE folder; anything wrong with it is one :class:`UserError` line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such SAE folder")
    paths = [folder / CFG_FILE, folder / WEIGHTS_FILE]
    lacking = [p.name for p in paths if not p.is_file()]
    if lacking:
        raise UserError(f"{folder} is not a SAELens SAE folder: it lacks {' and '.join(lacking)}")
    return from_bytes(paths[0].read_bytes(), paths[1].read_bytes(), str(folder))
