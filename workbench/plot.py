"""``workbench plot``: heatmaps of a stored run as image files, with matplotlib (an optional
dependency: ``pip install 'workbench[plot]'``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import UserError
from workbench.hooknames import layer_of

if TYPE_CHECKING:
    from workbench.store.reader import Run


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("workbench plot needs matplotlib: pip install 'workbench[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
                   head: int = 0) -> None:
    """One head's attention pattern for prompt ``i``: queries down, keys across, weight in
    colour; exactly-zero cells (the causal mask) left white."""
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
    pattern = run.activation(hook, i)
    if not 0 <= head < pattern.shape[0]:
        raise UserError(f"head {head} does not exist: {hook} has heads 0..{pattern.shape[0] - 1}")
    q_tokens, k_tokens = run.axis_tokens(hook, i)[1:]
    assert q_tokens is not None and k_tokens is not None
    plt = _pyplot()
    values = np.ma.masked_equal(pattern[head].astype(np.float64), 0.0)
    size = max(4.0, 0.28 * max(len(q_tokens), len(k_tokens)) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(k_tokens)), _labels(k_tokens), rotation=90, fontsize=7)
    ax.set_yticks(range(len(q_tokens)), _labels(q_tokens), fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"{hook}, head {head} — prompt {i}", fontsize=9)
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    _save(fig, out)
    plt.close(fig)


def plot_residual(run: Run, i: int, out: str) -> None:
    """The residual stream's L2 norm at every stored depth (rows) and position (columns)."""
    from workbench.store.depth import residual_norms

    _check_prompt(run, i)
    labels, norms = residual_norms(run, i)
    if not labels:
        raise UserError("this run stores no residual stream (capture with --hooks residual)")
    tokens = run.str_tokens(i)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(tokens) + 3), max(3.0, 0.22 * len(labels) + 1.5)))
    image = ax.imshow(norms, cmap="magma", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(tokens)), _labels(tokens), rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"residual stream norm — prompt {i}", fontsize=9)
    fig.colorbar(image, ax=ax, label="L2 norm", shrink=0.8)
    _save(fig, out)
    plt.close(fig)
