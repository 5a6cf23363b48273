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

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.direction_math import (
    UnknownWord,
    analogy,
    auc,  # noqa: F401 - public here too
    choose_layer,
    content_span,
    contrast_sets,
    load_direction_file,
    neighbours,
    pca_2d,
    pooled,
    separation,
    split,
    tied,
    token_matrices,
    unit_vector,
    word_token,
)
from workbench_plugins.readout import residual_rows

from workbench import hookimpl
from workbench.analysis import NAME_RE, Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.hooknames import resid_pre
from workbench.store.results import list_results
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

RESIDUAL = (resid_pre(0), "*blocks.*.hook_resid_post")
MATRICES = ("embed", "unembed")
DEFAULT_WORDS = "king, queen, man, woman, Paris, London, France, England, cat, dog"
DEFAULT_ANALOGY = "king - man + woman"


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
    unknown: list[UnknownWord] = []
    for word in [w for w in params["tokens"].split(",") if w.strip()]:
        try:
            tid, tok = word_token(model, word, space)
        except UserError as exc:
            skipped.append({"word": word.strip(), "reason": str(exc)})
            if isinstance(exc, UnknownWord):
                unknown.append(exc)
            continue
        if tid not in [t["id"] for t in tokens]:
            tokens.append({"word": word.strip(), "token": tok, "id": tid})
    data: dict[str, Any] = {
        "model": ctx.run.model_info.get("name"), "matrices": list(mats), "space": space, "k": k,
        "tied": is_tied,
        "tokens": tokens, "skipped": skipped, "warnings": [],
        "neighbours": {m: [neighbours(model, M, M[t["id"]], k, (t["id"],)) for t in tokens]
                       for m, M in mats.items()},
        "analogy": None, "direction": None, "map": None,
    }
    if params["analogy"].strip():
        data["analogy"] = analogy(model, mats, params["analogy"], space, k)
    _unknown_words(ctx, model.name, data, unknown)
    if params["direction"]:
        d = find_direction(ctx.run, params["direction"])
        data["direction"] = {"name": d.name, "layer": d.layer,
                             **{m: neighbours(model, M, d.vector, k) for m, M in mats.items()}}
    if len(tokens) >= 3:
        ids = [t["id"] for t in tokens]
        data["map"] = {"ids": ids, "tokens": [t["token"] for t in tokens]}
        for m, M in mats.items():
            xy, share = pca_2d(M[ids].double().cpu().numpy())
            data["map"][m] = {"xy": xy.tolist(), "explained": share}
    return Result(data=data)


def _unknown_words(ctx: AnalysisContext, model: str, data: dict[str, Any], unknown: list[UnknownWord]) -> None:
    """Words the tokenizer maps to its unknown or padding token are skipped (never looked up as
    that token): a warning names them, on stderr and in ``data["warnings"]``. When the words the
    user named leave nothing to show, a UserError instead (the default words on a small
    vocabulary only warn)."""
    a = data["analogy"]
    words = list(dict.fromkeys([u.word for u in unknown] + (a.get("unknown", []) if a else [])))
    if not words:
        return
    token = unknown[0].token if unknown else None
    message = (f"{ctx.analysis.name}: skipped {len(words)} word(s) not in {model}'s vocabulary"
               + (f" (its tokenizer maps them to {token!r})" if token else "") + ": "
               + ", ".join(repr(w) for w in words))
    named = ctx.params["tokens"] != DEFAULT_WORDS or ctx.params["analogy"] != DEFAULT_ANALOGY
    left = data["tokens"] or (a is not None and "skipped" not in a) or ctx.params["direction"]
    if named and not left:
        raise UserError(f"{message}; nothing is left to show (choose words in its vocabulary: "
                        f"--param {ctx.analysis.name}.tokens=...)")
    data["warnings"].append(message)
    print(f"workbench: warning: {message}", file=sys.stderr)


def render_embeddings(result: Result) -> str:
    d = result.data
    lines = [f"token vectors of {d['model']}: {', '.join(d['matrices'])}"
             + (" (tied: the unembedding is the same matrix)" if d["tied"] else "")]
    lines += [f"warning: {w}" for w in d.get("warnings", [])]
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


# --- direction ----------------------------------------------------------------------------------


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
        arr = load_direction_file(params["file"], d_model)
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
        arrays["scores"] = np.stack([x[:, r].astype(np.float64) @ unit_vector(per_layer[r])
                                     for r in range(len(hooks))], 1).astype(np.float32)
    if single is not None and params["layer"] == "best":
        row, vector = None, single
    else:
        row = choose_layer(params["layer"], labels_, [rec["auc"] for rec in layers] if layers else None)
        vector = per_layer[row]
    for rec, v in zip(layers, per_layer):
        rec["cosine_to_chosen"] = float(unit_vector(v) @ unit_vector(vector))
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
        return unit_vector(self.vector)

    def at(self, layer: str) -> np.ndarray:
        """The vector fitted at residual layer ``layer`` (``"embed"``, ``"0"``, ...)."""
        if layer not in self.rows:
            raise UserError(f"direction {self.name!r} has no layer {layer!r} (layers: {', '.join(self.rows)})")
        return self.per_layer[self.rows.index(layer)]


def directions(run: Run) -> dict[str, StoredResult]:
    """Every direction stored beside ``run`` by name (the newest of each name), computed on this
    run."""
    out: dict[str, StoredResult] = {}
    for r in list_results(run):
        if r.analysis == "direction" and r.ok and r.computed_on(run):
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
    units = np.stack([unit_vector(d.at(lb)) if params["per_layer"] else d.unit for lb in labels_])
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
        Param("analogy", str, DEFAULT_ANALOGY, "a - b + c: nearest tokens to the sum, inputs excluded"),
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
