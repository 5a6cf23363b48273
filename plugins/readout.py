"""How a pre-norm decoder's residual stream becomes logits, taken apart: the shared machinery of
the ``logit-lens``, ``dla`` and ``neurons`` analyses (plugin ``lens``).

A pre-norm decoder's final residual stream at a position is a sum of what wrote to it::

    resid_final = embed (+ pos_embed) + sum over layers (attn_out + mlp_out)
    attn_out    = post1( sum over heads z_h W_O[h] + b_O )      post1: identity, or Gemma's
    mlp_out     = post2( sum over neurons a_n W_out[n] + b_out )  per-sublayer post-norm

and the logits are ``unembed(final_norm(resid_final))``. With that forward pass's own scales
(``ln_final.hook_scale``, and the post-norms' ``hook_scale``) held fixed every norm is affine
(``centre(x) / scale * w + b``; ``centre`` subtracts the mean for LayerNorm and is the identity
for RMSNorm; Gemma stores ``w`` as ``1 + weight``), so a logit is exactly the sum of one term per
writer plus a constant. All of it is computed in float64 from the stored float activations and
the reloaded model's weights, read through TransformerLens' bridge (``W_O``, ``W_out``, ``W_U``,
the norm bridges' ``uses_rms_norm`` / ``uses_weight_offset``).

Weights are never copied into a run: they come from the model reloaded by the run's provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError
from workbench.hooknames import resid_post, resid_pre

if TYPE_CHECKING:
    from workbench.models.model import Model
    from workbench.store.reader import Run


def token_position(run: Run, i: int, position: int) -> int | None:
    """Prompt ``i``'s token index for a ``position`` parameter (negative: from the end), or
    ``None`` when the prompt is too short."""
    n = run.n_tokens(i)
    pos = position if position >= 0 else n + position
    return pos if 0 <= pos < n else None


def layer_count(run: Run) -> int:
    """Blocks of the run's model (counted from the stored residual stream)."""
    n = 0
    while resid_post(n) in run.aliases:
        n += 1
    return n


def residual_rows(run: Run) -> tuple[list[str], list[str]]:
    """(labels, hooks) of the residual stream's stored rows: ``embed`` (``blocks.0.hook_resid_pre``,
    where the run has it), then the output of every layer (``blocks.L.hook_resid_post``)."""
    labels = ["embed"] if resid_pre(0) in run.aliases else []
    hooks = [resid_pre(0)] if labels else []
    for layer in range(layer_count(run)):
        labels.append(str(layer))
        hooks.append(resid_post(layer))
    return labels, hooks


def centre(x: np.ndarray, on: bool) -> np.ndarray:
    return x - x.mean(-1, keepdims=True) if on else x


@dataclass
class Norm:
    """A normalisation with its scale held fixed: ``centre(x) / scale * weight + bias``."""

    centred: bool
    weight: np.ndarray
    bias: np.ndarray | None

    def linear(self, x: np.ndarray, scale: Any) -> np.ndarray:
        """The linear part, for the component vectors ``x`` (..., d)."""
        return centre(x, self.centred) / scale * self.weight

    def constant(self) -> np.ndarray:
        return self.bias if self.bias is not None else np.zeros_like(self.weight)


def _f64(t: Any) -> np.ndarray:
    return t.detach().to("cpu").double().numpy()


def read_norm(module: Any, where: str) -> Norm:
    if not hasattr(module, "uses_rms_norm"):
        raise UserError(f"{where} is a {type(module).__name__}, not a normalisation workbench knows how to "
                        "hold fixed; no attribution is shown")
    weight = _f64(module.weight)
    if module.uses_weight_offset:
        weight = 1.0 + weight
    bias = getattr(module.original_component, "bias", None)
    return Norm(centred=not module.uses_rms_norm, weight=weight,
                bias=_f64(bias) if bias is not None and not module.uses_rms_norm else None)


class Readout:
    """The reloaded model's final norm, unembedding and writers' weights."""

    def __init__(self, model: Model) -> None:
        b = model.bridge
        for part in ("ln_final", "unembed", "blocks"):
            if not hasattr(b, part):
                raise UserError(f"{model.name} has no {part} in TransformerLens' bridge: the logit lens and "
                                "logit attribution need a decoder with a final norm and an unembedding")
        self.model = model
        self.bridge = b
        self.final = read_norm(b.ln_final, "ln_final")
        self.n_layers = len(b.blocks)
        self._cache: dict[tuple[str, int], Any] = {}

    # --- the real computation, through the model's own modules (float32, as the model runs) ------

    def logits(self, resid: np.ndarray) -> Any:
        """``unembed(ln_final(resid))`` for residual vectors ``(n, d)``: the model's own final
        norm and unembedding modules, in the model's dtype; a torch float32 tensor ``(n, vocab)``."""
        import torch

        dtype = self.bridge.unembed.W_U.dtype  # float32, or the dtype a model was loaded in
        x = torch.as_tensor(np.ascontiguousarray(resid), dtype=dtype, device=self.model.device)
        with torch.inference_mode():
            return self.bridge.unembed(self.bridge.ln_final(x)).float()

    # --- weights, float64 ------------------------------------------------------------------------

    def get(self, key: str, layer: int) -> Any:
        if (key, layer) not in self._cache:
            block = self.bridge.blocks[layer]
            if key == "W_O":
                value: Any = _f64(block.attn.W_O)
            elif key == "b_O":
                value = None if block.attn.b_O is None else _f64(block.attn.b_O)
            elif key == "W_out":
                value = _f64(block.mlp.W_out)
            elif key == "b_out":
                out = block.mlp.out
                bias = getattr(out, "bias", None)
                value = None if bias is None else _f64(bias)
            else:  # ln1_post / ln2_post
                value = read_norm(block._modules[key], f"blocks.{layer}.{key}") if key in block._modules else None
            self._cache[(key, layer)] = value
        return self._cache[(key, layer)]

    def post_norm(self, layer: int, which: str) -> Norm | None:
        """Gemma-style per-sublayer post-norm (``ln1_post`` after attention, ``ln2_post`` after
        the MLP), or None."""
        return self.get(which, layer)  # type: ignore[no-any-return]

    def direction(self, target: int, wrong: int | None = None) -> tuple[np.ndarray, float]:
        """``(v, c)`` such that, for a residual vector ``x`` with final-norm scale ``s``,
        ``logit[target] (- logit[wrong]) = centre(x) / s @ v + c``: ``v`` is the final norm's
        weight times ``u = W_U[:, target] (- W_U[:, wrong])``, ``c`` the final-norm bias and the
        unembedding bias along ``u``."""
        W_U, b_U = self.bridge.unembed.W_U, self.bridge.unembed.b_U
        u = _f64(W_U[:, target])
        c = float(b_U[target])
        if wrong is not None:
            u = u - _f64(W_U[:, wrong])
            c -= float(b_U[wrong])
        c += float(self.final.constant() @ u)
        return self.final.weight * u, c

    def through_final(self, x: np.ndarray, scale: float, v: np.ndarray) -> np.ndarray:
        """Each component vector's term of the metric: ``centre(x) / scale @ v``."""
        return centre(x, self.final.centred) / scale @ v  # type: ignore[no-any-return]


@dataclass
class Attribution:
    """One position's metric split by writer. Every value is that writer's term of the metric;
    ``total()`` adds them (and the constant)."""

    embed: float
    pos_embed: float | None
    heads: np.ndarray  # (layers, heads)
    attn_bias: np.ndarray  # (layers,): b_O (and post-norm bias) terms
    mlp: np.ndarray  # (layers,)
    constant: float  # final-norm bias and unembedding bias
    actual: float  # the model's own metric, from its own modules on the stored final residual
    attn_error: float  # max over layers of |sum of heads + bias - stored attn_out| / |attn_out|
    resid_error: float  # |sum of writers - stored final residual| / |final residual|

    def total(self) -> float:
        return float(self.embed + (self.pos_embed or 0.0) + self.heads.sum() + self.attn_bias.sum()
                     + self.mlp.sum() + self.constant)


def _vec(run: Run, hook: str, i: int, pos: int) -> np.ndarray:
    return run.activation(hook, i)[pos].astype(np.float64)


def _mlp_vec(run: Run, layer: int, i: int, pos: int) -> np.ndarray:
    """Layer ``layer``'s stored ``hook_mlp_out`` at one position; zeros for a model without MLPs
    (an attention-only toy: the run records every hook name of its model, and none is an MLP's)."""
    hook = f"blocks.{layer}.hook_mlp_out"
    model_hooks = run.capture_settings.model_hooks
    if hook not in run.hooks and model_hooks is not None and hook not in model_hooks:
        return np.zeros(int(run.model_info["d_model"]))
    return _vec(run, hook, i, pos)


def _scale(run: Run, hook: str, i: int, pos: int) -> float:
    """A norm's stored ``hook_scale`` at one position."""
    return float(run.activation(hook, i)[pos].reshape(-1)[0])


def _through_post(run: Run, ro: Readout, i: int, pos: int, layer: int, which: str,
                  vecs: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A sublayer's writes (``vecs``, rows) and its output bias (zeros if none) as they reach the
    residual stream: through the layer's post-norm ``which`` (``ln1_post``/``ln2_post``) with its
    stored scale, where the model has one; the norm's own bias joins the bias term."""
    bias_vec = bias if bias is not None else np.zeros(vecs.shape[-1])
    post = ro.post_norm(layer, which)
    if post is None:
        return vecs, bias_vec
    s = _scale(run, f"blocks.{layer}.{which}.hook_scale", i, pos)
    return post.linear(vecs, s), post.linear(bias_vec, s) + post.constant()


def _rel(err: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(err) / max(float(np.linalg.norm(ref)), 1e-30))


def check_pre_norm(run: Run, i: int = 0, pos: int = -1) -> float:
    """Refuse runs whose residual stream is not the sum of its writers (post-norm models such as
    BERT normalise after each sublayer, so a logit is no sum of component terms). Returns the
    relative error of ``embed + pos_embed + sum(attn_out + mlp_out)`` against the stored final
    residual."""
    family, name = run.family, run.model_name
    if family != "decoder":
        raise UserError(f"{name} is an {family} model: BERT-style encoders normalise after each sublayer "
                        "(post-norm), so the logit is not a sum of component contributions; workbench refuses "
                        "rather than show wrong numbers (logit lens and attribution need a pre-norm decoder)")
    n_layers = layer_count(run)
    final = _vec(run, resid_post(n_layers - 1), i, pos)
    total = _vec(run, "hook_embed", i, pos)
    if "hook_pos_embed" in run.aliases:
        total = total + _vec(run, "hook_pos_embed", i, pos)
    for layer in range(n_layers):
        total += _vec(run, f"blocks.{layer}.hook_attn_out", i, pos) + _mlp_vec(run, layer, i, pos)
    err = _rel(total - final, final)
    if err > 1e-3:
        raise UserError(f"in {name} the final residual stream is not embed + attention + MLP outputs "
                        f"(relative difference {err:.2g}): not a pre-norm residual model, so the logit is not a "
                        "sum of component contributions; workbench refuses rather than show wrong numbers")
    return err


def attribute(run: Run, ro: Readout, i: int, pos: int, target: int, wrong: int | None) -> Attribution:
    """Split ``logit[target] (- logit[wrong])`` at position ``pos`` of prompt ``i`` by writer."""
    v, const = ro.direction(target, wrong)
    n_layers = ro.n_layers
    final_scale = _scale(run, "ln_final.hook_scale", i, pos)
    final_resid = run.activation(resid_post(n_layers - 1), i)[pos : pos + 1]
    logits = ro.logits(final_resid)[0]
    actual = float(logits[target]) - (float(logits[wrong]) if wrong is not None else 0.0)

    def term(x: np.ndarray) -> Any:
        return ro.through_final(x, final_scale, v)

    embed_vec = _vec(run, "hook_embed", i, pos)
    resid_sum = embed_vec.copy()
    pos_embed = None
    if "hook_pos_embed" in run.aliases:
        p = _vec(run, "hook_pos_embed", i, pos)
        pos_embed = float(term(p))
        resid_sum += p
    heads = []
    attn_bias = np.zeros(n_layers)
    mlp = np.zeros(n_layers)
    attn_error = 0.0
    for layer in range(n_layers):
        z = _vec(run, f"blocks.{layer}.attn.hook_z", i, pos)  # (heads, d_head)
        per_head = np.einsum("hd,hdm->hm", z, ro.get("W_O", layer))  # (heads, d_model)
        per_head, bias_vec = _through_post(run, ro, i, pos, layer, "ln1_post", per_head, ro.get("b_O", layer))
        stored = _vec(run, f"blocks.{layer}.hook_attn_out", i, pos)
        attn_error = max(attn_error, _rel(per_head.sum(0) + bias_vec - stored, stored))
        heads.append(term(per_head))
        attn_bias[layer] = float(term(bias_vec))
        mlp_vec = _mlp_vec(run, layer, i, pos)
        mlp[layer] = float(term(mlp_vec))
        resid_sum += stored + mlp_vec
    final = final_resid[0].astype(np.float64)
    return Attribution(embed=float(term(embed_vec)), pos_embed=pos_embed, heads=np.stack(heads),
                       attn_bias=attn_bias, mlp=mlp, constant=const, actual=actual,
                       attn_error=attn_error, resid_error=_rel(resid_sum - final, final))


def neuron_terms(run: Run, ro: Readout, i: int, pos: int, target: int, wrong: int | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer and neuron, ``activation x direct effect`` on the metric: ``(terms (layers,
    d_mlp), activations (layers, d_mlp), bias terms (layers,), MLP terms (layers,))``; the last
    is each layer's stored ``hook_mlp_out`` read through the final norm (:func:`attribute`'s MLP
    term), which the layer's neuron terms plus its bias term add up to."""
    v, _ = ro.direction(target, wrong)
    final_scale = _scale(run, "ln_final.hook_scale", i, pos)
    terms, acts = [], []
    bias_terms, mlp_terms = np.zeros(ro.n_layers), np.zeros(ro.n_layers)
    for layer in range(ro.n_layers):
        a = _vec(run, f"blocks.{layer}.mlp.hook_post", i, pos)
        rows, bias_vec = _through_post(run, ro, i, pos, layer, "ln2_post", ro.get("W_out", layer),
                                       ro.get("b_out", layer))  # rows: (d_mlp, d_model)
        effect = ro.through_final(rows, final_scale, v)  # (d_mlp,)
        terms.append(a * effect)
        acts.append(a)
        bias_terms[layer] = float(ro.through_final(bias_vec, final_scale, v))
        mlp_terms[layer] = float(ro.through_final(_vec(run, f"blocks.{layer}.hook_mlp_out", i, pos), final_scale, v))
    return np.stack(terms), np.stack(acts), bias_terms, mlp_terms


def promoted_tokens(ro: Readout, layer: int, neuron: int, k: int) -> tuple[list[int], list[float], list[int], list[float]]:
    """The tokens a neuron's output weights raise and lower most, read straight through the
    final norm's weight and the unembedding (no scale: a direction, not a forward pass):
    ``(top ids, their values, bottom ids, values)``."""
    import torch

    row = ro.get("W_out", layer)[neuron]
    post = ro.post_norm(layer, "ln2_post")
    if post is not None:
        row = post.linear(row, 1.0)
    vec = centre(row, ro.final.centred) * ro.final.weight
    W_U = ro.bridge.unembed.W_U
    with torch.inference_mode():
        scores = torch.as_tensor(vec, dtype=W_U.dtype, device=W_U.device) @ W_U
        top = torch.topk(scores, k)
        bottom = torch.topk(-scores, k)
    return (top.indices.tolist(), top.values.double().tolist(),
            bottom.indices.tolist(), (-bottom.values).double().tolist())
