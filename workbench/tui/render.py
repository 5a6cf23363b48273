"""What the UI draws, as plain functions of the stored arrays: shaded grids, token labels, norms.

No Textual here (only Rich text), so it is tested without an app and reused by ``workbench plot``
for the data side. Shading uses the xterm 256-colour palette and block characters, so a grid reads
the same on a 256-colour or 16-colour terminal (Rich downgrades the colours) and even without
colour (the characters carry the level).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from rich.style import Style
from rich.text import Text

# xterm-256 colours from dark to bright (blue to yellow): readable on dark and light themes.
RAMP = (17, 18, 19, 20, 26, 32, 38, 44, 78, 112, 148, 184, 220, 226)
CHARS = "░░▒▒▒▓▓▓██████"
ZERO = "  "
"""An exactly zero weight is left empty: the causal mask shows as an empty upper triangle."""


def level(value: float, vmax: float) -> int:
    """Index into :data:`RAMP` of a value in ``[0, vmax]``; values above a zero get at least 0."""
    if not vmax > 0 or not math.isfinite(value):
        return 0
    return max(0, min(len(RAMP) - 1, int(value / vmax * (len(RAMP) - 1) + 0.5)))


def cell(value: float, vmax: float, cursor: bool = False, width: int = 2) -> Text:
    if cursor:
        return Text("◆".ljust(width), style=Style(color="black", bgcolor="white", bold=True))
    if value == 0.0:
        return Text(ZERO[:1] * width)
    if not math.isfinite(value):
        return Text("?" * width, style="red")
    k = level(value, vmax)
    return Text(CHARS[k] * width, style=Style(color=f"color({RAMP[k]})"))


def token_label(token: str, width: int) -> str:
    """A token as one visible line: spaces as ``·``, newlines and tabs escaped, cut to ``width``."""
    shown = token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    shown = re.sub(r"[\x00-\x1f\x7f]", "�", shown)
    if len(shown) > width:
        shown = shown[: max(1, width - 1)] + "…"
    return shown


@dataclass
class Window:
    """The visible slice ``[start, stop)`` of an axis of ``n`` items that keeps ``focus`` in view."""

    start: int
    stop: int

    @classmethod
    def around(cls, n: int, focus: int, size: int) -> Window:
        size = max(1, size)
        if n <= size:
            return cls(0, n)
        start = min(max(0, focus - size // 2), n - size)
        return cls(start, start + size)


def grid(values: np.ndarray, rows: list[str], cols: list[str], cursor: tuple[int, int],
         width: int, height: int, vmax: float | None = None, cell_width: int = 2,
         label_width: int = 10) -> Text:
    """A shaded ``(rows, cols)`` grid with row labels, windowed to ``width`` x ``height``
    characters around ``cursor`` (row, col). The column header shows the cursor column's index
    and the first and last visible column indices."""
    n_rows, n_cols = values.shape
    label_width = min(label_width, max(4, max((len(token_label(r, 99)) for r in rows), default=4)))
    fit_cols = max(1, (width - label_width - 1) // cell_width)
    fit_rows = max(1, height - 1)
    rw = Window.around(n_rows, cursor[0], fit_rows)
    cw = Window.around(n_cols, cursor[1], fit_cols)
    finite = values[np.isfinite(values)]
    top = float(vmax if vmax is not None else (finite.max() if finite.size else 1.0))
    out = Text(no_wrap=True, overflow="crop")
    head = f"{cw.start}".ljust(cell_width * (cw.stop - cw.start))
    tail = f"{cw.stop - 1}"
    head = head[: len(head) - len(tail)] + tail if len(head) > len(tail) + 2 else head
    out.append(" " * (label_width + 1) + head + "\n", style="dim")
    for r in range(rw.start, rw.stop):
        here = r == cursor[0]
        out.append(token_label(rows[r], label_width).rjust(label_width) + " ",
                   style="bold reverse" if here else "")
        for c in range(cw.start, cw.stop):
            out.append_text(cell(float(values[r, c]), top, cursor=(here and c == cursor[1]),
                                 width=cell_width))
        if r + 1 < rw.stop:
            out.append("\n")
    return out


def legend(vmax: float, label: str = "") -> Text:
    out = Text(no_wrap=True)
    out.append(f"{label}0 ", style="dim")
    for k in range(len(RAMP)):
        out.append(CHARS[k], style=Style(color=f"color({RAMP[k]})"))
    out.append(f" {vmax:.3g}", style="dim")
    return out


def residual_norms(run, i: int) -> tuple[list[str], np.ndarray]:  # type: ignore[no-untyped-def]
    """The residual stream's L2 norm per position at every stored point of the main stream, in
    depth order: ``(labels, (points, positions))``. Points are ``hook_embed`` (plus
    ``hook_pos_embed`` when stored), then each layer's ``resid_pre`` / ``resid_mid`` /
    ``resid_post`` that was captured (aliases counted once)."""
    points: list[tuple[tuple[int, int], str, str]] = []
    order = {"hook_resid_pre": 0, "hook_resid_mid": 1, "hook_resid_post": 2}
    for spec in run.hooks.values():
        if spec.layout != "token" or len(spec.feature_shape) != 1:
            continue
        if spec.stream_of_rows() != "tokens":
            continue
        for name in (spec.name, *spec.aliases):
            m = re.fullmatch(r"(?:encoder_)?blocks\.(\d+)\.(hook_resid_(?:pre|mid|post))", name)
            if m:
                points.append(((int(m.group(1)), order[m.group(2)]), f"L{m.group(1)}:{m.group(2)[11:]}",
                               spec.name))
                break
            if name in ("hook_embed", "embed.hook_out"):
                points.append(((-1, 0), "embed", spec.name))
                break
    seen: set[str] = set()
    unique = []
    for key, label, name in sorted(points):
        if name not in seen:
            seen.add(name)
            unique.append((label, name))
    if not unique:
        return [], np.zeros((0, run.n_tokens(i)), np.float32)
    norms = np.stack([np.linalg.norm(run.activation(name, i).astype(np.float64), axis=-1)
                      for _, name in unique])
    return [label for label, _ in unique], norms


def pattern_hooks(run) -> list[str]:  # type: ignore[no-untyped-def]
    """Stored attention patterns (square layout, ``pattern`` in the name), in depth order:
    encoder, decoder self-attention and cross-attention layers of an encoder–decoder included."""
    names = [s.name for s in run.hooks.values() if s.layout == "square" and "pattern" in s.name]
    if not names:
        names = [s.name for s in run.hooks.values() if s.layout == "square"]

    def key(name: str) -> tuple[int, int, str]:
        m = re.search(r"blocks\.(\d+)\.", name)
        part = 0 if name.startswith(("blocks", "encoder")) else 1
        return (part, int(m.group(1)) if m else -1, name)

    return sorted(names, key=key)
