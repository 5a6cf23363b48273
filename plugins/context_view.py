"""The terminal view of a ``context`` result (imported only when the UI shows it).

:class:`ContextView` follows the app's focused prompt: for the focused context (its prompt holds
the word), a layers x context-pairs table of cosines — the focused context against each other
context, shaded from the result's lowest cosine (dark) to 1 (bright) — with the same-sense and
cross-sense means per layer and the focused context's top logit-lens token per layer. ``l`` shows
the focused context's lens tokens (top ``top`` with probabilities) per layer instead; ``o`` pages
through the other contexts when they do not fit. A prompt without the word shows the first
context, and says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import Binding, BindingType

from workbench.kit import PromptView, shade, short, token_label

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

LAYER_W, CELL_W, LENS_W = 6, 5, 8
"""Columns with their one space of padding: layer label, a cosine (``0.93``), a lens token."""


class ContextView(PromptView):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("l", "toggle_lens", "cosines / lens tokens"),
                                             Binding("o", "others", "more contexts")]
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run, width: int = 56) -> None:
        super().__init__(stored, run)
        self.arrays = stored.arrays
        self.default_width = width
        self.show_lens = False
        self.page = 0
        pc = np.asarray(self.arrays["pair_cosine"], dtype=np.float64)
        finite = pc[np.isfinite(pc)]
        self.vmin = float(min(finite.min(), 0.999)) if finite.size else 0.0

    def on_resize(self) -> None:
        self.update(self.draw())

    def action_toggle_lens(self) -> None:
        self.show_lens = not self.show_lens
        self.update(self.draw())

    def action_others(self) -> None:
        self.page += 1
        self.update(self.draw())

    def _shade(self, v: float) -> str:
        return str(shade((v - self.vmin) / (1.0 - self.vmin)) if np.isfinite(v) else "")

    def focused(self) -> tuple[dict[str, Any], str | None]:
        """The focused prompt's context record, or the first context's with a note."""
        rec = self.record()
        if rec is not None:
            return rec, None
        first = self.data["prompts"][0]
        return first, (f"prompt {self.prompt} has no {self.data['word']!r}: showing prompt {first['index']} "
                       f"({first['id']})")

    def draw(self) -> Any:
        d = self.data
        rec, note = self.focused()
        c = int(rec["context"])
        label = f"[{rec['label']}] " if rec["label"] is not None else ""
        title = Text.assemble(("context", "bold"), f" {d['word']!r} · prompt {rec['index']}\n{label}…",
                              rec["before"], (rec["word"], "reverse"), rec["after"], "…")
        parts: list[Any] = [title]
        if note:
            parts.append(Text(note, style="dim"))
        parts.append(self.lens_table(rec) if self.show_lens else self.cosine_table(c))
        for n in d["notes"]:
            parts.append(Text(n, style="dim"))
        return Group(*parts)

    def layout(self, n_others: int) -> tuple[int, bool, int]:
        """What fits the widget's width: (pair columns, same/cross columns?, lens column width).
        At least one pair column; then the sense means, then the lens token, then more pairs."""
        width = self.size.width or self.default_width
        labelled = self.data["n_same_pairs"] > 0 or self.data["n_cross_pairs"] > 0
        room = width - LAYER_W - CELL_W
        lens_w = LENS_W if room >= LENS_W else 0
        room -= lens_w
        means = labelled and room >= 2 * CELL_W + 1  # "cross" takes one more
        room -= 2 * CELL_W + 1 if means else 0
        fit = max(1, min(n_others, 1 + room // CELL_W))
        if lens_w:  # what the pairs leave: more lens tokens
            lens_w += min(max(0, room - (fit - 1) * CELL_W), 4 * LENS_W)
        return fit, means, lens_w

    def cosine_table(self, c: int) -> Table:
        d, cos = self.data, self.arrays["cosine"]
        recs = d["prompts"]
        others = [o for o in range(len(recs)) if o != c]
        fit, means, lens_w = self.layout(len(others))
        pages = max(1, -(-len(others) // fit))
        start = (self.page % pages) * fit
        shown = others[start: start + fit]
        caption = f"vs prompt {recs[c]['index']}; shade {self.vmin:.2f}→1"
        if pages > 1:
            caption += f"; o: more ({start + 1}-{start + len(shown)} of {len(others)})"
        table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 0, 0, 1), show_edge=False,
                      caption=Text(caption + "; l: lens", style="dim"), caption_justify="left")
        table.add_column("layer", justify="right", width=LAYER_W - 1, no_wrap=True)
        for o in shown:
            lb = recs[o]["label"]
            table.add_column(Text(f"#{recs[o]['index']}" + (f"\n{short(lb, CELL_W - 1)}" if lb is not None else "")),
                             justify="right", width=CELL_W - 1, no_wrap=True)
        if means:
            table.add_column("same", justify="right", width=CELL_W - 1)
            table.add_column("cross", justify="right", width=CELL_W, no_wrap=True)
        if lens_w:
            table.add_column("lens", width=lens_w - 1, no_wrap=True, overflow="crop")
        for r, layer in enumerate(d["layers"]):
            cells: list[Any] = [Text(layer)]
            for o in shown:
                v = float(cos[r, c, o])
                cells.append(Text(f"{v:.2f}", style=self._shade(v)))
            if means:
                for name in ("same", "cross"):
                    v = float(self.arrays[name][r])
                    cells.append(Text(f"{v:.2f}", style=self._shade(v)) if np.isfinite(v) else Text("-", style="dim"))
            if lens_w:
                lens = Text()
                for j, tok in enumerate(recs[c]["lens"][r]):
                    lens.append(("" if j == 0 else " ") + token_label(tok, LENS_W - 1),
                                style=shade(float(self.arrays["lens_probs"][c, r, j])))
                cells.append(lens)
            table.add_row(*cells)
        return table

    def lens_table(self, rec: dict[str, Any]) -> Table:
        c = int(rec["context"])
        probs = self.arrays["lens_probs"][c]
        table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 0, 0, 1),
                      caption=Text(f"logit lens at {rec['token']!r} (position {rec['position']}), shaded by "
                                   "probability; l: cosines",
                                   style="dim"), caption_justify="left")
        table.add_column("layer", justify="right", width=LAYER_W - 1, no_wrap=True)
        table.add_column("top tokens", no_wrap=True, overflow="crop",
                         max_width=max(8, (self.size.width or self.default_width) - LAYER_W))
        for r, layer in enumerate(self.data["layers"]):
            text = Text()
            for j, tok in enumerate(rec["lens"][r]):
                text.append(("" if j == 0 else " ") + token_label(tok, 9), style=shade(float(probs[r, j])))
                text.append(f" {probs[r, j]:.0%}", style="dim")
            table.add_row(layer, text)
        return table
