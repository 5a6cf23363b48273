"""The embedding and unembedding matrices themselves: the ``matrices`` analysis.

For chosen tokens (words, or by default the distinct tokens of one prompt of the run as the model
saw them, BOS included) it stores the token's row of the embedding matrix ``W_E`` (``d_vocab x
d_model``: the vector the model starts from) and its column of the unembedding ``W_U``
(``d_model x d_vocab``: the vector the final residual stream is dotted with to give the token's
logit), each as ``(n_tokens, d_model)``; their norms; the unembedding's bias at those tokens when
the model has one; whether the two matrices are tied (one matrix, ``W_U = W_E^T``: SmolLM2 and
GPT-2 tie, Llama does not); and the dot products and cosines between the chosen tokens' vectors
in each matrix (the "dot-product similarity" of two embeddings, a small tokens x tokens table).

A checkpoint without a trained language-model head (``minilm-l6``, a sentence-embedding encoder)
has a random ``W_U``: only ``W_E`` is stored, and the result says why.

Weights come from the model reloaded by the run's provenance (``needs_model``). The view
(``matrix-slice``) is in ``matrices_view.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.direction_math import tied, token_matrices, word_token

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.models.model import Model

MATRICES = ("embed", "unembed")
SYMBOL = {"embed": "W_E", "unembed": "W_U"}
SHOWN_DIMS = 8
"""Dimensions of each vector ``render_text`` prints."""
SHOWN_COLUMNS = 12
"""Columns of the cosine table ``render_text`` prints."""


def chosen_tokens(ctx: AnalysisContext, model: Model) -> tuple[list[dict[str, Any]], str, list[str]]:
    """The tokens to show, ``[{"id", "token", "word"}]``, where they came from, and notes. Named
    words must each be one token the vocabulary has (else a UserError); by default, the distinct
    tokens of prompt ``prompt`` in order of first appearance."""
    params, notes = ctx.params, []
    words = [w.strip() for w in params["tokens"].split(",") if w.strip()]
    found: list[dict[str, Any]] = []
    if words:
        source = "tokens"
        for word in words:
            try:
                tid, tok = word_token(model, word, params["space"])
            except UserError as exc:
                raise UserError(f"{ctx.analysis.name}: {exc}; give words of one token each: "
                                f"--param {ctx.analysis.name}.tokens=...") from None
            if tid not in [t["id"] for t in found]:
                found.append({"id": tid, "token": tok, "word": word})
    else:
        i = params["prompt"]
        if i >= len(ctx.prompts):
            raise UserError(f"{ctx.analysis.name}: prompt {i} is not in the run (it has {len(ctx.prompts)} "
                            f"prompt{'s' if len(ctx.prompts) != 1 else ''})")
        source = f"prompt {i}"
        ids = [int(t) for t in ctx.run.tokens(i)]
        strs = ctx.run.str_tokens(i)
        for tid, tok in zip(ids, strs):
            if tid not in [t["id"] for t in found]:
                found.append({"id": tid, "token": tok, "word": None})
    cap = params["max_tokens"]
    if len(found) > cap:
        notes.append(f"the first {cap} of {len(found)} {'words' if words else 'distinct tokens'} "
                     f"(max_tokens {cap})")
        found = found[:cap]
    return found, source, notes


def similarities(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dot products and cosines between the rows of ``x`` ``(n, d)``, float64 ``(n, n)``; a row
    of norm 0 has cosine 0 with every row."""
    x = x.astype(np.float64)
    dot = x @ x.T
    norms = np.linalg.norm(x, axis=1)
    outer = norms[:, None] * norms[None, :]
    cos = np.divide(dot, outer, out=np.zeros_like(dot), where=outer > 0)
    return dot, cos


def unembedding_bias(model: Model) -> Any:
    """The unembedding's trained bias ``(d_vocab,)`` as a torch tensor, or None when the model has
    none (TransformerLens gives every unembedding a ``b_U``: a buffer of zeros when the checkpoint
    has no bias, which is not one)."""
    unembed = getattr(model.bridge, "unembed", None)
    module = getattr(unembed, "original_component", None)
    if module is None:
        return None
    return dict(module.named_parameters(recurse=False)).get("bias")


def compute_matrices(ctx: AnalysisContext) -> Result:
    model = ctx.model()
    mats = token_matrices(model)
    is_tied = tied(mats)
    tokens, source, notes = chosen_tokens(ctx, model)
    ids = [t["id"] for t in tokens]
    W_E = mats["embed"]
    shapes: dict[str, list[int] | None] = {"W_E": list(W_E.shape), "W_U": None}
    if "unembed" in mats:
        shapes["W_U"] = [int(mats["unembed"].shape[1]), int(mats["unembed"].shape[0])]  # d_model x d_vocab
    else:
        notes.append(f"W_E only: {model.name} has no trained unembedding (no trained language-model head), "
                     "so its W_U would be random noise")
    arrays: dict[str, np.ndarray] = {"ids": np.asarray(ids, np.int64)}
    for m, M in mats.items():
        rows = M[ids].detach().to("cpu").numpy().astype(np.float32)
        dot, cos = similarities(rows)
        arrays[m] = rows
        arrays[f"{m}_norm"] = np.linalg.norm(rows.astype(np.float64), axis=1)
        arrays[f"{m}_dot"], arrays[f"{m}_cosine"] = dot, cos
    bias = unembedding_bias(model) if "unembed" in mats else None
    if bias is not None:
        arrays["unembed_bias"] = bias.detach().to("cpu").double().numpy()[ids]
    data = {
        "model": ctx.run.model_info.get("name"), "source": source, "space": ctx.params["space"],
        "tokens": tokens, "matrices": list(mats), "tied": is_tied, "shapes": shapes,
        "d_model": int(W_E.shape[1]), "d_vocab": int(W_E.shape[0]), "has_bias": bias is not None,
        "notes": notes,
    }
    return Result(data=data, arrays=arrays)


def _vector(v: np.ndarray) -> str:
    more = " …" if len(v) > SHOWN_DIMS else ""
    return " ".join(f"{x:+.4f}" for x in v[:SHOWN_DIMS]) + more


def _label(t: dict[str, Any], width: int = 12) -> str:
    text = repr(t["token"])
    return text if len(text) <= width else text[: width - 1] + "…"


def render_matrices(result: Result) -> str:
    d, a = result.data, result.arrays
    s = d["shapes"]
    lines = [f"token matrices of {d['model']}: W_E {s['W_E'][0]} x {s['W_E'][1]} (d_vocab x d_model)"
             + (f", W_U {s['W_U'][0]} x {s['W_U'][1]} (d_model x d_vocab)" if s["W_U"] else "")]
    lines.append("tied: " + ("yes, W_U is W_E transposed (one matrix)" if d["tied"] else
                             "no, two matrices" if s["W_U"] else "no W_U (no trained unembedding)"))
    if "unembed" in d["matrices"]:
        lines.append("unembedding bias: " + ("yes (b_U below)" if d["has_bias"] else "none"))
    lines += [f"note: {n}" for n in d["notes"]]
    toks = d["tokens"]
    lines.append(f"\n{len(toks)} token(s) from {d['source']}")
    norms = d["matrices"][:1] if d["tied"] else d["matrices"]
    head = f"  {'id':>7} {'token':>12}" + "".join(f" {'|' + SYMBOL[m] + '|':>8}" for m in norms)
    lines.append(head + (f" {'b_U':>8}" if d["has_bias"] else ""))
    for k, t in enumerate(toks):
        row = f"  {t['id']:>7} {_label(t):>12}" + "".join(f" {a[f'{m}_norm'][k]:8.4f}" for m in norms)
        lines.append(row + (f" {a['unembed_bias'][k]:+8.4f}" if d["has_bias"] else ""))
    for m in d["matrices"]:
        what = "rows" if m == "embed" else "columns"
        lines.append(f"\n{SYMBOL[m]} {what} (first {min(SHOWN_DIMS, d['d_model'])} of {d['d_model']} dims)")
        for k, t in enumerate(toks):
            lines.append(f"  {_label(t):>12}  {_vector(a[m][k])}")
        shown = toks[:SHOWN_COLUMNS]
        cut = f", first {SHOWN_COLUMNS} columns" if len(toks) > SHOWN_COLUMNS else ""
        lines.append(f"\ncosine between the tokens' {SYMBOL[m]} {what}{cut}")
        lines.append(f"  {'':>12} " + " ".join(f"{_label(t, 8):>8}" for t in shown))
        for k, t in enumerate(toks):
            lines.append(f"  {_label(t):>12} " + " ".join(f"{a[f'{m}_cosine'][k, j]:+8.2f}" for j in range(len(shown))))
        if d["tied"]:
            break  # the unembedding is the same matrix
    return "\n".join(lines)


MATRICES_ANALYSIS = Analysis(
    name="matrices",
    description="the chosen tokens' rows of W_E and columns of W_U: values, norms, tied or not, cosines",
    version="1",
    compute=compute_matrices,
    needs_model=True,
    params=(
        Param("tokens", str, "", "words (comma-separated), one token each; default: the tokens of prompt "
              "'prompt'"),
        Param("prompt", int, 0, "the prompt whose distinct tokens are shown when no words are given", min=0),
        Param("space", bool, True, "put one space before each word (its form inside a sentence)"),
        Param("max_tokens", int, 32, "at most this many tokens", min=1, max=1024),
    ),
    render_text=render_matrices,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(MATRICES_ANALYSIS)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    register(View(name="matrix-slice", analysis="matrices", title="W_E / W_U: tokens x dimensions",
                  make=lazy_view("workbench_plugins.matrices_view", "MatrixSliceView")))
