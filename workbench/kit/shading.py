"""Shading and labels for terminal views, as Rich text and Rich styles: no Textual here.

Two families:

- the UI's block-character heatmaps (:data:`RAMP`, :func:`cell`, :func:`grid`, :func:`legend`):
  the xterm 256-colour palette and block characters, so a grid reads the same on a 256-colour or
  16-colour terminal (Rich downgrades the colours) and even without colour (the characters carry
  the level);
- the plugin views' table helpers: backgrounds for table cells (:func:`shade` from 0 to 1,
  :func:`diverging` from -1 to 1), a signed number on a diverging background
  (:func:`diverging_cell`) with its scale (:func:`abs_max`), bars (:func:`bar`) and short token
  headers (:func:`short`).

The terminal UI (``workbench.tui.render``) draws with these same functions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.style import Style
from rich.text import Text

# --- heatmaps ------------------------------------------------------------------------------------

RAMP = (17, 18, 19, 20, 26, 32, 38, 44, 78, 112, 148, 184, 220, 226)
"""xterm-256 colours from dark to bright (blue to yellow): readable on dark and light themes."""
CHARS = "░░▒▒▒▓▓▓██████"
"""The block character of each level of :data:`RAMP`."""
ZERO = "  "
"""An exactly zero weight is left empty: the causal mask shows as an empty upper triangle."""


def level(value: float, vmax: float) -> int:
    """Index into :data:`RAMP` of a value in ``[0, vmax]``; values above a zero get at least 0."""
    if not vmax > 0 or not math.isfinite(value):
        return 0
    return max(0, min(len(RAMP) - 1, int(value / vmax * (len(RAMP) - 1) + 0.5)))


def cell(value: float, vmax: float, cursor: bool = False, width: int = 2) -> Text:
    """One heatmap cell ``width`` characters wide: the value's level in :data:`RAMP` and
    :data:`CHARS`; empty for exactly 0, ``?`` in red for NaN or infinity, ``◆`` for the cursor."""
    if cursor:
        return Text("◆".ljust(width), style=Style(color="black", bgcolor="white", bold=True))
    if value == 0.0:
        return Text(ZERO[:1] * width)
    if not math.isfinite(value):
        return Text("?" * width, style="red")
    k = level(value, vmax)
    return Text(CHARS[k] * width, style=Style(color=f"color({RAMP[k]})"))


def token_label(token: str, width: int) -> str:
    """A token as one visible line: spaces as ``·``, newlines and tabs escaped, other control
    characters as their byte (``<1B>``), cut to ``width`` terminal cells (a CJK character or an
    emoji takes two). Give it a token's display label (``Run.display_tokens``), so that byte-level
    pieces show as their bytes and special tokens by name."""
    shown = token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    shown = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"<{ord(m.group()):02X}>", shown)
    return fit(shown, width)


def fit(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` terminal cells, ending in ``…`` when cut."""
    if cell_len(text) <= width:
        return text
    return set_cell_size(text, max(1, width - 1)).rstrip(" ") + "…"


def pad(text: str, width: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` terminal cells (``right``: aligned right)."""
    room = " " * max(0, width - cell_len(text))
    return room + text if right else text + room


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
    label_width = min(label_width, max(4, max((cell_len(token_label(r, 99)) for r in rows), default=4)))
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
        out.append(pad(token_label(rows[r], label_width), label_width, right=True) + " ",
                   style="bold reverse" if here else "")
        for c in range(cw.start, cw.stop):
            out.append_text(cell(float(values[r, c]), top, cursor=(here and c == cursor[1]),
                                 width=cell_width))
        if r + 1 < rw.stop:
            out.append("\n")
    return out


def legend(vmax: float, label: str = "") -> Text:
    """The colour scale of :func:`cell` from 0 to ``vmax``, after ``label``."""
    out = Text(no_wrap=True)
    out.append(f"{label}0 ", style="dim")
    for k in range(len(RAMP)):
        out.append(CHARS[k], style=Style(color=f"color({RAMP[k]})"))
    out.append(f" {vmax:.3g}", style="dim")
    return out


# --- table cells ---------------------------------------------------------------------------------


def short(s: str, n: int = 8) -> str:
    """A token for a column header: its ``repr`` without the quotes (so spaces and escapes stay
    visible), cut to ``n`` terminal cells with ``…``."""
    return fit(repr(s)[1:-1], n)


def bar(value: float, scale: float, width: int = 28) -> Text:
    """A bar of ``|value| / scale`` of ``width`` blocks (at most ``width``): green for a value
    >= 0, red below."""
    n = round(abs(value) / scale * width) if scale > 0 else 0
    return Text("█" * min(n, width), style="green" if value >= 0 else "red")


def shade(p: float) -> str:
    """A Rich background style from dark (``p`` = 0) to bright blue (1), for a value in [0, 1]
    such as a probability; values outside are clipped, NaN is 0."""
    p = 0.0 if not np.isfinite(p) else min(max(p, 0.0), 1.0)
    return f"on rgb({int(15 + 25 * p)},{int(25 + 95 * p)},{int(40 + 170 * p)})"


def diverging(v: float) -> str:
    """A Rich background style: red for negative, blue for positive, dark at 0 (``v`` in [-1, 1];
    values outside are clipped, NaN is 0)."""
    v = 0.0 if not np.isfinite(v) else min(max(v, -1.0), 1.0)
    a = abs(v)
    if v >= 0:
        return f"on rgb({int(20 + 20 * a)},{int(25 + 95 * a)},{int(40 + 170 * a)})"
    return f"on rgb({int(40 + 170 * a)},{int(25 + 40 * a)},{int(20 + 20 * a)})"


def diverging_cell(value: float, scale: float, fmt: str = "{:+.2f}") -> Text:
    """``value`` formatted by ``fmt`` on the :func:`diverging` background of ``value / scale``;
    a dim ``nan`` for a value that is not finite."""
    if not np.isfinite(value):
        return Text("  nan", style="dim")
    return Text(fmt.format(value), style=diverging(value / scale if scale else 0.0))


def abs_max(values: np.ndarray) -> float:
    """The largest finite ``|value|``, or 1.0 when there is none or it is 0: the scale that puts
    the strongest value at full colour in :func:`diverging_cell`."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0
