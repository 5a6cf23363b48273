"""Terminal views of the attention analyses (imported only when the UI shows them).

- :class:`HeadRolesView`: every head's scores in a table; ``o`` sorts by the next score (or click
  a column header), ``Enter`` on a head opens its attention heatmap. Below it, the "where does
  it look" panel for the focused token.
- :class:`AttendsToView`: the same panel alone, for an ``attends-to`` result.

The panel follows the app's focused prompt and token (``follow(run, focus)``: the views implement
:class:`workbench.kit.FollowsFocus`): for every layer, each head's most-attended keys with weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from workbench_plugins.attention import SCORES, lookup

from workbench.kit import ShowAttentionHead

if TYPE_CHECKING:
    from workbench.kit import Focus
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

SHORT = {"previous_token": "prev", "next_token": "next", "duplicate_token": "dup", "induction": "induct",
         "first_token": "first", "mean_distance": "dist", "entropy": "entropy"}


class LookPanel(Static):
    """Where the focused token looks: per layer, each head's top keys."""

    def __init__(self, run: Run, top: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run
        self.top = top
        self.shown: tuple[int, int] | None = None
        self.data: dict[str, Any] | None = None

    def follow(self, run: Run, focus: Focus) -> None:
        prompt, pos = focus.prompt, focus.pos
        if (prompt, pos) == self.shown and run is self.run:
            return
        self.run = run
        try:
            self.data = lookup(run, prompt, pos, self.top)
        except ValueError as exc:
            self.update(Text(str(exc), style="dim"))
            return
        self.shown = (prompt, pos)
        self.update(self.render_data(self.data))

    @staticmethod
    def render_data(d: dict[str, Any]) -> Any:
        q = d["query"]
        table = Table(title=Text.assemble("where does ", (repr(q["token"]), "bold"),
                                          f" (position {q['position']}, prompt {d['prompt']}) look?"),
                      title_justify="left", box=None, header_style="bold", pad_edge=False)
        table.add_column("layer")
        table.add_column("head")
        for k in range(d["top"]):
            table.add_column(f"key {k + 1}")
        for layer in d["layers"]:
            for h in layer["heads"]:
                cells: list[Any] = []
                for k in h["keys"]:
                    style = "bold" if k["weight"] >= 0.5 else ("" if k["weight"] >= 0.2 else "dim")
                    cells.append(Text(f"{k['token']!r}@{k['position']} {k['weight']:.2f}", style=style))
                kv = f" kv{h['kv_head']}" if h["kv_head"] is not None else ""
                cells += [""] * (d["top"] - len(cells))  # masked keys (weight 0) are not listed
                table.add_row(layer["label"], f"H{h['head']}{kv}", *cells)
        return table


class HeadRolesView(Vertical):
    """The head-roles table (sortable; Enter opens the head's heatmap) and the look panel."""

    DEFAULT_CSS = """
    HeadRolesView { height: auto; }
    HeadRolesView > #roles-summary { height: auto; }
    HeadRolesView > DataTable { height: auto; max-height: 16; }
    HeadRolesView > LookPanel { height: auto; margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("o", "sort_next", "sort by next score")]

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__()
        self.stored = stored
        self.data = stored.result().data
        self.run = run
        self.columns = [s for s in SCORES if any(r[s] is not None for r in self.data["heads"])]
        self.sort_by = "induction" if "induction" in self.columns else self.columns[0]

    def compose(self) -> ComposeResult:
        yield Static(self.summary(), id="roles-summary")
        yield DataTable(id="roles", cursor_type="row", zebra_stripes=True)
        yield LookPanel(self.run)

    def summary(self) -> Text:
        d = self.data
        text = Text()
        ind = d.get("induction")
        if ind:
            text.append(f"induction on {ind['seqs']}×2×{ind['length']} random tokens: loss "
                        f"{ind['loss_first_half']:.2f} → {ind['loss_second_half']:.2f} nats\n")
        bad = [c for c in d["checks"] if not c["ok"]]
        text.append("checks: ", style="bold")
        text.append("ok (rows sum to 1" + (", causal = 0 above the diagonal)" if any(c["causal"] for c in d["checks"])
                                          else ")") if not bad else f"{len(bad)} pattern(s) FAILED",
                    style="green" if not bad else "bold red")
        text.append("   o: sort · enter: heatmap", style="dim")
        return text

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("head", key="label")
        self.with_kv = any(r["kv_head"] is not None for r in self.data["heads"])
        if self.with_kv:
            table.add_column("kv", key="kv_head")
        for s in self.columns:
            table.add_column(SHORT[s], key=s)
        self.sort(self.sort_by)

    def ordered(self, score: str) -> list[dict[str, Any]]:
        """Heads by ``score``: largest first (entropy and distance: smallest first); heads the
        score does not apply to last."""
        smallest = score in ("entropy", "mean_distance")
        have = [r for r in self.data["heads"] if r[score] is not None]
        rest = [r for r in self.data["heads"] if r[score] is None]
        return sorted(have, key=lambda r: r[score] if smallest else -r[score]) + rest

    def sort(self, score: str) -> None:
        """Show the rows ordered by ``score`` (its header marked ▼); the cursor goes to the top."""
        self.sort_by = score
        table = self.query_one(DataTable)
        table.clear()
        for r in self.ordered(score):
            cells: list[Any] = [r["label"]]
            if self.with_kv:
                cells.append("" if r["kv_head"] is None else str(r["kv_head"]))
            cells += [Text(f"{r[s]:.3f}" if r[s] is not None else "-", justify="right",
                           style="bold" if s == score else "") for s in self.columns]
            table.add_row(*cells, key=f"{r['hook']}|{r['head']}")
        for s in self.columns:
            table.columns[s].label = Text(SHORT[s] + (" ▼" if s == score else ""))  # type: ignore[index]
        table.refresh()

    def action_sort_next(self) -> None:
        k = self.columns.index(self.sort_by)
        self.sort(self.columns[(k + 1) % len(self.columns)])

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        if str(event.column_key.value) in self.columns:
            self.sort(str(event.column_key.value))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        hook, head = str(event.row_key.value).rsplit("|", 1)
        self.post_message(ShowAttentionHead(hook, int(head)))

    def selected(self) -> tuple[str, int]:
        """(hook, head) under the table's cursor."""
        table = self.query_one(DataTable)
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        hook, head = str(key).rsplit("|", 1)
        return hook, int(head)

    def follow(self, run: Run, focus: Focus) -> None:
        for panel in self.query(LookPanel):  # none before compose or once removal began
            panel.follow(run, focus)


class AttendsToView(Vertical):
    """An ``attends-to`` result: the look panel, at the stored query until the focus moves."""

    DEFAULT_CSS = "AttendsToView { height: auto; }"

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__()
        self.stored = stored
        self.run = run

    def compose(self) -> ComposeResult:
        d = self.stored.result().data
        panel = LookPanel(self.run, top=d["top"])
        panel.update(LookPanel.render_data(d))
        panel.shown = (d["prompt"], d["query"]["position"])
        yield panel

    def follow(self, run: Run, focus: Focus) -> None:
        for panel in self.query(LookPanel):  # none before compose or once removal began
            panel.follow(run, focus)
