"""``workbench plot`` and ``workbench.show``: heatmaps of a stored run as matplotlib figures (an
optional dependency: ``pip install 'workbench[plot]'``), saved as image files or shown in Jupyter.
Figures are made without pyplot, so a notebook's backend is left alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError
from workbench.hooknames import layer_of
from workbench.kit.figures import new_figure

if TYPE_CHECKING:
    from workbench.store.reader import Run


def _check_prompt(run: Run, i: int) -> None:
    if not 0 <= i < len(run):
        raise UserError(f"prompt {i} is not in this run (it has {len(run)} prompts: 0..{len(run) - 1})")


def _labels(tokens: list[str]) -> list[str]:
    from workbench.kit.shading import token_label

    return [f"{token_label(t, 12)} {p}" for p, t in enumerate(tokens)]


def _save(fig: Any, out: str) -> None:
    try:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot write {out}: {exc}") from None


def plot_attention(run: Run, i: int, out: str, *, hook: str | None = None, layer: int | None = None,
                   head: int = 0) -> list[str]:
    """:func:`attention_figure` saved to ``out``; returns its notes."""
    fig, notes = attention_figure(run, i, hook=hook, layer=layer, head=head)
    _save(fig, out)
    return notes


def attention_figure(run: Run, i: int, *, hook: str | None = None, layer: int | None = None,
                     head: int = 0) -> tuple[Any, list[str]]:
    """One head's attention pattern for prompt ``i``: queries down, keys across, weight in
    colour; exactly-zero cells (the causal mask) left white. A scores hook
    (``hook_attn_scores``) is drawn as scores: its own colour range, masked cells white. Returns
    the figure and notes for the user (e.g. that a model's ``hook_attn_scores`` is its pattern)."""
    from workbench.store.attention_steps import MASKED_BELOW, is_scores_hook
    from workbench.store.depth import pattern_hooks

    _check_prompt(run, i)
    hooks = pattern_hooks(run)
    if not hooks:
        raise UserError("this run stores no attention patterns (capture with --hooks attention)")
    if hook is None:
        if layer is None:
            hook = hooks[0]
        else:
            named = [h for h in hooks if layer_of(h) == layer]
            if not named:
                raise UserError(f"no attention pattern of layer {layer} in this run "
                                f"(stored: {', '.join(hooks[:4])}{' ...' if len(hooks) > 4 else ''})")
            hook = named[0]
    if run.resolve(hook).layout != "square":
        raise UserError(f"{hook} is not an attention pattern (its axes: {', '.join(run.axes(hook))})")
    notes = []
    scores = is_scores_hook(run, hook)
    if hook.endswith("hook_attn_scores") and not scores:
        notes.append(f"on this model {hook} is the same tensor as hook_pattern (the TransformerLens bridge "
                     "aliases them): it holds the softmax weights, drawn as weights")
    pattern = run.activation(hook, i)
    if not 0 <= head < pattern.shape[0]:
        raise UserError(f"head {head} does not exist: {hook} has heads 0..{pattern.shape[0] - 1}")
    q_tokens, k_tokens = ([t.label for t in run.display_tokens(i, s)]
                          for s in run.resolve(hook).square_streams())
    raw = pattern[head].astype(np.float64)
    if scores:
        values = np.ma.masked_where(raw <= MASKED_BELOW, raw)
        vmin, vmax, cmap, label = float(values.min()), float(values.max()), "coolwarm", \
            "attention score (pre-softmax; masked cells white)"
    else:
        values = np.ma.masked_equal(raw, 0.0)
        vmin, vmax, cmap, label = 0.0, 1.0, "viridis", "attention weight"
    size = max(4.0, 0.28 * max(len(q_tokens), len(k_tokens)) + 2)
    fig, ax = new_figure((size + 1, size))
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(k_tokens)), _labels(k_tokens), rotation=90, fontsize=7)
    ax.set_yticks(range(len(q_tokens)), _labels(q_tokens), fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"{hook}, head {head} — prompt {i}", fontsize=9)
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    return fig, notes


def plot_residual(run: Run, i: int, out: str, *, log: bool = True, sink: str = "auto") -> list[str]:
    """:func:`residual_figure` saved to ``out``; returns its notes."""
    fig, notes = residual_figure(run, i, log=log, sink=sink)
    _save(fig, out)
    return notes


def residual_figure(run: Run, i: int, *, log: bool = True, sink: str = "auto") -> tuple[Any, list[str]]:
    """The residual stream's L2 norm at every stored depth (rows) and position (columns), on a
    log colour scale by default. ``sink``: ``auto`` keeps an attention-sink first position (a
    decoder's position 0 with a norm many times the rest) out of the colour scale, ``skip``
    always, ``keep`` never. Returns the figure and notes for the user."""
    from workbench.store.depth import residual_norms, sink_position

    _check_prompt(run, i)
    labels, norms = residual_norms(run, i)
    if not labels:
        raise UserError("this run stores no residual stream (capture with --hooks residual)")
    tokens = [t.label for t in run.display_tokens(i)]  # byte pieces as <E4>, specials by name
    notes = []
    skip = sink == "skip" or (sink == "auto" and sink_position(run, norms))
    scaled = norms[:, 1:] if skip and norms.shape[1] > 1 else norms
    if skip:
        notes.append(f"position 0 left out of the colour scale (its norm reaches {float(norms[:, 0].max()):.4g}; "
                     f"the rest at most {float(scaled.max()):.4g}): it saturates")
    fig, ax = new_figure((max(5.0, 0.3 * len(tokens) + 3), max(3.0, 0.22 * len(labels) + 1.5)))
    from matplotlib.colors import LogNorm, Normalize

    positive = scaled[scaled > 0]
    lo = float(positive.min()) if positive.size else 1e-6
    norm = LogNorm(vmin=lo, vmax=float(scaled.max())) if log else Normalize(vmin=0.0, vmax=float(scaled.max()))
    image = ax.imshow(np.clip(norms, lo if log else None, None), cmap="magma", aspect="auto",
                      interpolation="nearest", norm=norm)
    ax.set_xticks(range(len(tokens)), _labels(tokens), rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"residual stream norm — prompt {i}", fontsize=9)
    fig.colorbar(image, ax=ax, label="L2 norm" + (" (log scale)" if log else ""), shrink=0.8)
    return fig, notes
