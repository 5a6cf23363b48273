"""The terminal view of a ``diff`` result (imported only when the UI shows it): what changed from
run A (the run on screen) to run B, for the focused prompt and token.

:class:`DiffView` follows the app's focused prompt (an index into run A, mapped to the pair whose
``a`` it is; a prompt without a pair says so) and token (``follow(run, focus)``:
:class:`workbench.kit.FollowsFocus`). It shows, fitted to the panel's width:

- a heatmap of the token hooks (rows, last layer on top) by position (a window around the focused
  token, marked ``▼``): the relative L2 difference ``||a − b|| / ||a||``, or ``1 − cos`` (``m``
  toggles), shaded from 0 to the pair's largest value, with the hottest cell named;
- the focused token: each hook's relative L2 and ``1 − cos``, the next-token KL (from the top-k: a
  lower bound) and the loss change, the logit lens's KL per layer where it was computed;
- the attention heads: layers x heads, the mean Jensen–Shannon divergence over all pairs beside
  the divergence at the focused query token, and the largest of each;
- the most changed tokens of the prompt (by the chosen measure, averaged over the hooks) beside
  the predictions that moved most in it, and the most changed positions of all pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import Binding, BindingType

from workbench.kit import PromptView, Window, bar, cell, legend, token_label

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

MAIN = "tokens"
"""The stream the focused token indexes (the prompt's main stream)."""
MEASURES = ("rel_l2", "1-cos")
TITLES = {"rel_l2": "rel L2 ‖a−b‖/‖a‖", "1-cos": "1 − cosine"}
LABEL_W = 14
CELL_W = 2


def num(x: float | None, digits: int = 4) -> str:
    """Fixed point, or scientific for values too small to show there; ``-`` for none or NaN."""
    if x is None or not np.isfinite(x):
        return "-" if x is None or np.isnan(x) else str(x)
    if x != 0 and abs(x) < 10 ** -(digits - 1):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def hook_label(hook: str, width: int = 99) -> str:
    """A hook as a row label: ``blocks.3.hook_resid_post`` -> ``3 resid_post`` (cut to ``width``)."""
    parts = hook.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        label = f"{parts[1]} " + ".".join(p.removeprefix("hook_") for p in parts[2:])
    else:
        label = ".".join(p.removeprefix("hook_") for p in parts)
    return label if len(label) <= width else label[: width - 1] + "…"


class Fitted:
    """A Rich renderable built for the width it is given (the panel's)."""

    def __init__(self, build: Callable[[int], Any]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width)


class DiffView(PromptView):
    """Follows the focus as every :class:`~workbench.kit.PromptView` does; its per-prompt records
    are the result's pairs, by run A's prompt index."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("m", "toggle_measure", "rel L2 / 1−cos")]
    DEFAULT_CSS = "DiffView { height: auto; }"
    can_focus = True
    records_key = "pairs"
    index_key = "a"

    def __init__(self, stored: StoredResult, run: Run) -> None:
        super().__init__(stored, run)
        self.arrays = stored.arrays
        self.pairs: list[dict[str, Any]] = self.data["pairs"]
        self.pair_of = {int(p["a"]): n for n, p in enumerate(self.pairs)}
        self.left_out = {int(p["a"]): p for p in self.data.get("left_out", [])}
        self.measure = MEASURES[0]
        rows = [(k, r) for k, r in enumerate(self.data["token_hooks"]) if r["stream"] == MAIN]
        # last layer on top; hooks outside a block (embed, final norm) by where they come
        rows.sort(key=lambda kr: (-1 if kr[1]["layer"] is None and "embed" in kr[1]["hook"] else
                                  (10**6 if kr[1]["layer"] is None else kr[1]["layer"]), kr[0]), reverse=True)
        self.rows = rows
        self.other_streams = len(self.data["token_hooks"]) - len(rows)
        self.heads = [(k, r) for k, r in enumerate(self.data["square_hooks"]) if r["stream"] == MAIN]

    # --- keys (following the focus: PromptView) ---------------------------------------------

    def action_toggle_measure(self) -> None:
        self.measure = MEASURES[(MEASURES.index(self.measure) + 1) % len(MEASURES)]
        self.update(self.draw())

    # --- values -----------------------------------------------------------------------------

    def pair(self) -> int | None:
        """Index into ``data["pairs"]`` of the focused prompt's pair."""
        return self.pair_of.get(self.prompt)

    def span(self, n: int) -> tuple[int, int]:
        off = self.arrays["offsets.tokens"]
        return int(off[n]), int(off[n + 1])

    def values(self, k: int, start: int, stop: int, measure: str | None = None) -> np.ndarray:
        """Token hook ``k``'s chosen measure over tokens ``[start, stop)`` (float64)."""
        if (measure or self.measure) == "rel_l2":
            return self.arrays[f"rel_l2.{k}"][start:stop].astype(np.float64)
        return 1.0 - self.arrays[f"cos.{k}"][start:stop].astype(np.float64)

    def block(self, n: int) -> np.ndarray:
        """The focused pair's (rows, positions) matrix of the chosen measure."""
        start, stop = self.span(n)
        if not self.rows:
            return np.zeros((0, stop - start))
        return np.stack([self.values(k, start, stop) for k, _ in self.rows])

    # --- drawing ----------------------------------------------------------------------------

    def draw(self) -> Any:
        n = self.pair()
        if n is None:
            why = self.left_out.get(self.prompt)
            return Text(f"prompt {self.prompt} is not paired" +
                        (f" (left out: {why['reason']})" if why else f" ({len(self.pairs)} prompts are)"),
                        style="dim")
        return Fitted(lambda width: self.layout(n, width))

    def layout(self, n: int, width: int) -> Any:
        p = self.pairs[n]
        strs = [t.label for t in self.run.display_tokens(self.prompt)]
        pos = max(0, min(self.pos, int(p["n_tokens"]) - 1))
        block = self.block(n)
        title = Text.assemble(("run diff", "bold"), f" · prompt {self.prompt} ↔ B {p['b']} ({p['id']}) · ",
                              (TITLES[self.measure], "bold yellow"), ("   m: measure", "dim"))
        if not p["same_tokens"]:
            title.append("\nthe two prompts' tokens differ (compared position by position)", style="dim")
        parts: list[Any] = [title, self.heatmap(block, strs, pos, width), Text(""), self.here(n, pos, strs)]
        if self.heads:
            parts += [Text(""), self.head_grids(n, pos, width)]
        parts += [Text(""), self.changed(n, strs, width)]
        return Group(*parts)

    def heatmap(self, block: np.ndarray, strs: list[str], pos: int, width: int) -> Text:
        out = Text(no_wrap=True, overflow="crop")
        if not len(block):
            out.append("no token hook of the prompt's stream in common", style="dim")
            return out
        n_pos = block.shape[1]
        fit = max(1, (width - LABEL_W - 1) // CELL_W)
        w = Window.around(n_pos, pos, fit)
        finite = block[np.isfinite(block)]
        vmax = float(finite.max()) if finite.size else 0.0
        ticks = [" "] * ((w.stop - w.start) * CELL_W + 4)
        for c in range(w.start, w.stop):
            if c % 5 == 0 or c == w.start:
                at = (c - w.start) * CELL_W
                if all(ch == " " for ch in ticks[max(0, at - 1) : at + len(str(c))]):
                    ticks[at : at + len(str(c))] = list(str(c))
        out.append(" " * (LABEL_W + 1) + "".join(ticks).rstrip() + "\n", style="dim")
        marker = " " * (LABEL_W + 1 + (pos - w.start) * CELL_W) + "▼ " + token_label(strs[pos], 12)
        out.append(marker + "\n", style="bold")
        for r, (_, row) in enumerate(self.rows):
            out.append(hook_label(row["hook"], LABEL_W).rjust(LABEL_W) + " ")
            for c in range(w.start, w.stop):
                here = cell(float(block[r, c]), vmax, width=CELL_W)
                if c == pos:
                    here.stylize("on grey23")
                out.append_text(here)
            out.append("\n")
        out.append_text(legend(vmax, "scale "))
        if finite.size and vmax > 0:
            r, c = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(block), block, -np.inf))), block.shape)
            out.append(f"\nhottest: {hook_label(self.rows[r][1]['hook'])} @ {c} {token_label(strs[c], 12)} "
                       f"= {num(float(block[r, c]))}")
            if not w.start <= c < w.stop:
                out.append(" (outside the window)", style="dim")
        else:
            out.append("\nno difference in this prompt", style="dim")
        if self.other_streams:
            out.append(f"\n{self.other_streams} hooks of another stream not shown", style="dim")
        return out

    def here(self, n: int, pos: int, strs: list[str]) -> Any:
        start, _ = self.span(n)
        t = start + pos
        head = Text.assemble(("position ", "bold"), (f"{pos} {token_label(strs[pos], 16)}", "bold"))
        if "kl_topk" in self.arrays:
            head.append(f" · KL(A‖B) ≥ {num(float(self.arrays['kl_topk'][t]))} (top-k)")
            dl = float(self.arrays["dloss"][t])
            head.append(" · Δloss " + ("-" if not np.isfinite(dl) else f"{dl:+.4f}"))
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col, just in (("hook", "right"), ("rel L2", "right"), ("1−cos", "right"), ("", "left")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        vals = [(row["hook"], float(self.values(k, t, t + 1, "rel_l2")[0]),
                 float(self.values(k, t, t + 1, "1-cos")[0])) for k, row in self.rows]
        pick = 1 if self.measure == "rel_l2" else 2
        scale = max((v[pick] for v in vals if np.isfinite(v[pick])), default=0.0)  # bar: full at the largest
        shown = vals if len(vals) <= 12 else sorted(vals, key=lambda v: -np.nan_to_num(v[pick], nan=-1))[:12]
        for hook, rel, cos in [v for v in vals if v in shown]:
            v = (rel, cos)[pick - 1]
            table.add_row(hook_label(hook), num(rel), num(cos), bar(v if np.isfinite(v) else 0.0, scale, 16))
        parts: list[Any] = [head, table]
        if len(shown) < len(vals):
            parts.append(Text(f"the 12 largest of {len(vals)} hooks", style="dim"))
        lens = self.data.get("lens") or {}
        if "lens_kl" in self.arrays and lens.get("layers"):
            kl = self.arrays["lens_kl"][:, t]
            parts.append(Text("logit lens KL(A‖B) by layer: " +
                              " ".join(f"{li}:{num(float(v), 3)}" for li, v in zip(lens["layers"], kl))))
        elif "skipped" in lens:
            parts.append(Text(f"logit lens: not computed ({lens['skipped']})", style="dim"))
        return Group(*parts)

    def head_grids(self, n: int, pos: int, width: int) -> Any:
        start, _ = self.span(n)
        q = start + pos
        mean = [np.asarray(r["heads"], dtype=np.float64) for _, r in self.heads]
        now = [self.arrays[f"js.{k}"][q].astype(np.float64) for k, _ in self.heads]
        n_heads = max(len(m) for m in mean)
        vmax = max((float(np.nanmax(x)) for x in mean + now if x.size), default=0.0)
        vmax = max(vmax, 0.0)
        cw = CELL_W if 2 * n_heads * CELL_W + 9 <= width else 1  # two grids side by side
        grid_w = min(n_heads, max(1, (width - 9) // (2 * cw))) * cw
        title = Text("attention heads: JS divergence (nats, ≤ ln 2)", style="bold")
        out = Text(no_wrap=True, overflow="crop")
        out.append(f"{'layer':>6} " + "mean, all pairs".ljust(max(grid_w, 16)) + "  " + f"at position {pos}\n",
                   style="dim")
        for (_, row), m, x in reversed(list(zip(self.heads, mean, now))):
            label = str(row["layer"]) if row["layer"] is not None else hook_label(row["hook"])
            out.append(f"{label[:6]:>6} ")
            line = Text()
            for h in range(min(len(m), grid_w // cw)):
                line.append_text(cell(float(m[h]), vmax, width=cw))
            line.pad_right(max(grid_w, 16) - line.cell_len)
            out.append_text(line)
            out.append("  ")
            for h in range(min(len(x), grid_w // cw)):
                out.append_text(cell(float(x[h]), vmax, width=cw))
            out.append("\n")
        if grid_w // cw < n_heads:
            out.append(f"(the first {grid_w // cw} of {n_heads} heads shown)\n", style="dim")
        out.append_text(legend(vmax, "scale "))
        ranked = self.data["ranked"]["heads"][:4]
        lines = []
        if ranked:
            lines.append("most changed: " + " · ".join(f"L{r['layer']}H{r['head']} {num(r['mean_js'])}"
                                                       for r in ranked))
        here = sorted(((float(x[h]), row["layer"], h) for (_, row), x in zip(self.heads, now)
                       for h in range(len(x))), key=lambda v: -v[0])[:4]
        lines.append(f"at position {pos}: " + " · ".join(f"L{layer}H{h} {num(v)}" for v, layer, h in here))
        return Group(title, out, Text("\n".join(lines)))

    def changed(self, n: int, strs: list[str], width: int) -> Any:
        tokens = Table(box=None, pad_edge=False, header_style="bold")
        tokens.add_column("pos", justify="right")
        tokens.add_column("token")
        tokens.add_column("rel L2" if self.measure == "rel_l2" else "1−cos", justify="right")
        if self.rows:
            stack = self.block(n)
            stack[~np.isfinite(stack)] = np.nan
            counts = np.isfinite(stack).sum(axis=0)
            per = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
            for c in np.argsort(-np.nan_to_num(per, nan=-1.0), kind="stable")[:5]:
                tokens.add_row(str(c), token_label(strs[c], 12), num(float(per[c])))
        moved = Table(box=None, pad_edge=False, header_style="bold")
        lm = self.data.get("lm")
        mine = [m for m in (lm or {}).get("moved", []) if m["pair"] == n][:5]
        for col, just in (("pos", "right"), ("token", "left"), ("A → B", "left")):
            moved.add_column(col, justify=just)  # type: ignore[arg-type]
        for m in mine:
            moved.add_row(str(m["position"]), token_label(m["token"], 12),
                          f"{num(m['p_a'], 3)} → {num(m['p_b'], 3)}")
        left = Group(Text("most changed tokens", style="bold"), tokens)
        right = Group(Text("predictions that moved", style="bold"), moved)
        parts: list[Any] = []
        if width >= 64:
            side = Table.grid(padding=(0, 3))
            side.add_row(left, right)
            parts.append(side)
        else:
            parts += [left, right]
        if lm is None:
            parts.append(Text("no next-token outputs in both runs", style="dim"))
        elif not mine:
            parts.append(Text("none of this prompt among the predictions that moved most overall", style="dim"))
        else:
            parts.append(Text("-: outside that run's stored top-k", style="dim"))
        top = self.data["ranked"]["positions"][:5]
        if top:
            parts.append(Text("most changed positions overall (prompt@position, rel L2): " + " · ".join(
                f"{self.pairs[r['pair']]['a']}@{r['position']} {num(r['mean_rel_l2'])}" for r in top)))
        return Group(*parts)
