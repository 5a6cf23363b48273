"""Terminal views of the interventions plugin (imported only when the UI shows them). Each follows
the app's focused prompt.

- :class:`AblationView`: layer x head, the change of the metric when the head is ablated (diverging
  colours), MLP and whole-layer ablations as columns beside it, and the baseline; ``p``: the
  residual stream's layer x position matrix instead.
- :class:`PatchingView`: activation patching, layer x position (``c`` cycles resid, attn, mlp) or
  layer x head, 0 = corrupted, 1 = clean; ``a``: attribution patching instead, with the correlation
  of the two in the title.
- :class:`SteeringView`: the generation without and with the direction, side by side, and the
  residual stream's projection onto the direction per layer, both ways.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import Binding, BindingType

from workbench.kit import PromptView, abs_max, bar, diverging_cell, short

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult


class _InterventionView(PromptView):
    """A view of one prompt's part of an intervention result: ``self.row[index]`` is the prompt's
    row in the result's per-prompt arrays."""

    window = 12

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__(stored, run)
        self.arrays = stored.arrays
        self.row = {p["index"]: n for n, p in enumerate(self.data["prompts"])}

    def position_table(self, block: np.ndarray, scale: float, rec: dict[str, Any], marked: set[int]) -> Table:
        """``block``: (positions, layers); columns: a window of positions around the focused one."""
        n = rec["n_tokens"]
        pos = min(self.pos, n - 1)
        cols = self.columns(n)
        strs = [t.label for t in self.run.display_tokens(self.prompt)]  # byte pieces as <E4>
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("layer", justify="right")
        for p in cols:
            style = "reverse" if p == pos else ("bold yellow" if p in marked else "")
            table.add_column(Text(short(strs[p], 7), style=style), justify="right")
        for layer in reversed(range(block.shape[1])):
            table.add_row(str(layer), *[diverging_cell(float(block[p, layer]), scale) for p in cols])
        return table


class AblationView(_InterventionView):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("p", "toggle_positions", "heads / positions")]
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__(stored, run)
        self.positions = "heads" not in self.arrays and "positions" in self.arrays

    def action_toggle_positions(self) -> None:
        if "positions" in self.arrays:
            self.positions = not self.positions or "heads" not in self.arrays and "mlp" not in self.arrays
            self.update(self.draw())

    def draw(self) -> Any:
        rec = self.record()
        if rec is None:
            return Text(f"prompt {self.prompt} is not in this result", style="dim")
        d, a, n = self.data, self.arrays, self.row[self.prompt]
        base = rec["baseline"]
        title = Text.assemble((f"{d['method']} ablation", "bold"), f" · prompt {self.prompt} · ",
                              (rec["metric_name"], "bold yellow"), f" = {base:+.3f} unablated · cells: change",
                              ("   p: heads / positions" if "positions" in a else "", "dim"))
        if self.positions:
            block = a["positions"][rec["offset"] : rec["offset"] + rec["n_tokens"]] - base
            sub = Text("residual stream at each layer's entry ablated at one position", style="dim")
            return Group(title, sub, self.position_table(block, abs_max(block), rec, set()))
        L = d["n_layers"]
        heads = a["heads"][n] - base if "heads" in a else np.zeros((L, 0))
        extra = {c: a[c][n] - base for c in ("mlp", "layers") if c in a}
        scale = abs_max(np.concatenate([heads.ravel(), *[v.ravel() for v in extra.values()]]))
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("layer", justify="right")
        for h in range(heads.shape[1]):
            table.add_column(f"H{h}", justify="right")
        for c in extra:
            table.add_column("MLP" if c == "mlp" else "layer", justify="right")
        for layer in reversed(range(L)):
            table.add_row(str(layer),
                          *[diverging_cell(float(heads[layer, h]), scale) for h in range(heads.shape[1])],
                          *[diverging_cell(float(v[layer]), scale) for v in extra.values()])
        sub = Text(f"±{scale:.2f} full colour (blue: the metric rises, red: it falls)", style="dim")
        return Group(title, sub, table)


class PatchingView(_InterventionView):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("c", "component", "component"),
                                             Binding("a", "toggle_attribution", "patching / attribution")]
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__(stored, run)
        self.component = 0
        self.attribution = False

    def action_component(self) -> None:
        self.component = (self.component + 1) % len(self.data["components"])
        self.update(self.draw())

    def action_toggle_attribution(self) -> None:
        if self.data["attribution"]:
            self.attribution = not self.attribution
            self.update(self.draw())

    def draw(self) -> Any:
        rec = self.record()
        if rec is None:
            return Text(f"prompt {self.prompt} is not in this result (prompts with a corrupted text only)",
                        style="dim")
        d, a, n = self.data, self.arrays, self.row[self.prompt]
        c = d["components"][self.component]
        key = f"attr_{c}" if self.attribution else c
        corr = rec["correlation"].get(c)
        title = Text.assemble((f"{'attribution' if self.attribution else 'activation'} patching", "bold"),
                              f" · {c} · prompt {self.prompt} · ", (rec["metric_name"], "bold yellow"),
                              f": clean {rec['clean']:+.3f}, corrupted {rec['corrupted_value']:+.3f}"
                              + (f" · attribution vs real r = {corr:+.2f}" if corr is not None else ""),
                              ("   c: component  a: real / attribution", "dim"))
        sub = Text(f"corrupted: {rec['corrupted']!r} (changed positions in yellow); 1 = clean behaviour restored",
                   style="dim")
        if c == "heads":
            block = a[key][n]
            table = Table(box=None, pad_edge=False, header_style="bold")
            table.add_column("layer", justify="right")
            for h in range(block.shape[1]):
                table.add_column(f"H{h}", justify="right")
            for layer in reversed(range(block.shape[0])):
                table.add_row(str(layer), *[diverging_cell(float(block[layer, h]), 1.0)
                                            for h in range(block.shape[1])])
            return Group(title, sub, table)
        block = a[key][rec["offset"] : rec["offset"] + rec["n_tokens"]]
        return Group(title, sub, self.position_table(block, 1.0, rec, set(rec["changed_positions"])))


class SteeringView(_InterventionView):
    can_focus = True

    def draw(self) -> Any:
        rec = self.record()
        if rec is None:
            return Text(f"prompt {self.prompt} is not in this result", style="dim")
        d, a, n = self.data, self.arrays, self.row[self.prompt]
        src = d["direction"]
        title = Text.assemble(("steering", "bold"), f" · {d['alpha']:+g} × ",
                              (str(src.get("name") or src.get("path")), "bold yellow"),
                              f" at layer {d['layer']} · temperature {d['sampling']['temperature']:g}, "
                              f"seed {d['seed']} · prompt {self.prompt}")
        side = Table(box=None, pad_edge=False, header_style="bold", expand=True)
        side.add_column("without", ratio=1)
        side.add_column("with", ratio=1)
        side.add_row(Text(rec["plain"]["text"]), Text(rec["steered"]["text"], style="bold"))
        proj = a["projection_generated"][n]  # (2, rows)
        scale = abs_max(proj)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col, just in (("layer", "right"), ("without", "right"), ("with", "right"), ("", "left")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for r, label in enumerate(d["rows"]):
            table.add_row(Text(label, style="reverse" if label == d["layer"] else ""),
                          f"{proj[0, r]:+.2f}", f"{proj[1, r]:+.2f}", bar(float(proj[1, r] - proj[0, r]), scale, 20))
        sub = Text("projection of the residual stream onto the unit direction, mean over the generated tokens "
                   "(bar: with − without)", style="dim")
        return Group(title, side, sub, table)
