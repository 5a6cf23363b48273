"""Context shapes meaning: ``context``, one word's residual vector across the prompts it occurs in.

Given a word (``--param context.word=" bank"``), the analysis finds its first occurrence in each
prompt whose stored tokens contain it (prompts without it are skipped, with a note) and reads the
word's residual vector at every stored depth of the residual stream: the embedding
(``blocks.0.hook_resid_pre``, row ``embed``, where the run has it) and the output of every block
(``blocks.L.hook_resid_post``, rows ``0`` … ``L-1``) — the rows the logit lens reads. Then:

- the cosine similarity of the word's vectors between every pair of contexts, at every row (the
  same token id gives the same embedding, so the ``embed`` row starts at 1 on models without a
  positional embedding; attention then mixes in the context);
- with a JSONL field naming each context's sense (``field``, default ``sense``), per row: the mean
  cosine of same-sense pairs and of cross-sense pairs, the margin between them (lowest same minus
  highest cross) and the share of contexts whose nearest other context has their sense;
- the word's nearest tokens through the logit lens per context and row: the model's own final
  norm and unembedding (:class:`workbench_plugins.readout.Readout`, as ``logit-lens`` applies
  them), top ``top`` tokens with probabilities.

A word of several tokens is located as its whole token sequence, and its last token's vector is
compared (the one position that has read the whole word); the result says so. The model is
reloaded by the run's provenance (for the tokenizer and the lens); the vectors come from the run.

Registered through the ``workbench`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins.lens import EMBED_ROW, RESID_POST
from workbench_plugins.readout import Readout, residual_rows

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError
from workbench.views import View, lazy_view

if TYPE_CHECKING:
    from workbench.store.reader import Run

CONTEXT_TOKENS = 8
"""Tokens of context kept before the word (and a few after it) in each record, for display."""
SENSE_STATS = ("same", "cross", "margin", "nearest_same")
"""Per-row statistics of the labelled contexts (:func:`sense_stats`)."""
LENS_BATCH = 256
"""Vectors put through the final norm and unembedding at once (a batch's logits are
``LENS_BATCH x vocabulary`` float64)."""


# --- finding the word ---------------------------------------------------------------------------


def word_ids(model: Any, word: str) -> list[int]:
    """The token ids of ``word`` tokenized on its own, without special tokens (keep its leading
    space: inside a sentence a byte-pair vocabulary spells ``" bank"``, not ``"bank"``)."""
    return [int(t) for t in model.tokenizer(word, add_special_tokens=False)["input_ids"]]


def find_word(tokens: np.ndarray, ids: list[int]) -> int | None:
    """The position of the last token of the first occurrence of the sequence ``ids`` in
    ``tokens``, or ``None``."""
    n, m = len(tokens), len(ids)
    if m == 0 or n < m:
        return None
    hits = np.nonzero(np.asarray(tokens) == ids[0])[0]
    for start in hits.tolist():
        if start + m <= n and all(int(tokens[start + j]) == ids[j] for j in range(1, m)):
            return start + m - 1
    return None


def locate(run: Run, prompts: list[int], ids: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """``([(prompt, position of the word's last token)], [prompts without the word])``."""
    found, missing = [], []
    for i in prompts:
        pos = find_word(run.tokens(i), ids)
        if pos is None:
            missing.append(i)
        else:
            found.append((i, pos))
    return found, missing


# --- the numbers ---------------------------------------------------------------------------------


def word_vectors(run: Run, hooks: list[str], found: list[tuple[int, int]]) -> np.ndarray:
    """The stored residual vectors of the word, ``(rows, contexts, d_model)`` float32."""
    d = int(run.resolve(hooks[0]).feature_shape[0])
    x = np.zeros((len(hooks), len(found), d), np.float32)
    for c, (i, pos) in enumerate(found):
        for r, hook in enumerate(hooks):
            x[r, c] = run.activation(hook, i)[pos]
    return x


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """Cosine similarity between every pair of vectors, per row, in float64: ``(rows, n, d)`` ->
    ``(rows, n, n)``. A vector of norm 0 has cosine 0 with everything."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=-1)
    dots = np.einsum("rad,rbd->rab", x, x)
    denom = norms[:, :, None] * norms[:, None, :]
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)  # type: ignore[no-any-return]


def sense_stats(cos: np.ndarray, labels: list[str | None]) -> dict[str, Any]:
    """How the senses part, per row, over the contexts that carry a label (NaN where undefined):

    - ``same``, ``cross``: the mean cosine of same-label pairs and of cross-label pairs;
    - ``margin``: the lowest same-label cosine minus the highest cross-label one (above 0: every
      same-sense pair is closer than every cross-sense pair);
    - ``nearest_same``: the share of contexts (with another of their label and one of another)
      whose most similar other context is of their own label, strictly (a tie counts as not).

    Also ``n_same`` and ``n_cross``, the pair counts."""
    n = len(labels)
    same = [(a, b) for a, b in combinations(range(n), 2) if labels[a] is not None and labels[a] == labels[b]]
    cross = [(a, b) for a, b in combinations(range(n), 2)
             if labels[a] is not None and labels[b] is not None and labels[a] != labels[b]]
    rows = cos.shape[0]
    nan = np.full(rows, np.nan)

    def values(pairs: list[tuple[int, int]]) -> np.ndarray:
        a, b = np.array(pairs).reshape(-1, 2).T
        return cos[:, a, b]  # type: ignore[no-any-return]

    out: dict[str, Any] = {"n_same": len(same), "n_cross": len(cross),
                           "same": values(same).mean(1) if same else nan,
                           "cross": values(cross).mean(1) if cross else nan,
                           "margin": values(same).min(1) - values(cross).max(1) if same and cross else nan}
    lab = np.array([x if x is not None else "" for x in labels], dtype=object)
    has = np.array([x is not None for x in labels])
    mine = (lab[:, None] == lab[None, :]) & has[:, None] & has[None, :] & ~np.eye(n, dtype=bool)
    other = (lab[:, None] != lab[None, :]) & has[:, None] & has[None, :]
    judged = mine.any(1) & other.any(1)
    if judged.any():
        best_mine = np.where(mine[None], cos, -np.inf).max(2)  # rows x contexts
        best_other = np.where(other[None], cos, -np.inf).max(2)
        out["nearest_same"] = (best_mine > best_other)[:, judged].mean(1)
    else:
        out["nearest_same"] = nan
    return out


def lens_top(ro: Readout, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The logit lens on the word's vectors: top-``k`` token ids and probabilities per context and
    row, ``(contexts, rows, k)`` (``Readout.logits``: the model's final norm and unembedding)."""
    import torch

    rows, n, d = x.shape
    flat = x.transpose(1, 0, 2).reshape(n * rows, d)  # context-major, like the outputs
    ids = np.zeros((n * rows, k), np.int32)
    probs = np.zeros((n * rows, k), np.float32)
    for start in range(0, len(flat), LENS_BATCH):
        logp = torch.log_softmax(ro.logits(flat[start: start + LENS_BATCH]).double(), -1)
        top = torch.topk(logp, k, dim=-1)
        ids[start: start + LENS_BATCH] = top.indices.cpu().numpy()
        probs[start: start + LENS_BATCH] = top.values.exp().cpu().numpy()
    return ids.reshape(n, rows, k), probs.reshape(n, rows, k)


# --- the analysis --------------------------------------------------------------------------------


def _not_found(ctx: AnalysisContext, model: Any, word: str, ids: list[int]) -> UserError:
    shown = ", ".join(repr(s) for s in model.str_tokens(ids))
    hint = ""
    if not word.startswith(" "):
        spaced = word_ids(model, " " + word)
        if any(find_word(ctx.run.tokens(i), spaced) is not None for i in ctx.prompts):
            hint = f"; inside a sentence it is spelt with its leading space: word={' ' + word!r}"
    return UserError(f"{word!r} (tokens {shown}) occurs in none of the {len(ctx.prompts)} prompts of "
                     f"{ctx.run.final_path.name}{hint}")


def compute(ctx: AnalysisContext) -> Result:
    run, params = ctx.run, ctx.params
    word, k, field = params["word"], params["top"], params["field"]
    if not word.strip():
        raise UserError(f"give the word: --param {ctx.analysis.name}.word=' bank' (with the leading space "
                        "it has inside a sentence)")
    labels_, hooks = residual_rows(run)
    if not hooks:
        raise UserError(f"{run.final_path.name} stores no residual stream (capture with --for {ctx.analysis.name})")
    model = ctx.model()
    ids = word_ids(model, word)
    if not ids:
        raise UserError(f"{word!r} tokenizes to nothing")
    pieces = model.str_tokens(ids)
    found, missing = locate(run, list(ctx.prompts), ids)
    if not found:
        raise _not_found(ctx, model, word, ids)
    if len(found) < 2:
        raise UserError(f"{word!r} occurs in only one prompt ({run.prompt_id(found[0][0])!r}) of "
                        f"{run.final_path.name}: comparing contexts needs at least two")
    notes = []
    if len(ids) > 1:
        notes.append(f"{word!r} is {len(ids)} tokens ({', '.join(map(repr, pieces))}): compared at its last "
                     f"token, {pieces[-1]!r}, the first position that has read the whole word")
    if missing:
        notes.append(f"{len(missing)} of {len(ctx.prompts)} prompts do not contain {word!r} and are skipped")
    if any(pos == 0 for _, pos in found):
        notes.append("the word is the first token of some prompt: in many decoders position 0 is an attention "
                     "sink with a huge norm")

    x = word_vectors(run, hooks, found)
    cos = cosine_matrix(x)
    labels = []
    for i, _ in found:
        value = run.metadata(i).get(field) if field else None
        labels.append(None if value is None else str(value))
    senses = sense_stats(cos, labels)
    ro = Readout(model)
    top_ids, top_probs = lens_top(ro, x, k)
    ctx.progress(1, 2)

    # check: the last row's lens is the model's own output at that position (stored top-1)
    check = None
    if run.has_lm_outputs:
        stored = [int(run.top_k(i)[0][pos, 0]) for i, pos in found]
        check = {"compared": len(found), "agree": int(sum(int(top_ids[c, -1, 0]) == s
                                                         for c, s in enumerate(stored)))}
    pairs = list(combinations(range(len(found)), 2))  # at least one: two contexts or more
    pa, pb = np.array(pairs).T
    records = []
    seen = np.unique(top_ids).tolist()
    vocab = dict(zip(seen, model.str_tokens(seen)))
    for c, (i, pos) in enumerate(found):
        strs = run.str_tokens(i)
        start = pos - len(ids) + 1
        records.append({
            "index": i, "id": run.prompt_id(i), "context": c, "position": pos, "token": strs[pos],
            "label": labels[c], "before": "".join(strs[max(0, start - CONTEXT_TOKENS): start]),
            "word": "".join(strs[start: pos + 1]), "after": "".join(strs[pos + 1: pos + 4]),
            "lens": [[vocab[int(t)] for t in top_ids[c, r]] for r in range(len(hooks))],
        })
    by_layer = []
    for r, label in enumerate(labels_):
        off = cos[r, pa, pb]
        by_layer.append({"layer": label, "mean": float(off.mean()), "min": float(off.min()), "max": float(off.max()),
                         **{name: None if np.isnan(senses[name][r]) else float(senses[name][r])
                            for name in SENSE_STATS}})
    counts: dict[str, int] = {}
    for lb in labels:
        if lb is not None:
            counts[lb] = counts.get(lb, 0) + 1
    data = {
        "word": word, "ids": ids, "pieces": pieces, "token": pieces[-1], "token_id": ids[-1],
        "layers": labels_, "hooks": hooks, "top": k, "field": field or None, "senses": counts,
        "n_same_pairs": senses["n_same"], "n_cross_pairs": senses["n_cross"], "n_contexts": len(found),
        "skipped": [{"index": i, "id": run.prompt_id(i)} for i in missing],
        "notes": notes, "output_check": check, "by_layer": by_layer, "prompts": records,
    }
    arrays = {
        "cosine": cos, "pairs": np.array(pairs, np.int32).reshape(-1, 2),
        "pair_cosine": cos[:, pa, pb], **{name: senses[name] for name in SENSE_STATS},
        "norms": np.linalg.norm(x.astype(np.float64), axis=-1).T,  # contexts x rows
        "prompts": np.array([i for i, _ in found], np.int32), "positions": np.array([p for _, p in found], np.int32),
        "lens_ids": top_ids, "lens_probs": top_probs,
    }
    ctx.progress(2, 2)
    return Result(data=data, arrays=arrays)


def _summary_rows(layers: list[str]) -> list[int]:
    """The rows the text summary shows: the first (the embedding, where stored), the middle layer
    (``L/2``) and the last."""
    blocks = [x for x in layers if x != "embed"]
    middle = layers.index(blocks[len(blocks) // 2]) if blocks else 0
    return sorted({0, middle, len(layers) - 1})


def _f(v: float | None) -> str:
    return f"{'-':>6}" if v is None else f"{v:6.3f}"


def render(result: Result) -> str:
    d = result.data
    senses = ", ".join(f"{s} {n}" for s, n in d["senses"].items())
    lines = [f"context of {d['word']!r} (token {d['token']!r}, id {d['token_id']}) in {d['n_contexts']} prompts"
             + (f"; {d['field']}: {senses}" if senses else "")]
    lines += [f"note: {n}" for n in d["notes"]]
    if d["output_check"] is not None:
        c = d["output_check"]
        lines.append(f"check: the last row's lens top token equals the stored prediction in {c['agree']} of "
                     f"{c['compared']} contexts")
    head = " ".join(f"{k:>6}" for k in ("same", "cross", "margin", "NN"))
    lines += ["", f"cosine between contexts   {'mean':>6} {'min':>6} {'max':>6}  {head}"]
    for row in d["by_layer"]:
        lines.append(f"  {row['layer']:>22}  {row['mean']:6.3f} {row['min']:6.3f} {row['max']:6.3f}  "
                     + " ".join(_f(row[k]) for k in SENSE_STATS))
    if d["n_same_pairs"] and d["n_cross_pairs"]:
        lines.append("  (same, cross: mean over same- and cross-sense pairs; margin: lowest same minus highest "
                     "cross; NN: share of contexts whose nearest other context has their sense)")
    layers = d["layers"]
    shown = _summary_rows(layers)
    at = ", ".join(layers[r] for r in shown)
    cos, first = result.arrays["cosine"], d["prompts"][0]
    lines += ["", f"cosine of {first['id']} with each other context at rows {at}"]
    for c, p in enumerate(d["prompts"][1:12], start=1):
        label = f" [{first['label']}/{p['label']}]" if p["label"] is not None else ""
        lines.append(f"  {p['id']}{label}: " + " → ".join(f"{cos[r, 0, c]:.3f}" for r in shown))
    lines += ["", f"lens top token at rows {at}"]
    for p in d["prompts"][:12]:
        label = f" [{p['label']}]" if p["label"] is not None else ""
        lines.append(f"  {p['id']}{label} …{p['before']}[{p['word']}]{p['after']}…: "
                     + " → ".join(repr(p["lens"][r][0]) for r in shown))
    if len(d["prompts"]) > 12:
        lines.append(f"  ... {len(d['prompts']) - 12} more (--json, or the terminal UI)")
    return "\n".join(lines)


CONTEXT = Analysis(
    name="context",
    description="one word across prompts: its residual vectors' cosine between contexts at every layer, "
                "and its logit-lens tokens",
    version="1",
    compute=compute,
    needs=(RESID_POST,),
    optional=(EMBED_ROW,),  # the "embed" row, where the run holds it
    needs_model=True,
    families=("decoder",),
    auto=False,  # needs a word only the user can give
    params=(Param("word", str, "", "the word, as it is spelt inside the prompts (e.g. ' bank', with its space)"),
            Param("top", int, 5, "logit-lens tokens kept per context and layer", min=1, max=50),
            Param("field", str, "sense", "JSONL field naming each prompt's sense: same- vs cross-sense means "
                                         "('' for none)")),
    render_text=render,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(CONTEXT)


@hookimpl
def register_views(register):  # type: ignore[no-untyped-def]
    register(View(name="context-table", analysis="context", title="cosine between contexts, lens tokens",
                  make=lazy_view("workbench_plugins.context_view", "ContextView")))
