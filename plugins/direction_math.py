"""The numbers behind the directions plugin: token vectors, residual-stream statistics, direction
files.

- Token vectors: a word's single token, the embedding and unembedding matrices, nearest tokens by
  cosine or dot product, analogy expressions, a 2-D PCA.
- Residual-stream statistics: each prompt's own tokens, pooled residual vectors, the contrast sets
  of a metadata field, stratified held-out splits, AUC and how well a vector separates two sets.
- Direction vectors: loading one from a ``.npy`` / ``.json`` file, and unit vectors.

The analyses (``embeddings``, ``direction``, ``projection``) and the stored :class:`Direction`
are in ``directions.py``; the interventions plugin steers with these vectors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.analysis import AnalysisContext
    from workbench.models.model import Model
    from workbench.store.reader import Run


# --- tokens and their vectors --------------------------------------------------------------------


class UnknownWord(UserError):
    """A word the tokenizer maps to its unknown (or padding) token: it is not in the vocabulary
    (a word-level vocabulary such as the toys' maps every other word to ``<pad>``)."""

    def __init__(self, word: str, token: str) -> None:
        super().__init__(f"{word!r} is not in the vocabulary (the tokenizer maps it to {token!r})")
        self.word, self.token = word, token


def unknown_ids(tokenizer: Any) -> set[int]:
    """The ids a tokenizer gives text it has no token for: its unknown and padding tokens."""
    ids = (getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "pad_token_id", None))
    return {int(i) for i in ids if i is not None}


def word_token(model: Model, word: str, space: bool) -> tuple[int, str]:
    """The single token of ``word`` (with one leading space when ``space``: the form a word takes
    inside a sentence in byte-pair vocabularies). A word of several tokens is a UserError naming
    its pieces; a word the tokenizer maps to its unknown or padding token is an
    :class:`UnknownWord` (unless the word is that token's own text)."""
    text = " " + word.strip() if space else word
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    unknown = [t for t in ids if t in unknown_ids(model.tokenizer)]
    if unknown:
        token = model.tokenizer.decode([unknown[0]])
        if token.strip() != text.strip():
            raise UnknownWord(word.strip(), token)
    if len(ids) != 1:
        pieces = ", ".join(repr(model.tokenizer.decode([t])) for t in ids) or "nothing"
        raise UserError(f"{text!r} is {len(ids)} tokens ({pieces}), not one")
    return int(ids[0]), model.tokenizer.decode([ids[0]])


def token_matrices(model: Model) -> dict[str, Any]:
    """``{"embed": W_E, "unembed": W_U^T}``, each a float32 torch tensor ``(d_vocab, d_model)``
    whose row ``t`` is token ``t``'s vector. The unembedding is left out for a checkpoint without a
    trained LM head (its ``W_U`` would be noise)."""
    import torch

    b = model.bridge
    out = {"embed": b.W_E.detach().to(torch.float32)}
    unembed = getattr(b, "unembed", None)
    if model.info.has_lm_head and unembed is not None:
        out["unembed"] = unembed.W_U.detach().to(torch.float32).T
    return out


def tied(mats: dict[str, Any]) -> bool:
    """Whether the unembedding is the embedding matrix itself (SmolLM2, Gemma, GPT-2)."""
    import torch

    return "unembed" in mats and mats["unembed"].shape == mats["embed"].shape and bool(
        torch.equal(mats["unembed"], mats["embed"]))


def nearest(matrix: Any, vector: Any, k: int, metric: str, exclude: tuple[int, ...] = ()) -> list[tuple[int, float]]:
    """The ``k`` rows of ``matrix`` nearest ``vector`` by ``cosine`` or ``dot``, best first, ids
    in ``exclude`` left out: ``[(id, score)]``. Rows of norm 0 have cosine 0."""
    import torch

    v = torch.as_tensor(vector, dtype=matrix.dtype, device=matrix.device)
    with torch.inference_mode():
        scores = matrix @ v
        if metric == "cosine":
            norms = matrix.norm(dim=1) * v.norm()
            scores = torch.where(norms > 0, scores / norms.clamp_min(1e-30), torch.zeros_like(scores))
        if exclude:
            scores[list(exclude)] = -torch.inf
        top = torch.topk(scores, min(k, int(scores.shape[0]) - len(exclude)))
    return [(int(i), float(s)) for i, s in zip(top.indices.tolist(), top.values.tolist())]


def neighbours(model: Model, matrix: Any, vector: Any, k: int, exclude: tuple[int, ...] = ()) -> dict[str, Any]:
    """The ``k`` tokens nearest ``vector`` by cosine and by dot product:
    ``{"cosine": [{"id", "token", "score"}, ...], "dot": [...]}``."""
    out = {}
    for metric in ("cosine", "dot"):
        found = nearest(matrix, vector, k, metric, exclude)
        strs = [model.tokenizer.decode([i]) for i, _ in found]
        out[metric] = [{"id": i, "token": s, "score": score} for (i, score), s in zip(found, strs)]
    return out


def parse_expression(text: str) -> list[tuple[int, str]]:
    """``"king - man + woman"`` -> ``[(1, "king"), (-1, "man"), (1, "woman")]``. Operators stand
    between spaces, so words may contain ``-``."""
    parts = re.split(r"\s+([+-])\s+", " " + text.strip() + " ")
    first = parts[0].strip()
    if not first or len(parts) < 3:
        raise UserError(f"analogy {text!r}: write it as 'a - b + c' (terms between ' - ' and ' + ')")
    terms = [(1, first)]
    for sign, word in zip(parts[1::2], parts[2::2]):
        if not word.strip():
            raise UserError(f"analogy {text!r}: a term is empty")
        terms.append((1 if sign == "+" else -1, word.strip()))
    return terms


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Coordinates of the rows of ``x`` on its first two principal components (centred; each
    component's sign chosen so its largest coordinate is positive) and their shares of the
    variance."""
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    xy = xc @ vt[:2].T
    for j in range(xy.shape[1]):
        if xy[np.argmax(np.abs(xy[:, j])), j] < 0:
            xy[:, j] = -xy[:, j]
    var = s**2
    share = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
    return xy, share


def analogy(model: Model, mats: dict[str, Any], text: str, space: bool, k: int) -> dict[str, Any]:
    """The tokens nearest ``a - b + c`` (``text``) in each matrix of ``mats``, the expression's own
    tokens left out; ``{"expression", "skipped"}`` when a term is not one token (and
    ``"unknown"``: the terms not in the vocabulary, when that is why)."""
    terms: list[dict[str, Any]] = []
    unknown: list[UnknownWord] = []
    try:
        for sign, word in parse_expression(text):
            try:
                tid, tok = word_token(model, word, space)
            except UnknownWord as exc:  # every such term is named, not only the first
                unknown.append(exc)
                continue
            terms.append({"sign": sign, "word": word, "token": tok, "id": tid})
    except UserError as exc:
        return {"expression": text, "skipped": str(exc)}
    if unknown:
        words = ", ".join(repr(u.word) for u in unknown)
        return {"expression": text, "unknown": [u.word for u in unknown],
                "skipped": f"not in the vocabulary: {words} (the tokenizer maps "
                           f"{'it' if len(unknown) == 1 else 'them'} to {unknown[0].token!r})"}
    out: dict[str, Any] = {"expression": text, "terms": terms}
    exclude = tuple(int(t["id"]) for t in terms)
    for m, M in mats.items():
        vec = sum(t["sign"] * M[t["id"]] for t in terms)
        out[m] = neighbours(model, M, vec, k, exclude)
    return out


# --- residual-stream statistics ------------------------------------------------------------------


def content_span(run: Run, i: int) -> tuple[int, int]:
    """Positions ``[start, end)`` of prompt ``i``'s own input tokens: without the special tokens
    the model's BOS policy adds before (``<s>``, ``[CLS]``) and after (``[SEP]``), without
    generated tokens, and, in a decoder, without the first position, which decoders use as an
    attention sink (on SmolLM2 its residual norm is about 22,600 against about 250 elsewhere:
    it would swamp any mean)."""
    bos = run.model_info.get("bos") or {}
    pre = len(bos["prefix"]) if "prefix" in bos else int(bos.get("policy") == "prepend")
    if run.family == "decoder":
        pre = max(pre, 1)
    suf = len(bos.get("suffix") or [])
    n = run.n_input_tokens(i)
    start = min(pre, n - 1)
    return start, max(start + 1, n - suf)


def pooled(run: Run, i: int, hooks: list[str], pool: str) -> np.ndarray:
    """Prompt ``i``'s residual stream at each hook, ``(rows, d_model)`` float64: the mean over its
    own tokens (``pool="mean"``) or its last own token (``"last"``)."""
    start, end = content_span(run, i)
    rows = []
    for hook in hooks:
        act = run.activation(hook, i)
        rows.append(act[start:end].astype(np.float64).mean(0) if pool == "mean" else act[end - 1].astype(np.float64))
    return np.stack(rows)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 positive, 0 negative): the
    probability that a random positive outscores a random negative, ties counting half
    (Mann-Whitney U with average ranks)."""
    pos, n = labels == 1, len(scores)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(n)
    ranks[order] = np.arange(1, n + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def separation(x: np.ndarray, labels: np.ndarray, test: np.ndarray, vector: np.ndarray) -> dict[str, float]:
    """How well projecting ``x`` ``(n, d)`` onto ``vector`` separates the labels: AUC on the
    test rows (on all rows when none is held out) and on the training rows, and the accuracy of
    the threshold halfway between the training classes' mean projections, on the test rows."""
    norm = float(np.linalg.norm(vector))
    s = x @ (vector / norm) if norm > 0 else np.zeros(len(x))
    train = ~test if test.any() else np.ones(len(x), bool)
    held = test if test.any() else train
    mp, mn = s[train & (labels == 1)].mean(), s[train & (labels == 0)].mean()
    pred = (s > (mp + mn) / 2) if mp >= mn else (s < (mp + mn) / 2)
    return {"auc": auc(s[held], labels[held]), "accuracy": float((pred[held] == (labels[held] == 1)).mean()),
            "train_auc": auc(s[train], labels[train])}


def split(labels: np.ndarray, holdout: float, rng: np.random.Generator) -> np.ndarray:
    """A stratified held-out mask: ``holdout`` of each class (at least one each when > 0)."""
    test = np.zeros(len(labels), bool)
    if holdout <= 0:
        return test
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        n_test = max(1, round(holdout * len(idx)))
        if len(idx) - n_test < 1:
            raise UserError(f"too few prompts in a set to hold {holdout:g} of them out ({len(idx)} in it)")
        test[rng.permutation(idx)[:n_test]] = True
    return test


def contrast_sets(ctx: AnalysisContext) -> tuple[list[int], np.ndarray, str, str]:
    """(prompt indices, labels 1/0, positive value, negative value) from the ``field`` parameter
    of each prompt's metadata."""
    run, field = ctx.run, ctx.params["field"]
    raw = {i: run.metadata(i).get(field) for i in ctx.prompts}
    values = {i: str(v) for i, v in raw.items() if v is not None}
    if not values:
        raise UserError(f"no prompt has a {field!r} field: give prompts as JSONL, e.g. "
                        f'{{"prompt": "...", "{field}": "positive"}}')
    distinct = sorted(set(values.values()))
    pos, neg = ctx.params["positive"], ctx.params["negative"]
    for v in (pos, neg):
        if v and v not in distinct:
            raise UserError(f"no prompt has {field}={v!r} (values: {', '.join(map(repr, distinct))})")
    if not pos or not neg:
        rest = [v for v in distinct if v not in (pos, neg)]
        if len(rest) != 2 - bool(pos) - bool(neg):
            raise UserError(f"field {field!r} has the values {', '.join(map(repr, distinct))}: choose two with "
                            f"--param {ctx.analysis.name}.positive=... and .negative=...")
        order = list(dict.fromkeys(v for v in values.values() if v in rest))  # first seen first
        pos, neg = pos or order[0], neg or order[-1]
    chosen = [i for i, v in values.items() if v in (pos, neg)]
    return chosen, np.array([values[i] == pos for i in chosen], np.int8), pos, neg


# --- direction vectors ---------------------------------------------------------------------------


def load_direction_file(path: str, d_model: int) -> np.ndarray:
    """A direction from a ``.npy`` or ``.json`` file: ``(d_model,)`` or one row per residual layer
    ``(layers, d_model)``, float64; a UserError saying what is wrong with any other file."""
    p = Path(path).expanduser()
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif p.suffix == ".json":
            arr = np.asarray(json.loads(p.read_text(encoding="utf-8")), dtype=np.float64)
        else:
            raise UserError(f"direction file {p}: use .npy or .json (a list of {d_model} numbers)")
    except FileNotFoundError:
        raise UserError(f"direction file not found: {p}") from None
    except (ValueError, TypeError, OSError) as exc:
        raise UserError(f"direction file {p} is not a numeric array ({exc})") from None
    if arr.dtype.kind not in "fiu" or arr.shape[-1:] != (d_model,) or arr.ndim not in (1, 2):
        raise UserError(f"direction file {p} holds shape {arr.shape}; this model needs ({d_model},) "
                        f"or (layers, {d_model})")
    if not np.isfinite(arr).all():
        raise UserError(f"direction file {p} holds NaN or infinite values")
    return arr.astype(np.float64)


def unit_vector(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1 (a zero vector is returned as it is)."""
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def choose_layer(choice: str, labels: list[str], scores: list[float] | None) -> int:
    """The row of ``labels`` to take the direction from: ``choice`` (a layer label), or with
    ``best`` the row of the highest ``scores`` (held-out AUC)."""
    if choice == "best":
        if not scores:
            raise UserError("layer 'best' needs labelled prompts to score the layers by; give a layer label "
                            f"({', '.join(labels)})")
        return int(np.nanargmax(np.asarray(scores, dtype=np.float64)))
    if choice not in labels:
        raise UserError(f"no layer {choice!r} in this run (layers: {', '.join(labels)})")
    return labels.index(choice)
