"""The terminal view of a ``matrices`` result (imported only when the UI shows it).

:class:`MatrixSliceView` shows the chosen tokens x the model's dimensions of ``W_E`` (each token's
row; ``m`` switches to ``W_U``, each token's column, unless the two are tied: then there is one
matrix and the view says so). Every cell is shaded by its value (blue positive, red negative, full
colour at the largest ``|value|`` of the slice); the cursor cell (arrow keys while the view has
the focus: up/down a token, left/right a dimension) is read out with its exact value
(``W_E[104 'a', dim 17] = +0.0123``) and its token's norm. Below, the tokens x tokens cosine table
of the shown matrix, windowed around the cursor's token. The view follows the UI's focused token
when that token is one of the result's tokens. Both tables are windowed to fit the panel (80 x 24
leaves about 55 x 15).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Group
from rich.style import Style
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import Static

from workbench.kit import Window, abs_max, diverging, diverging_cell, short, token_label

if TYPE_CHECKING:
    from workbench.kit import Focus
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

SYMBOL = {"embed": "W_E", "unembed": "W_U"}
LABEL_W, NORM_W, COS_W = 8, 7, 6
"""Columns of a token label, of a norm (``  1.234``), of a cosine with its space (`` +0.93``)."""
CURSOR = Style(color="black", bgcolor="white", bold=True)
FIXED_LINES = 6
"""Lines besides the two tables' rows: title, readout, its details, dimension header, cosine
caption and header."""


class MatrixSliceView(Static):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1, 0)", "token ↑", show=False),
        Binding("down", "cursor(1, 0)", "token ↓", show=False),
        Binding("left", "cursor(0, -1)", "dimension ←", show=False),
        Binding("right", "cursor(0, 1)", "dimension →", show=False),
        Binding("m", "matrix", "W_E / W_U"),
    ]
    DEFAULT_CSS = "MatrixSliceView { height: auto; }"
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run, width: int = 55, height: int = 15) -> None:
        super().__init__()
        self.data = stored.data
        self.arrays = stored.arrays
        self.run = run
        self.default_size = (width, height)
        self.tokens: list[dict[str, Any]] = list(self.data["tokens"])
        self.ids = [int(t["id"]) for t in self.tokens]
        self.labels = self._labels(run)
        self.matrix = "embed"
        self.row, self.dim = 0, 0

    def _labels(self, run: Run | None) -> list[str]:
        """Each token as the UI shows it (byte pieces as their bytes, specials by name)."""
        try:
            return [t.label for t in run.display_ids(self.ids)] if run is not None else []
        except Exception:  # noqa: BLE001 - an old run without a vocabulary: the stored strings
            return []

    def label(self, k: int) -> str:
        return self.labels[k] if k < len(self.labels) else str(self.tokens[k]["token"])

    # --- interaction -------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.update(self.draw())

    def on_resize(self) -> None:
        self.update(self.draw())

    def redraw(self) -> None:
        if self.is_mounted:
            self.update(self.draw())

    def action_cursor(self, rows: int, dims: int) -> None:
        if self.ids:
            self.row = (self.row + rows) % len(self.ids)
            self.dim = (self.dim + dims) % int(self.data["d_model"])
        self.redraw()

    def action_matrix(self) -> None:
        shown = self.shown_matrices()
        self.matrix = shown[(shown.index(self.matrix) + 1) % len(shown)]
        self.redraw()

    def follow(self, run: Run, focus: Focus) -> None:
        """Put the cursor on the focused token when it is one of the result's tokens."""
        self.run = run
        try:
            tid = int(run.tokens(focus.prompt)[focus.pos])
        except (IndexError, ValueError):
            return
        if tid in self.ids and self.ids.index(tid) != self.row:
            self.row = self.ids.index(tid)
            self.redraw()

    # --- drawing ------------------------------------------------------------------------------

    def shown_matrices(self) -> list[str]:
        """The matrices to switch between: one when they are tied."""
        return ["embed"] if self.data["tied"] else list(self.data["matrices"])

    def room(self) -> tuple[int, int]:
        """Width and height the view may fill: the panel it sits in, else the defaults."""
        width = self.size.width or self.default_size[0]
        parent = self.parent
        height = getattr(getattr(parent, "content_region", None), "height", 0) or self.default_size[1]
        return width, height

    def readout(self, width: int = 80) -> Text:
        """The cursor cell's exact value: ``W_E[104 'a', dim 17] = +0.0123`` (``W_U[dim 17, 104 'a']``:
        a token's unembedding vector is a column); a long token is cut to keep the value in view."""
        m, k, dim = self.matrix, self.row, self.dim
        t = self.tokens[k]

        def line(tok: str) -> str:
            name = f"{t['id']} '{tok}'"
            where = f"[{name}, dim {dim}]" if m == "embed" else f"[dim {dim}, {name}]"
            return f"{SYMBOL[m]}{where} = {float(self.arrays[m][k, dim]):+.4f}"

        room = min(12, max(2, width - len(line(""))))
        return Text(line(short(t["token"], room)), style="bold", no_wrap=True, overflow="ellipsis")

    def detail(self, width: int) -> Text:
        """The cursor token's norm (and unembedding bias), and the colour scale."""
        m, k = self.matrix, self.row
        parts = [f"norm {float(self.arrays[f'{m}_norm'][k]):.4g}"]
        if m == "unembed" and self.data.get("has_bias"):
            parts.append(f"b_U {float(self.arrays['unembed_bias'][k]):+.4f}")
        parts.append(f"colour ±{abs_max(np.asarray(self.arrays[m])):.3g}")
        return Text(fit_parts(parts, width), style="dim", no_wrap=True, overflow="ellipsis")

    def title(self, width: int) -> Text:
        d, m = self.data, self.matrix
        s = d["shapes"]["W_E" if m == "embed" else "W_U"]
        head = f"{SYMBOL[m]} {'rows' if m == 'embed' else 'columns'}"
        if d["tied"]:
            state = ["tied: W_U = W_Eᵀ, one matrix", "tied: W_U = W_Eᵀ", "tied"]
        elif "unembed" not in d["matrices"]:
            state = ["no W_U: its LM head is untrained", "no trained W_U", "no W_U"]
        else:
            other = SYMBOL["unembed" if m == "embed" else "embed"]
            state = [f"untied · m: {other}", "untied"]
        rest = f" · {s[0]}×{s[1]}"
        for st in state:
            if len(head) + len(rest) + 3 + len(st) <= width:
                break
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(head, style="bold")
        out.append(rest)
        out.append(f" · {st}", style="yellow" if d["tied"] or "unembed" not in d["matrices"] else "dim")
        return out

    def draw(self) -> Any:
        if not self.ids:
            return Text("no tokens in this result", style="dim")
        width, height = self.room()
        n = len(self.ids)
        spare = max(2, height - FIXED_LINES)
        slice_rows = min(n, max(1, -(-spare // 2)))
        cos_rows = min(n, max(1, spare - slice_rows))
        return Group(self.title(width), self.readout(width), self.detail(width), self.slice(width, slice_rows),
                     self.cosines(width, cos_rows))

    def slice(self, width: int, rows: int) -> Text:
        """The tokens x dimensions slice around the cursor, with each token's norm."""
        m = self.matrix
        values = np.asarray(self.arrays[m])
        norms = self.arrays[f"{m}_norm"]
        scale = abs_max(values)
        places = max(0, 3 - len(str(int(float(np.max(norms, initial=0.0))))) + 1)  # 1.234, 12.34, 123.4
        d_model = values.shape[1]
        fit = max(1, width - LABEL_W - 1 - NORM_W)
        rw = Window.around(len(self.ids), self.row, rows)
        cw = Window.around(d_model, self.dim, fit)
        out = Text(no_wrap=True, overflow="crop")
        span = cw.stop - cw.start
        head, tail = f"dim {cw.start}", f"{cw.stop - 1}"
        if span > len(head) + len(tail):  # the first and last dimension shown, at the ends
            head += " " * (span - len(head) - len(tail)) + tail
        head = head if len(head) <= span else str(cw.start)
        out.append(" " * (LABEL_W + 1) + head[:span].ljust(span), style="dim")
        out.append(f"{'norm':>{NORM_W}}", style="dim")
        for k in range(rw.start, rw.stop):
            out.append("\n")
            here = k == self.row
            out.append(token_label(self.label(k), LABEL_W).rjust(LABEL_W) + " ", style="bold reverse" if here else "")
            for dim in range(cw.start, cw.stop):
                if here and dim == self.dim:
                    out.append("◆", style=CURSOR)
                else:
                    out.append(" ", style=diverging(float(values[k, dim]) / scale))
            out.append(f"{float(norms[k]):>{NORM_W}.{places}f}", style="bold" if here else "")
        return out

    def cosines(self, width: int, rows: int) -> Text:
        """The tokens x tokens cosine table of the shown matrix around the cursor's token."""
        m = self.matrix
        cos = self.arrays[f"{m}_cosine"]
        n = len(self.ids)
        fit = max(1, (width - LABEL_W) // COS_W)
        rw = Window.around(n, self.row, rows)
        cw = Window.around(n, self.row, fit)
        what = "rows" if m == "embed" else "columns"
        out = Text(no_wrap=True, overflow="crop")
        caption = f"cosine of the {SYMBOL[m]} {what}"
        out.append(caption, style="bold")
        if ((cw.stop - cw.start) < n or (rw.stop - rw.start) < n) and len(caption) + len(f" · {n}×{n}") <= width:
            out.append(f" · {n}×{n}", style="dim")  # windowed: say how big it is
        out.append("\n" + " " * LABEL_W)
        for j in range(cw.start, cw.stop):
            out.append(" " + token_label(self.label(j), COS_W - 1).rjust(COS_W - 1),
                       style="bold reverse" if j == self.row else "bold")
        for k in range(rw.start, rw.stop):
            out.append("\n" + token_label(self.label(k), LABEL_W).rjust(LABEL_W),
                       style="bold reverse" if k == self.row else "")
            for j in range(cw.start, cw.stop):
                out.append(" ")
                out.append_text(diverging_cell(float(cos[k, j]), 1.0, "{:+.2f}"))
        return out


def fit_parts(parts: list[str], width: int) -> str:
    """``parts`` joined by `` · ``, as many as fit in ``width`` (the first one always)."""
    out = parts[0]
    for p in parts[1:]:
        if len(out) + 3 + len(p) > width:
            break
        out += " · " + p
    return out
