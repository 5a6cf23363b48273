"""Terminal views of the directions plugin (imported only when the UI shows them).

- :class:`NeighboursView`: each token's nearest tokens, the analogy and a direction's tokens
  (``m``: embedding / unembedding, ``d``: cosine / dot product).
- :class:`MapView`: the chosen tokens on their first two principal components (``m`` as above).
- :class:`SeparationView`: per layer, how well a direction separates its two sets (AUC,
  accuracy) and how close each layer's vector is to the chosen one.
- :class:`ProjectionView`: layers x positions of the focused prompt, each cell the residual
  stream's projection onto the direction (``c``: cosine instead), with the held-out AUC and
  accuracy per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import Static

from workbench.kit import PromptView, bar, diverging, short

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult


class _MatrixView(Static):
    """A view of an ``embeddings`` result with a choice of matrix (``m``)."""

    DEFAULT_CSS = "_MatrixView { height: auto; }"
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__()
        self.data = stored.data
        self.run = run
        self.matrix = 0

    @property
    def matrix_name(self) -> str:
        return str(self.data["matrices"][self.matrix])

    def on_mount(self) -> None:
        self.update(self.draw())

    def action_matrix(self) -> None:
        self.matrix = (self.matrix + 1) % len(self.data["matrices"])
        self.update(self.draw())

    def draw(self) -> Any:
        raise NotImplementedError


class NeighboursView(_MatrixView):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("m", "matrix", "embed / unembed"),
                                             Binding("d", "metric", "cosine / dot")]

    def __init__(self, stored: StoredResult, run: Run, shown: int = 8) -> None:
        super().__init__(stored, run)
        self.metric = "cosine"
        self.shown = shown

    def action_metric(self) -> None:
        self.metric = "dot" if self.metric == "cosine" else "cosine"
        self.update(self.draw())

    def _row(self, items: list[dict[str, Any]]) -> Text:
        text = Text()
        for j, x in enumerate(items[: self.shown]):
            text.append(("" if j == 0 else "  ") + repr(x["token"]))
            text.append(f" {x['score']:.2f}", style="dim")
        return text

    def draw(self) -> Any:
        d, m = self.data, self.matrix_name
        tied = " (tied: also the unembedding)" if d["tied"] else ""
        parts: list[Any] = [Text.assemble(("nearest tokens", "bold"), f" · {m}{tied} · by {self.metric}",
                                          ("   m: matrix · d: cosine/dot", "dim"))]
        table = Table(box=None, pad_edge=False, show_header=False)
        table.add_column(justify="right", style="bold")
        table.add_column()
        for t, nb in zip(d["tokens"], d["neighbours"][m]):
            table.add_row(repr(t["token"]), self._row(nb[self.metric]))
        parts.append(table)
        for s in d["skipped"]:
            parts.append(Text(f"skipped {s['word']!r}: {s['reason']}", style="dim"))
        a = d.get("analogy")
        if a is not None:
            parts.append(Text(""))
            if "skipped" in a:
                parts.append(Text(f"analogy {a['expression']!r}: {a['skipped']}", style="dim"))
            else:
                parts.append(Text.assemble((a["expression"], "bold"), " ≈ ", self._row(a[m][self.metric])))
        x = d.get("direction")
        if x is not None:
            parts.append(Text.assemble((f"direction {x['name']}", "bold"), " ≈ ", self._row(x[m][self.metric])))
        return Group(*parts)


class MapView(_MatrixView):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("m", "matrix", "embed / unembed")]

    def __init__(self, stored: StoredResult, run: Run, width: int = 72, height: int = 20) -> None:
        super().__init__(stored, run)
        self.width, self.height = width, height

    def canvas(self) -> list[str]:
        """The map as lines of text: each token's label starts at its (PC1, PC2) cell."""
        mp = self.data["map"]
        xy = np.asarray(mp[self.matrix_name]["xy"], dtype=np.float64)
        labels = [repr(t)[1:-1] for t in mp["tokens"]]
        span = np.where(np.ptp(xy, 0) > 0, np.ptp(xy, 0), 1.0)
        cols = ((xy[:, 0] - xy[:, 0].min()) / span[0] * (self.width - 1 - max(map(len, labels)))).round().astype(int)
        rows = ((xy[:, 1].max() - xy[:, 1]) / span[1] * (self.height - 1)).round().astype(int)
        grid = [[" "] * self.width for _ in range(self.height)]
        for c, r, label in zip(cols, rows, labels):
            cells = "•" + label
            # the nearest row (r, r+1, r-1, ...) where the label does not cover another one
            for dr in sorted(range(-self.height, self.height), key=lambda d: (abs(d), -d)):
                rr = r + dr
                if 0 <= rr < self.height and all(grid[rr][c + j] == " " for j in range(len(cells))
                                                 if c + j < self.width):
                    r = rr
                    break
            for j, ch in enumerate(cells):
                if c + j < self.width:
                    grid[r][c + j] = ch
        return ["".join(line).rstrip() for line in grid]

    def draw(self) -> Any:
        mp = self.data.get("map")
        if mp is None:
            return Text("no map: it needs at least three single-token words", style="dim")
        e = mp[self.matrix_name]["explained"]
        head = Text.assemble(("2-D map (PCA)", "bold"), f" · {self.matrix_name} · PC1 {e[0]:.0%} → , "
                             f"PC2 {e[1]:.0%} ↑ of the tokens' variance", ("   m: matrix", "dim"))
        return Group(head, Text("\n".join(self.canvas())))


class SeparationView(Static):
    DEFAULT_CSS = "SeparationView { height: auto; }"

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__()
        self.data = stored.data

    def on_mount(self) -> None:
        self.update(self.draw())

    def draw(self) -> Any:
        d = self.data
        head = Text.assemble(("direction ", "bold"), (d["name"], "bold yellow"),
                             f" · {d['source']} · |v| {d['norm']:.3f} · "
                             + (f"taken at layer {d['layer']}" if d["layer"] is not None else "one vector for every layer"))
        c = d.get("contrast")
        if not d["layers"] or not c:
            return Group(head, Text("no labelled prompts to score it on", style="dim"))
        sub = Text(f"{c['field']} = {c['positive']!r} ({c['n_positive']}) vs {c['negative']!r} ({c['n_negative']}); "
                   f"AUC and accuracy on {c['evaluated_on']}" + (" · labels shuffled (control)" if c["shuffled"] else ""),
                   style="dim")
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col, just in (("layer", "right"), ("AUC", "right"), ("", "left"), ("accuracy", "right"),
                          ("cos to chosen", "right")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for x in d["layers"]:
            table.add_row(Text(x["layer"], style="reverse" if x["layer"] == d["layer"] else ""), f"{x['auc']:.3f}",
                          bar(max(x["auc"] - 0.5, 0.0), 0.5, 24), f"{x['accuracy']:.1%}",
                          f"{x['cosine_to_chosen']:+.2f}")
        return Group(head, sub, table)


class ProjectionView(PromptView):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("c", "toggle_cosine", "projection / cosine")]
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run, window: int = 12) -> None:
        super().__init__(stored, run)
        self.arrays = stored.arrays
        self.window = window
        self.cosine = False

    def action_toggle_cosine(self) -> None:
        self.cosine = not self.cosine
        self.update(self.draw())

    def draw(self) -> Any:
        rec = self.record()
        if rec is None:
            return Text(f"prompt {self.prompt} is not in this result", style="dim")
        d = self.data
        rows = d["rows"]
        off, n = rec["offset"], rec["n_tokens"]
        pos = min(self.pos, n - 1)
        values = self.arrays["cosine" if self.cosine else "projection"][off : off + n]
        start, end = rec.get("span", (0, n))  # colours scale to the prompt's own tokens (not a decoder's sink)
        scale = float(np.abs(values[start:end]).max()) or 1.0
        cols = self.columns(n)
        strs = [t.label for t in self.run.display_tokens(self.prompt)]  # byte pieces as <E4>
        sep = {x["layer"]: x for x in d["separation"]}
        label = f" · {d['field']}={rec['label']!r}" if rec.get("label") is not None else ""
        title = Text.assemble(("projection onto ", "bold"), (d["direction"], "bold yellow"),
                              f" · prompt {self.prompt}{label} · {'cosine' if self.cosine else 'projection'}"
                              f" (±{scale:.2f} full colour; special and sink positions dim)",
                              ("   c: projection / cosine", "dim"))
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("layer", justify="right")
        for p in cols:
            table.add_column(Text(short(strs[p], 7), style="reverse" if p == pos else ""), justify="right")
        if sep:
            table.add_column("AUC", justify="right")
            table.add_column("acc", justify="right")
        for r in reversed(range(len(rows))):
            cells = [Text(f"{values[p, r]:.2f}" if self.cosine else f"{values[p, r]:.1f}",
                          style=diverging(float(values[p, r]) / scale) if start <= p < end else "dim")
                     for p in cols]
            x = sep.get(rows[r])
            extra = ([f"{x['auc']:.2f}", f"{x['accuracy']:.0%}"] if x else ["", ""]) if sep else []
            table.add_row(rows[r], *cells, *extra)
        return Group(title, table)
