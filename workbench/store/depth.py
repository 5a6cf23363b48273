"""A run's stored hooks in the order the forward pass reaches them: attention patterns and the
residual stream, as the terminal UI, ``workbench plot`` and the analyses read them.

Names are interpreted by :mod:`workbench.hooknames` (one answer to "is this an attention
pattern?" and "which residual point comes first?"); this module applies that to what a run stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from workbench.hooknames import depth_key, is_attention_pattern, residual_point

if TYPE_CHECKING:
    from workbench.store.reader import Run


def pattern_hooks(run: Run) -> list[str]:
    """Stored attention patterns (square layout, ``hook_pattern``), in depth order: encoder,
    decoder self-attention and cross-attention layers of an encoder–decoder included. A run that
    stores square tensors but no ``hook_pattern`` (e.g. only scores) lists those instead."""
    square = [s.name for s in run.hooks.values() if s.layout == "square"]
    names = [n for n in square if is_attention_pattern(n)] or square
    return sorted(names, key=depth_key)


def residual_hooks(run: Run) -> list[tuple[str, str]]:
    """``(label, stored name)`` of every stored point of the main stream's residual stream, in
    depth order: the embedding (``embed``), then each layer's ``resid_pre`` / ``resid_mid`` /
    ``resid_post`` that was captured (``L3:post``), each stored tensor once (an alias such as
    ``blocks.1.hook_resid_pre`` of ``blocks.0.hook_resid_post`` counts once)."""
    points: list[tuple[tuple[int, int], str, str]] = []
    for spec in run.hooks.values():
        if spec.layout != "token" or len(spec.feature_shape) != 1:
            continue
        if spec.stream_of_rows() != "tokens":
            continue
        for name in (spec.name, *spec.aliases):
            point = residual_point(name)
            if point is not None:
                points.append((point[0], point[1], spec.name))
                break
    seen: set[str] = set()
    unique = []
    for _, label, name in sorted(points):
        if name not in seen:
            seen.add(name)
            unique.append((label, name))
    return unique


def residual_norms(run: Run, i: int) -> tuple[list[str], np.ndarray]:
    """The residual stream's L2 norm per position at every stored point of the main stream, in
    depth order (:func:`residual_hooks`): ``(labels, (points, positions))``."""
    points = residual_hooks(run)
    if not points:
        return [], np.zeros((0, run.n_tokens(i)), np.float32)
    norms = np.stack([np.linalg.norm(run.activation(name, i).astype(np.float64), axis=-1)
                      for _, name in points])
    return [label for label, _ in points], norms


SINK_RATIO = 5.0
"""A first position whose norm is this many times the median of the others' is an attention sink."""


def sink_position(run: Run, norms: np.ndarray) -> bool:
    """Whether position 0 of a decoder's prompt is an attention sink by its residual norms
    ``(points, positions)``: past the embedding, its median norm over the points is at least
    :data:`SINK_RATIO` times the median norm of the other positions (SmolLM2: ~22,600 against
    ~250). Such a position would otherwise own a linear colour scale."""
    if run.family != "decoder" or norms.shape[1] < 2 or norms.shape[0] < 2:
        return False
    later = norms[1:]  # past the embedding, where the sink grows
    first, rest = float(np.median(later[:, 0])), float(np.median(later[:, 1:]))
    return rest > 0 and first >= SINK_RATIO * rest
