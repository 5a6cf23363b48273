"""Matplotlib figures of our views' results, for notebooks (``workbench.show``): the same
numbers the terminal views draw, from the same stored arrays.

- :func:`lens_grid`: the logit lens, layers × positions, each cell the top token shaded by its
  probability (the ``lens-grid`` view), or the target's rank (``rank=True``);
- :func:`dla_bars`: direct logit attribution, the largest components and the per-layer
  attention and MLP totals (the ``dla-bars`` view);
- :func:`feature_dashboard`: one SAE feature (``feature=``, default the strongest): its
  activation histogram, its top contexts, and the tokens it promotes and suppresses (the
  ``feature-dashboard`` view).

matplotlib is imported inside each function (extra ``plot``); figures are made without pyplot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError
from workbench.kit.figures import new_figure

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult


def _record(stored: StoredResult, prompt: int) -> dict[str, Any]:
    for rec in stored.data.get("prompts", []):
        if int(rec["index"]) == prompt:
            return rec
    covered = sorted(int(r["index"]) for r in stored.data.get("prompts", []))
    raise UserError(f"prompt {prompt} is not in this {stored.analysis} result (it covers {covered[:10]})")


def lens_grid(stored: StoredResult, run: Run, prompt: int = 0, rank: bool = False, pos: int | None = None,
              window: int = 24) -> Any:
    """Logit lens of ``prompt``: rows are layers (last on top, as in the terminal), columns
    positions (``window`` of them, ending at ``pos``: default the last); each cell names the top
    token and is shaded by its probability (``rank``: the target's rank, log-shaded)."""
    rec = _record(stored, prompt)
    a = stored.arrays
    off, n_all = int(rec["offset"]), int(rec["n_tokens"])
    stop = n_all if pos is None else max(1, min(pos + 1, n_all))
    first = max(0, stop - window)
    off, n = off + first, stop - first
    labels = list(stored.data["layers"])
    top = a["top_ids"][off:off + n, :, 0]
    probs = a["top_probs"][off:off + n, :, 0].astype(np.float64)
    ranks = a["target_rank"][off:off + n].astype(np.float64)
    tokens = [t.label for t in run.display_tokens(prompt)][first:stop]
    values = (np.log10(np.where(ranks > 0, ranks, np.nan)) if rank else probs).T[::-1]
    fig, ax = new_figure((max(6.0, 0.9 * n + 2), max(3.0, 0.32 * len(labels) + 1.5)), layout="constrained")
    image = ax.imshow(values, cmap="viridis_r" if rank else "viridis", aspect="auto", interpolation="nearest",
                      vmin=0.0, vmax=None if rank else 1.0)
    words = dict(zip(np.unique(top).tolist(), (t.label for t in run.display_ids(np.unique(top)))))
    for r in range(len(labels)):
        for p in range(n):
            layer = len(labels) - 1 - r
            text = (str(int(ranks[p, layer])) if ranks[p, layer] > 0 else "-") if rank else \
                words[int(top[p, layer])][:7]
            ax.text(p, r, text, ha="center", va="center", fontsize=6,
                    color="white" if (values[r, p] < 0.5 if not rank else values[r, p] > 1) else "black")
    ax.set_xticks(range(n), [f"{t[:10]} {first + p}" for p, t in enumerate(tokens)], rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), list(reversed(labels)), fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"logit lens · prompt {prompt} · " + ("target rank (log colour)" if rank else
                                                       "top token, shaded by probability"), fontsize=9)
    fig.colorbar(image, ax=ax, label="log10 rank" if rank else "probability of the top token", shrink=0.8)
    return fig


def dla_bars(stored: StoredResult, run: Run, prompt: int = 0) -> Any:
    """Direct logit attribution of ``prompt``: the largest components (left) and each layer's
    attention (heads and bias) and MLP totals (right)."""
    rec = _record(stored, prompt)
    if "skipped" in rec:
        raise UserError(f"prompt {prompt}: no attribution stored ({rec['skipped']})")
    a = stored.arrays
    heads = a["heads"][prompt]
    attn = heads.sum(1) + np.nan_to_num(a["attn_bias"][prompt])
    mlp = a["mlp"][prompt]
    fig, (left, right) = new_figure((11, max(3.5, 0.25 * len(rec["top"]) + 1.5)), 1, 2, layout="constrained")
    names = [c["component"] for c in rec["top"]][::-1]
    vals = [c["value"] for c in rec["top"]][::-1]
    left.barh(range(len(vals)), vals, color=["tab:green" if v > 0 else "tab:red" for v in vals])
    left.set_yticks(range(len(names)), names, fontsize=7)
    left.axvline(0, color="black", linewidth=0.6)
    left.set_title(f"{rec['metric']} = {rec['actual']:.3f} (parts sum to {rec['total']:.3f})", fontsize=9)
    layers = np.arange(len(attn))
    right.bar(layers - 0.2, attn, width=0.4, label="attention")
    right.bar(layers + 0.2, mlp, width=0.4, label="MLP")
    right.axhline(0, color="black", linewidth=0.6)
    right.set_xlabel("layer")
    right.set_xticks(layers)
    right.legend(fontsize=7)
    right.set_title(f"per layer · prompt {prompt}, position {rec['position']} {rec['token']!r}", fontsize=9)
    return fig


def feature_dashboard(stored: StoredResult, run: Run, prompt: int = 0, feature: int | None = None) -> Any:
    """One SAE feature: activation histogram, its top contexts (the activation at each), and
    the tokens its decoder direction promotes and suppresses. ``feature`` defaults to the one
    with the largest activation."""
    a = stored.arrays
    n = len(a["max"])
    if feature is None:
        feature = int(np.argmax(a["max"]))
    if not 0 <= feature < n:
        raise UserError(f"feature {feature} does not exist: this result has features 0..{n - 1}")
    f = feature
    panels = 3 if "promoted_ids" in a else 2
    fig, axes = new_figure((5.0 * panels, 4.0), 1, panels, layout="constrained")
    edges = np.asarray(a["hist_edges"], dtype=np.float64)
    axes[0].stairs(np.asarray(a["hist"][f], dtype=np.int64), 10 ** edges, fill=True)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("activation (where it fires)")
    axes[0].set_title(f"feature {f}: fires on {int(a['fires'][f])} tokens ({float(a['density'][f]):.3%}), "
                      f"max {float(a['max'][f]):.3g}", fontsize=8)
    contexts = [(float(v), int(p), int(t)) for v, p, t in zip(a["top_values"][f], a["top_prompt"][f],
                                                            a["top_pos"][f], strict=True) if p >= 0][:10]
    labels = []
    for _, p, t in contexts:
        toks = [d.label for d in run.display_tokens(p)]
        labels.append("".join(toks[max(0, t - 4):t]) + "[" + toks[t] + "]")
    axes[1].barh(range(len(contexts)), [c[0] for c in contexts][::-1] if contexts else [])
    axes[1].set_yticks(range(len(contexts)), labels[::-1], fontsize=7)
    axes[1].set_title("top contexts ([token] where it fires)", fontsize=8)
    if panels == 3:
        ids = np.concatenate([a["promoted_ids"][f], a["suppressed_ids"][f][::-1]])
        vals = np.concatenate([a["promoted"][f], a["suppressed"][f][::-1]]).astype(np.float64)
        words = [d.label for d in run.display_ids(ids)]
        axes[2].barh(range(len(vals)), vals[::-1], color=["tab:green" if v > 0 else "tab:red" for v in vals[::-1]])
        axes[2].set_yticks(range(len(vals)), words[::-1], fontsize=7)
        axes[2].set_title("logit effect: promoted / suppressed", fontsize=8)
    return fig
