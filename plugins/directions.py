"""Embedding geometry and concept directions: ``embeddings``, ``direction`` and ``projection``.

- ``embeddings``: nearest tokens to chosen tokens (or to a stored direction) by cosine similarity
  and by dot product, in the embedding matrix ``W_E`` (rows) and the unembedding ``W_U``
  (columns); analogy arithmetic (``king - man + woman``, inputs excluded); a 2-D PCA map of the
  chosen tokens.
- ``direction``: a named direction in the residual stream, from contrast sets (difference of the
  two sets' mean residual stream, at every layer, fitted on a training split and scored on a
  held-out one: accuracy and AUC per layer), from two tokens' embeddings, or from a ``.npy`` /
  ``.json`` file. Stored beside the run; :func:`find_direction` gives it to other plugins (the
  interventions steer with it).
- ``projection``: the residual stream of every prompt, every layer and every position projected
  onto a named direction (and the cosine), so a user sees where in the network and the sentence a
  concept appears.

Weights come from the model reloaded by the run's provenance; residual streams from the run
(capture with ``--for direction``: ``blocks.0.hook_resid_pre`` and every ``hook_resid_post``).

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.readout import residual_rows

from workbench import hookimpl
from workbench.analysis import NAME_RE, Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.models.model import Model
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

RESIDUAL = ("blocks.0.hook_resid_pre", "*blocks.*.hook_resid_post")
MATRICES = ("embed", "unembed")
DEFAULT_WORDS = "king, queen, man, woman, Paris, London, France, England, cat, dog"


# --- tokens and their vectors -------------------------------------------------------------------


def word_token(model: Model, word: str, space: bool) -> tuple[int, str]:
    """The single token of ``word`` (with one leading space when ``space``: the form a word takes
    inside a sentence in byte-pair vocabularies). A word of several tokens is a UserError naming
    its pieces."""
    text = " " + word.strip() if space else word
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
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


def _neighbours(model: Model, matrix: Any, vector: Any, k: int, exclude: tuple[int, ...] = ()) -> dict[str, Any]:
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


# --- embeddings ---------------------------------------------------------------------------------


def compute_embeddings(ctx: AnalysisContext) -> Result:
    params = ctx.params
    model = ctx.model()
    mats = token_matrices(model)
    is_tied = tied(mats)
    if is_tied:  # one matrix: show it once
        del mats["unembed"]
    space, k = params["space"], params["k"]
    tokens: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for word in [w for w in params["tokens"].split(",") if w.strip()]:
        try:
            tid, tok = word_token(model, word, space)
        except UserError as exc:
            skipped.append({"word": word.strip(), "reason": str(exc)})
            continue
        if tid not in [t["id"] for t in tokens]:
            tokens.append({"word": word.strip(), "token": tok, "id": tid})
    data: dict[str, Any] = {
        "model": ctx.run.model_info.get("name"), "matrices": list(mats), "space": space, "k": k,
        "tied": is_tied,
        "tokens": tokens, "skipped": skipped,
        "neighbours": {m: [_neighbours(model, M, M[t["id"]], k, (t["id"],)) for t in tokens]
                       for m, M in mats.items()},
        "analogy": None, "direction": None, "map": None,
    }
    if params["analogy"].strip():
        data["analogy"] = _analogy(model, mats, params["analogy"], space, k)
    if params["direction"]:
        d = find_direction(ctx.run, params["direction"])
        data["direction"] = {"name": d.name, "layer": d.layer,
                             **{m: _neighbours(model, M, d.vector, k) for m, M in mats.items()}}
    if len(tokens) >= 3:
        ids = [t["id"] for t in tokens]
        data["map"] = {"ids": ids, "tokens": [t["token"] for t in tokens]}
        for m, M in mats.items():
            xy, share = pca_2d(M[ids].double().cpu().numpy())
            data["map"][m] = {"xy": xy.tolist(), "explained": share}
    return Result(data=data)


def _analogy(model: Model, mats: dict[str, Any], text: str, space: bool, k: int) -> dict[str, Any]:
    terms: list[dict[str, Any]] = []
    try:
        for sign, word in parse_expression(text):
            tid, tok = word_token(model, word, space)
            terms.append({"sign": sign, "word": word, "token": tok, "id": tid})
    except UserError as exc:
        return {"expression": text, "skipped": str(exc)}
    out: dict[str, Any] = {"expression": text, "terms": terms}
    exclude = tuple(int(t["id"]) for t in terms)
    for m, M in mats.items():
        vec = sum(t["sign"] * M[t["id"]] for t in terms)
        out[m] = _neighbours(model, M, vec, k, exclude)
    return out


def render_embeddings(result: Result) -> str:
    d = result.data
    lines = [f"token vectors of {d['model']}: {', '.join(d['matrices'])}"
             + (" (tied: the unembedding is the same matrix)" if d["tied"] else "")]
    for s in d["skipped"]:
        lines.append(f"skipped {s['word']!r}: {s['reason']}")

    def row(items: list[dict[str, Any]]) -> str:
        return ", ".join(f"{x['token']!r} {x['score']:.3f}" for x in items)

    for m in d["matrices"]:
        lines.append(f"\nnearest tokens in {m} (cosine | dot)")
        for t, nb in zip(d["tokens"], d["neighbours"][m]):
            lines.append(f"  {t['token']!r:>12}  {row(nb['cosine'][:6])}")
            lines.append(f"  {'':>12}  {row(nb['dot'][:6])}")
    a = d["analogy"]
    if a is not None:
        if "skipped" in a:
            lines.append(f"\nanalogy {a['expression']!r} skipped: {a['skipped']}")
        else:
            for m in d["matrices"]:
                lines.append(f"\n{a['expression']} in {m}: cosine {row(a[m]['cosine'][:5])}")
                lines.append(f"{'':>{len(a['expression']) + len(m) + 4}}dot    {row(a[m]['dot'][:5])}")
    if d["direction"] is not None:
        x = d["direction"]
        for m in d["matrices"]:
            lines.append(f"\ndirection {x['name']!r} in {m}: cosine {row(x[m]['cosine'][:8])}")
    if d["map"] is not None:
        for m in d["matrices"]:
            e = d["map"][m]["explained"]
            lines.append(f"\n2-D PCA of the tokens in {m} ({e[0]:.0%} + {e[1]:.0%} of the variance)")
            for tok, (x, y) in zip(d["map"]["tokens"], d["map"][m]["xy"]):
                lines.append(f"  {tok!r:>12}  {x:+8.3f} {y:+8.3f}")
    return "\n".join(lines)


# --- residual features --------------------------------------------------------------------------


def content_span(run: Run, i: int) -> tuple[int, int]:
    """Positions ``[start, end)`` of prompt ``i``'s own input tokens: without the special tokens
    the model's BOS policy adds before (``<s>``, ``[CLS]``) and after (``[SEP]``), without
    generated tokens, and, in a decoder, without the first position, which decoders use as an
    attention sink (on SmolLM2 its residual norm is about 22,600 against about 250 elsewhere:
    it would swamp any mean)."""
    bos = run.model_info.get("bos") or {}
    pre = len(bos["prefix"]) if "prefix" in bos else int(bos.get("policy") == "prepend")
    if (run.settings.get("family") or run.model_info.get("family")) == "decoder":
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


# --- direction ----------------------------------------------------------------------------------


def _load_file(path: str, d_model: int) -> np.ndarray:
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


def _choose_layer(choice: str, labels: list[str], scores: list[float] | None) -> int:
    if choice == "best":
        if not scores:
            raise UserError("layer 'best' needs labelled prompts to score the layers by; give a layer label "
                            f"({', '.join(labels)})")
        return int(np.nanargmax(np.asarray(scores, dtype=np.float64)))
    if choice not in labels:
        raise UserError(f"no layer {choice!r} in this run (layers: {', '.join(labels)})")
    return labels.index(choice)


def compute_direction(ctx: AnalysisContext) -> Result:
    run, params = ctx.run, ctx.params
    source = params["source"]
    _check_name(params["name"])  # before any work
    labels_, hooks = residual_rows(run)
    if not hooks:
        raise UserError(f"{run.final_path.name} stores no residual stream (capture with --for direction)")
    d_model = int(run.model_info["d_model"])
    data: dict[str, Any] = {"source": source, "rows": labels_, "hooks": hooks, "d_model": d_model,
                            "contrast": None, "tokens": None, "file": None, "not_scored": None}
    arrays: dict[str, np.ndarray] = {}
    single: np.ndarray | None = None
    """The vector of a source that gives one for every layer (tokens, a 1-D file)."""
    x, y, test = np.zeros(0), np.zeros(0, np.int8), np.zeros(0, bool)
    sets = None
    if source == "contrast" or any(params["field"] in run.metadata(i) for i in ctx.prompts):
        try:
            sets = contrast_sets(ctx)
        except UserError as exc:
            if source == "contrast" or params["positive"] or params["negative"]:
                raise
            data["not_scored"] = str(exc)  # a fixed vector is scored only on exactly two sets
    have_sets = sets is not None
    if sets is not None:
        chosen, y, pos, neg = sets
        rng = np.random.default_rng(params["seed"])
        if params["shuffle"]:
            y = rng.permutation(y)
        test = split(y, params["holdout"], rng)
        x = np.zeros((len(chosen), len(hooks), d_model), np.float32)  # prompts x layers x d_model
        for done, i in enumerate(chosen):
            x[done] = pooled(run, i, hooks, params["pool"])
            ctx.progress(done + 1, len(chosen))
        data["contrast"] = {
            "field": params["field"], "positive": pos, "negative": neg, "pool": params["pool"],
            "holdout": params["holdout"], "seed": params["seed"], "shuffled": params["shuffle"],
            "n_positive": int((y == 1).sum()), "n_negative": int((y == 0).sum()),
            "n_test_positive": int((test & (y == 1)).sum()), "n_test_negative": int((test & (y == 0)).sum()),
            "evaluated_on": "held-out prompts" if test.any() else "the training prompts (holdout 0)",
        }
        arrays.update(prompts=np.asarray(chosen, np.int32), labels=y, test=test)
    if source == "contrast":
        if min((~test & (y == 1)).sum(), (~test & (y == 0)).sum()) < 1:
            raise UserError("each set needs at least one training prompt")
        train = ~test
        per_layer = x[train & (y == 1)].mean(0, dtype=np.float64) - x[train & (y == 0)].mean(0, dtype=np.float64)
    elif source == "tokens":
        model = ctx.model()
        if not params["a"] or not params["b"]:
            raise UserError(f"source 'tokens' needs two words: --param {ctx.analysis.name}.a=... and .b=...")
        matrix = token_matrices(model).get(params["matrix"])
        if matrix is None:
            raise UserError(f"{model.name} has no trained unembedding; use matrix=embed")
        ia, ta = word_token(model, params["a"], params["space"])
        ib, tb = word_token(model, params["b"], params["space"])
        single = (matrix[ia].double() - matrix[ib].double()).cpu().numpy()
        per_layer = np.broadcast_to(single, (len(hooks), d_model))
        data["tokens"] = {"a": ta, "a_id": ia, "b": tb, "b_id": ib, "matrix": params["matrix"]}
    else:
        if not params["file"]:
            raise UserError(f"source 'file' needs --param {ctx.analysis.name}.file=PATH (.npy or .json)")
        arr = _load_file(params["file"], d_model)
        if arr.ndim == 2 and len(arr) != len(hooks):
            raise UserError(f"direction file {params['file']} has {len(arr)} rows; this run has {len(hooks)} "
                            f"residual layers ({', '.join(labels_)})")
        single = arr if arr.ndim == 1 else None
        per_layer = arr if arr.ndim == 2 else np.broadcast_to(arr, (len(hooks), d_model))
        data["file"] = str(Path(params["file"]).expanduser().resolve())
    layers = []
    if have_sets:
        for r, label in enumerate(labels_):
            layers.append({"layer": label, **separation(x[:, r].astype(np.float64), y, test, per_layer[r]),
                           "norm": float(np.linalg.norm(per_layer[r]))})
        arrays["scores"] = np.stack([x[:, r].astype(np.float64) @ _unit(per_layer[r]) for r in range(len(hooks))],
                                    1).astype(np.float32)
    if single is not None and params["layer"] == "best":
        row, vector = None, single
    else:
        row = _choose_layer(params["layer"], labels_, [rec["auc"] for rec in layers] if layers else None)
        vector = per_layer[row]
    for rec, v in zip(layers, per_layer):
        rec["cosine_to_chosen"] = float(_unit(v) @ _unit(vector))
    name = params["name"] or _default_name(data, params)
    _check_name(name)
    data.update(name=name, layer=labels_[row] if row is not None else None, layer_index=row,
                norm=float(np.linalg.norm(vector)), layers=layers)
    arrays["vector"] = vector.astype(np.float32)
    arrays["directions"] = np.ascontiguousarray(per_layer, dtype=np.float32)
    return Result(data=data, arrays=arrays)


def _check_name(name: str) -> None:
    if name and not NAME_RE.match(name):
        raise UserError(f"direction name {name!r}: use lower case letters, digits, '-', '_', '.'")


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _default_name(data: dict[str, Any], params: dict[str, Any]) -> str:
    if data["source"] == "contrast":
        c = data["contrast"]
        raw = f"{c['positive']}-vs-{c['negative']}" + ("-shuffled" if c["shuffled"] else "")
    elif data["source"] == "tokens":
        raw = f"{data['tokens']['a']}-minus-{data['tokens']['b']}"
    else:
        raw = Path(params["file"]).stem
    return re.sub(r"[^a-z0-9_.-]+", "_", raw.strip().lower()).strip("_.-") or "direction"


def render_direction(result: Result) -> str:
    d = result.data
    head = f"direction {d['name']!r} ({d['source']}"
    if d["tokens"]:
        t = d["tokens"]
        head += f": {t['matrix']}[{t['a']!r}] - {t['matrix']}[{t['b']!r}]"
    if d["file"]:
        head += f": {d['file']}"
    head += f"), |v| = {d['norm']:.3f}, " + (f"taken at layer {d['layer']}" if d["layer"] is not None
                                              else "the same vector at every layer")
    lines = [head]
    if d.get("not_scored"):
        lines.append(f"not scored on the prompts: {d['not_scored']}")
    c = d["contrast"]
    if c:
        lines.append(f"sets: {c['field']}={c['positive']!r} ({c['n_positive']}) vs {c['negative']!r} "
                     f"({c['n_negative']}), pooled by {c['pool']}; scored on {c['evaluated_on']} "
                     f"({c['n_test_positive']} + {c['n_test_negative']})"
                     + ("; LABELS SHUFFLED (control)" if c["shuffled"] else ""))
        lines.append(f"{'layer':>6} {'AUC':>6} {'acc':>6} {'train AUC':>9} {'|v|':>8} {'cos':>6}")
        for x in d["layers"]:
            mark = " <" if x["layer"] == d["layer"] else ""
            lines.append(f"{x['layer']:>6} {x['auc']:6.3f} {x['accuracy']:6.1%} {x['train_auc']:9.3f} "
                         f"{x['norm']:8.3f} {x['cosine_to_chosen']:6.3f}{mark}")
    return "\n".join(lines)


@dataclass
class Direction:
    """A named direction stored beside a run (the ``direction`` analysis's result)."""

    name: str
    vector: np.ndarray
    """``(d_model,)`` float64: the direction as made (a difference of means keeps its length)."""
    per_layer: np.ndarray
    """``(rows, d_model)``: one vector per residual layer (``rows``); the same one repeated for a
    direction from tokens or a single-vector file."""
    rows: list[str]
    layer: str | None
    """The layer label ``vector`` was taken at; None for a vector meant for every layer."""
    source: str
    stored: StoredResult

    @property
    def unit(self) -> np.ndarray:
        return _unit(self.vector)

    def at(self, layer: str) -> np.ndarray:
        """The vector fitted at residual layer ``layer`` (``"embed"``, ``"0"``, ...)."""
        if layer not in self.rows:
            raise UserError(f"direction {self.name!r} has no layer {layer!r} (layers: {', '.join(self.rows)})")
        return self.per_layer[self.rows.index(layer)]


def directions(run: Run) -> dict[str, StoredResult]:
    """Every direction stored beside ``run`` by name (the newest of each name), computed on this
    run."""
    out: dict[str, StoredResult] = {}
    for r in run.results():
        if r.analysis == "direction" and r.ok and r.meta.get("run_id") == run.run_id:
            out.setdefault(str(r.data.get("name")), r)
    return out


def find_direction(run: Run, name: str, stored_directions: dict[str, StoredResult] | None = None) -> Direction:
    """The direction called ``name`` stored beside ``run`` (looked up in ``stored_directions``, a
    :func:`directions` listing the caller already has, else in a fresh one); a UserError naming the
    stored ones when there is none."""
    found = directions(run) if stored_directions is None else stored_directions
    stored = found.get(name)
    if stored is None:
        have = ", ".join(sorted(found)) or "none"
        raise UserError(f"no direction named {name!r} beside {run.final_path.name} (stored: {have}); make one "
                        f"with 'workbench analyze {run.final_path.name} direction --param direction.name={name}'")
    a = stored.arrays
    return Direction(name=name, vector=a["vector"].astype(np.float64), per_layer=a["directions"].astype(np.float64),
                     rows=list(stored.data["rows"]), layer=stored.data["layer"], source=stored.data["source"],
                     stored=stored)


# --- projection ---------------------------------------------------------------------------------


def compute_projection(ctx: AnalysisContext) -> Result:
    run, params = ctx.run, ctx.params
    name = params["direction"]
    stored = directions(run)
    if not name:
        if len(stored) != 1:
            raise UserError(f"choose a direction with --param {ctx.analysis.name}.direction=NAME "
                            f"(stored: {', '.join(sorted(stored)) or 'none; make one with the direction analysis'})")
        [name] = stored
    d = find_direction(run, name, stored)
    labels_, hooks = residual_rows(run)
    if labels_ != d.rows and params["per_layer"]:
        raise UserError(f"direction {name!r} was made on layers {d.rows}; this run has {labels_}")
    units = np.stack([_unit(d.at(lb)) if params["per_layer"] else d.unit for lb in labels_])
    field = (d.stored.data.get("contrast") or {}).get("field")
    total = sum(run.n_tokens(i) for i in ctx.prompts)
    proj = np.zeros((total, len(hooks)), np.float32)
    cos = np.zeros_like(proj)
    records, off = [], 0
    for done, i in enumerate(ctx.prompts):
        n = run.n_tokens(i)
        for r, hook in enumerate(hooks):
            act = run.activation(hook, i).astype(np.float64)
            p = act @ units[r]
            norms = np.linalg.norm(act, axis=1)
            proj[off : off + n, r] = p
            cos[off : off + n, r] = np.where(norms > 0, p / np.maximum(norms, 1e-30), 0.0)
        start, end = content_span(run, i)
        records.append({"index": i, "id": run.prompt_id(i), "offset": off, "n_tokens": n, "span": [start, end],
                        "label": run.metadata(i).get(field) if field else None,
                        "mean": proj[off + start : off + end].mean(0).tolist()})
        off += n
        ctx.progress(done + 1, len(ctx.prompts))
    data = {"direction": name, "source": d.source, "direction_layer": d.layer, "per_layer": params["per_layer"],
            "field": field, "rows": labels_, "prompts": records,
            "separation": [{k: x[k] for k in ("layer", "auc", "accuracy")} for x in d.stored.data["layers"]]}
    return Result(data=data, arrays={"projection": proj, "cosine": cos})


def render_projection(result: Result) -> str:
    d = result.data
    rows = d["rows"]
    lines = [f"projection onto direction {d['direction']!r}"
             + (" (each layer's own vector)" if d["per_layer"] else
                f" (its vector from layer {d['direction_layer']})" if d["direction_layer"] else "")
             + ": mean over each prompt's own tokens, per layer"]
    shown = list(range(0, len(rows), max(1, len(rows) // 10)))
    if len(rows) - 1 not in shown:
        shown.append(len(rows) - 1)
    lines.append(f"{'prompt':>6} {'label':>10} " + " ".join(f"{rows[r]:>7}" for r in shown))
    for p in d["prompts"]:
        lines.append(f"{p['index']:>6} {p['label'] if p['label'] is not None else ''!s:>10} "
                     + " ".join(f"{p['mean'][r]:7.2f}" for r in shown))
    if d["separation"]:
        by = {x["layer"]: x for x in d["separation"]}
        lines.append(f"{'':>6} {'AUC':>10} " + " ".join(f"{by[rows[r]]['auc']:7.3f}" if rows[r] in by else f"{'':>7}"
                                                     for r in shown))
    return "\n".join(lines)


# --- declarations -------------------------------------------------------------------------------

EMBEDDINGS = Analysis(
    name="embeddings",
    description="nearest tokens by cosine and dot product in W_E and W_U, analogies, a 2-D PCA map",
    version="1",
    compute=compute_embeddings,
    needs_model=True,
    params=(
        Param("tokens", str, DEFAULT_WORDS, "words (comma-separated) to find neighbours of and to map"),
        Param("space", bool, True, "put one space before each word (its form inside a sentence)"),
        Param("k", int, 10, "neighbours per token", min=1, max=1000),
        Param("analogy", str, "king - man + woman", "a - b + c: nearest tokens to the sum, inputs excluded"),
        Param("direction", str, "", "also list the tokens nearest this stored direction"),
    ),
    render_text=render_embeddings,
)

DIRECTION = Analysis(
    name="direction",
    description="a named residual-stream direction from contrast sets, two tokens or a file; accuracy/AUC per layer",
    version="1",
    compute=compute_direction,
    needs=RESIDUAL,
    needs_model=True,
    families=("decoder", "encoder"),
    auto=False,
    params=(
        Param("name", str, "", "name to store it under (default: from its sets, tokens or file)"),
        Param("source", str, "contrast", "where it comes from (tokens: reloads the model)",
              choices=("contrast", "tokens", "file")),
        Param("field", str, "label", "the prompts' JSONL field whose values define the two sets"),
        Param("positive", str, "", "the field's value of the set the direction points to (default: the first "
              "value in prompt order)"),
        Param("negative", str, "", "the field's value of the other set"),
        Param("pool", str, "mean", "a prompt's vector: mean over its own tokens, or its last token",
              choices=("mean", "last")),
        Param("holdout", float, 0.25, "share of each set held out for scoring", min=0.0, max=0.9),
        Param("seed", int, 0, "seed of the split (and of the shuffle)"),
        Param("shuffle", bool, False, "shuffle the labels first (a control: AUC should be about 0.5)"),
        Param("layer", str, "best", "layer label whose vector is the direction ('best': highest held-out AUC)"),
        Param("a", str, "", "source tokens: the word the direction points to"),
        Param("b", str, "", "source tokens: the word it points away from"),
        Param("matrix", str, "embed", "source tokens: embedding rows or unembedding columns",
              choices=MATRICES),
        Param("space", bool, True, "source tokens: put one space before each word"),
        Param("file", str, "", "source file: .npy or .json, (d_model,) or (layers, d_model)"),
    ),
    render_text=render_direction,
)

PROJECTION = Analysis(
    name="projection",
    description="the residual stream at every layer and position projected onto a named direction",
    version="1",
    compute=compute_projection,
    needs=RESIDUAL,
    families=("decoder", "encoder"),
    auto=False,
    params=(
        Param("direction", str, "", "the stored direction's name (default: the only one stored)"),
        Param("per_layer", bool, False, "project each layer onto the vector fitted at that layer"),
    ),
    render_text=render_projection,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    for analysis in (EMBEDDINGS, DIRECTION, PROJECTION):
        register(analysis)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    register(View(name="embedding-neighbours", analysis="embeddings", title="nearest tokens and analogies",
                  make=lazy_view("workbench_plugins.directions_view", "NeighboursView")))
    register(View(name="embedding-map", analysis="embeddings", title="2-D map of the tokens (PCA)",
                  make=lazy_view("workbench_plugins.directions_view", "MapView")))
    register(View(name="direction-layers", analysis="direction", title="how well the direction separates, per layer",
                  make=lazy_view("workbench_plugins.directions_view", "SeparationView")))
    register(View(name="projection-heatmap", analysis="projection", title="projection (layers x positions)",
                  make=lazy_view("workbench_plugins.directions_view", "ProjectionView")))
