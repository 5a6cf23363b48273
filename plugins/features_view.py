"""The terminal view of a ``features`` result: SAE feature dashboards (imported only when the UI
shows it).

:class:`FeaturesView` has three panes, one on screen at a time, each fitted to the panel (80 x 24
leaves it about 32 x 16 beside the sidebar, 56 x 17 without it):

- **list**: one row per feature — id, density, max and mean activation (where active), its most
  promoted token with that logit — sorted by density, max or logit effect (``o`` cycles; the
  largest promoted logit), dead features hidden (``d`` shows them), ``/`` keeps the features one
  of whose promoted tokens contains the text (case-insensitive; empty: all). ↑ ↓ PageUp PageDown
  Home End move the cursor, Enter opens its dashboard.
- **dashboard** of one feature: fires / density, max, mean; the activation histogram over its
  log10 bins as one line of bars between the activation values at its ends; its top promoted (+)
  and suppressed (−) tokens with their logits (or why they are absent); then its top contexts,
  each two lines: the tokens around the best position, shaded by the feature's activation
  (computed here by encoding the context's prompt with the SAE, numpy only), and under each token
  a block character of that level (``█`` = the feature's max, blank = inactive), so it reads
  without colour; the value and ``#prompt:position`` in front. ``v`` swaps the contexts for the
  histogram as a table (bin range, bar, count). ↑ ↓: previous / next feature of the list,
  PageUp / PageDown: scroll, Esc: back.
- **here** (``h``): the features active at the app's focused token, strongest first, each with
  its activation, that as a share of the feature's max, and its top promoted tokens; it follows
  ← → and the prompt list. ↑ ↓ pick one, Enter opens its dashboard.

The list and the dashboard end with the same "here" line (the features at the focused token), so
moving along the token strip shows what fires without leaving them. The SAE is reloaded from the
result's ``sae.source`` (the stored ``sae`` result's key, or the SAELens folder) on first need;
where that fails the contexts' shading and the here pane say why, the rest still shows.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.cells import cell_len
from rich.console import Group
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from workbench.kit import CHARS, RAMP, Window, level, shade, token_label

if TYPE_CHECKING:
    from workbench.kit import Focus
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

SORTS = ("density", "max", "logit")
SORT_LABEL = {"density": "density", "max": "max activation", "logit": "logit effect"}
SPARK = " ▁▂▃▄▅▆▇█"
"""Histogram bar heights: blank for an empty bin, then eight levels up to the fullest bin."""
CACHED_PROMPTS = 64
"""Prompts whose encoding (sparse) the view keeps."""
TOKEN_W = 12
"""Widest a token is shown in a context line."""


def num(v: float, width: int = 6) -> str:
    """``v`` in at most ``width`` characters, as many significant digits as fit (up to 3)."""
    for fmt in ("{:.3g}", "{:.2g}", "{:.1g}", "{:.0e}"):
        s = fmt.format(v)
        if len(s) <= width:
            return s
    return s


def pct(d: float) -> str:
    """A density as a percentage in at most 7 characters (``12.3%``, ``0.0123%``, ``1e-03%``)."""
    if d == 0:
        return "0"
    s = f"{100 * d:.3g}%"
    return s if len(s) <= 7 else f"{100 * d:.0e}%"


def line(*parts: Any) -> Text:
    """One line of the view: cut at the panel's edge with ``…``."""
    return Text.assemble(*parts, no_wrap=True, overflow="ellipsis")


def joined(parts: list[str], width: int, sep: str = " · ") -> str:
    """``parts`` joined by ``sep``, as many as fit in ``width`` (the first one always)."""
    out = parts[0] if parts else ""
    for p in parts[1:]:
        if len(out) + len(sep) + len(p) > width:
            break
        out += sep + p
    return out


class FindPromoted(ModalScreen[str | None]):
    """Ask for the text a feature's promoted tokens should contain."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    FindPromoted { align: center bottom; }
    FindPromoted > Vertical { width: 60; max-width: 100%; height: auto; border: round $accent;
                              background: $surface; }
    """

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("features promoting a token containing (empty: all):")
            yield Input(value=self.current, placeholder="e.g.  the", id="feature-search")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class FeaturesView(Static):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "↑", show=False),
        Binding("down", "cursor(1)", "↓", show=False),
        Binding("pageup", "page(-1)", "page ↑", show=False),
        Binding("pagedown", "page(1)", "page ↓", show=False),
        Binding("home", "cursor_to(0)", "first", show=False),
        Binding("end", "cursor_to(-1)", "last", show=False),
        Binding("enter", "open", "open"),
        Binding("escape,backspace", "back", "back"),
        Binding("o", "sort_next", "sort"),
        Binding("slash", "search", "find"),
        Binding("d", "toggle_dead", "dead"),
        Binding("h", "here", "here"),
        Binding("v", "toggle_hist", "hist"),
    ]
    DEFAULT_CSS = "FeaturesView { height: auto; }"
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run, width: int = 56, height: int = 17) -> None:
        super().__init__()
        self.data = stored.data
        self.arrays = stored.arrays
        self.run = run
        self.default_size = (width, height)
        a = self.arrays
        self.n = len(a["fires"])
        self.hook: str = self.data["hook"]
        try:
            self.stream = run.resolve(self.hook).stream_of_rows()
        except Exception:  # noqa: BLE001 - the hook is checked when the SAE loads
            self.stream = "main"
        self.id_w = len(str(max(self.n - 1, 0)))
        self.has_logits = "promoted_ids" in a
        vocab = self.data.get("logits", {}).get("vocab", {})
        self.vocab: dict[int, str] = {int(k): str(v) for k, v in vocab.items()}
        self.pane = "list"
        self.came_from = "list"
        self.sort_by = "density"
        self.show_dead = False
        self.query_text = ""
        self.cursor = 0
        self.feature = 0
        self.first = 0
        """First context (or histogram row) shown on the dashboard."""
        self.hist_table = False
        self.page_size = 1
        """Rows (or contexts) the pane showed last: PageUp / PageDown's step."""
        self.here_cursor = 0
        self.prompt, self.pos = 0, 0
        self._order: np.ndarray | None = None
        self._sae: Any = None
        self.sae_error: str | None = None
        self._encoded: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
        self._here: dict[int, list[list[tuple[int, float]]]] = {}

    # --- data ----------------------------------------------------------------------------------

    def token(self, tid: int) -> str:
        return self.vocab.get(int(tid), f"#{int(tid)}")

    def sort_keys(self) -> tuple[str, ...]:
        return SORTS if self.has_logits else SORTS[:2]

    def key_values(self, key: str) -> np.ndarray:
        a = self.arrays
        if key == "logit":
            return np.asarray(a["promoted"][:, 0], dtype=np.float64)
        return np.asarray(a[key], dtype=np.float64)

    def matches(self, text: str) -> np.ndarray:
        """Which features promote a token whose label contains ``text`` (case-insensitive)."""
        needle = text.lower()
        ids = self.arrays["promoted_ids"]
        hit = {int(t) for t in np.unique(ids) if needle in self.token(int(t)).lower()}
        return np.array([any(int(t) in hit for t in row) for row in ids], dtype=bool)

    def order(self) -> np.ndarray:
        """The features listed, in the list's order: largest first, ties by id."""
        if self._order is None:
            idx = np.arange(self.n)
            if not self.show_dead:
                idx = idx[np.asarray(self.arrays["fires"])[idx] > 0]
            if self.query_text and self.has_logits:
                idx = idx[self.matches(self.query_text)[idx]]
            values = self.key_values(self.sort_by)[idx]
            self._order = idx[np.argsort(-values, kind="stable")]
        return self._order

    def reorder(self, keep: int | None = None) -> None:
        """Recompute the list; the cursor stays on feature ``keep`` where it is still listed."""
        self._order = None
        order = self.order()
        where = np.flatnonzero(order == keep) if keep is not None else []
        self.cursor = int(where[0]) if len(where) else 0

    def sae_spec(self) -> str:
        """What names the SAE the result was computed with: the ``sae`` result's key, or the
        folder (a stored result's ``spec`` may be empty: the newest, which may have changed)."""
        sae = self.data.get("sae", {})
        m = re.match(r"sae result (\S+) ", str(sae.get("source", "")))
        if m:
            return m.group(1)
        return str(sae.get("source") or sae.get("spec") or "")

    def sae(self) -> Any:
        """The SAE (loaded on first need), or ``None`` with :attr:`sae_error` saying why."""
        if self._sae is None and self.sae_error is None:
            try:
                from workbench_plugins.sae import find_sae

                sae, _ = find_sae(self.run, self.sae_spec())
                if sae.d_sae != self.n:
                    raise ValueError(f"it has {sae.d_sae} features, the result {self.n}")
                self._sae = sae
            except Exception as exc:  # noqa: BLE001 - shown in the view, which keeps working
                self.sae_error = f"SAE not reloaded: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        return self._sae

    def encoded(self, prompt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
        """Prompt ``prompt`` encoded with the SAE, sparse: (positions, features, values, length)."""
        if prompt not in self._encoded:
            sae = self.sae()
            if sae is None:
                return None
            acts = sae.encode(np.asarray(self.run.activation(self.hook, prompt), dtype=np.float32))
            rows, cols = np.nonzero(acts > 0)
            if len(self._encoded) >= CACHED_PROMPTS:
                self._encoded.pop(next(iter(self._encoded)))
            self._encoded[prompt] = (rows, cols, acts[rows, cols], len(acts))
        return self._encoded[prompt]

    def activations(self, prompt: int, feature: int) -> np.ndarray | None:
        """Feature ``feature``'s activation at every position of prompt ``prompt``."""
        enc = self.encoded(prompt)
        if enc is None:
            return None
        rows, cols, vals, length = enc
        out = np.zeros(length, dtype=np.float32)
        keep = cols == feature
        out[rows[keep]] = vals[keep]
        return out

    def here(self) -> list[tuple[int, float]] | None:
        """The features active at the focused token, strongest first (``features_at``)."""
        from workbench_plugins.features import features_at

        sae = self.sae()
        if sae is None:
            return None
        if self.prompt not in self._here:
            if len(self._here) >= CACHED_PROMPTS:
                self._here.pop(next(iter(self._here)))
            self._here[self.prompt] = features_at(self.run, sae, self.hook, self.prompt, top=self.n)
        rows = self._here[self.prompt]
        return rows[self.pos] if 0 <= self.pos < len(rows) else []

    def labels(self, prompt: int) -> list[str]:
        return [t.label for t in self.run.display_tokens(prompt, self.stream)]

    # --- interaction ---------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.redraw()

    def on_resize(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        if self.is_mounted:
            self.update(self.draw())

    def follow(self, run: Run, focus: Focus) -> None:
        """Keep the focused prompt and token (the here pane and line)."""
        if run is not self.run:
            self.run = run
            self._encoded.clear()
            self._here.clear()
        if (focus.prompt, focus.pos) != (self.prompt, self.pos):
            self.prompt, self.pos = focus.prompt, focus.pos
            self.here_cursor = 0
            self.redraw()

    def open_feature(self, f: int) -> None:
        self.feature = int(f)
        self.first = 0
        where = np.flatnonzero(self.order() == f)
        if len(where):
            self.cursor = int(where[0])
        self.pane = "dashboard"

    def action_cursor(self, step: int) -> None:
        if self.pane == "here":
            n = len(self.here() or [])
            self.here_cursor = min(max(self.here_cursor + step, 0), max(n - 1, 0))
        else:
            order = self.order()
            if len(order):
                if self.pane == "dashboard":
                    where = np.flatnonzero(order == self.feature)
                    base = int(where[0]) if len(where) else self.cursor - (1 if step > 0 else 0)
                    self.cursor = min(max(base + step, 0), len(order) - 1)
                    self.feature, self.first = int(order[self.cursor]), 0
                else:
                    self.cursor = min(max(self.cursor + step, 0), len(order) - 1)
        self.redraw()

    def action_cursor_to(self, where: int) -> None:
        """Home / End: the first or last row (the dashboard: the first or last contexts)."""
        if self.pane == "dashboard":
            self.first = 0 if where == 0 else 10**9
        elif self.pane == "here":
            self.here_cursor = 0 if where == 0 else max(0, len(self.here() or []) - 1)
        else:
            self.cursor = 0 if where == 0 else max(0, len(self.order()) - 1)
        self.redraw()

    def action_page(self, step: int) -> None:
        """PageUp / PageDown: as many rows (contexts) as the pane shows."""
        if self.pane == "dashboard":
            self.first = max(0, self.first + step * self.page_size)
            self.redraw()
        elif self.pane == "list":
            order = self.order()
            if len(order):
                self.cursor = min(max(self.cursor + step * self.page_size, 0), len(order) - 1)
            self.redraw()
        else:
            self.action_cursor(step * self.page_size)

    def action_open(self) -> None:
        """Enter: the dashboard of the feature under the cursor (its contexts)."""
        if self.pane == "list":
            order = self.order()
            if len(order):
                self.came_from, self.hist_table = "list", False
                self.open_feature(int(order[self.cursor]))
        elif self.pane == "here":
            rows = self.here() or []
            if rows:
                self.came_from, self.hist_table = "here", False
                self.open_feature(rows[min(self.here_cursor, len(rows) - 1)][0])
        self.redraw()

    def action_back(self) -> None:
        self.pane = self.came_from if self.pane == "dashboard" else "list"
        self.came_from = "list"
        self.redraw()

    def action_here(self) -> None:
        if self.pane == "here":
            self.action_back()
            return
        self.came_from = "list"
        self.pane = "here"
        self.redraw()

    def action_sort_next(self) -> None:
        keys = self.sort_keys()
        self.sort_by = keys[(keys.index(self.sort_by) + 1) % len(keys)]
        self.reorder(self.feature if self.pane == "dashboard" else None)
        if self.pane == "here":
            self.pane = "list"
        self.redraw()

    def action_toggle_dead(self) -> None:
        self.show_dead = not self.show_dead
        order = self.order()
        self.reorder(int(order[self.cursor]) if len(order) else None)
        self.redraw()

    def action_toggle_hist(self) -> None:
        """The dashboard's contexts / histogram table (from the list or the here pane: the
        dashboard of the feature under the cursor, with the table)."""
        if self.pane != "dashboard":
            self.action_open()
            if self.pane != "dashboard":
                return
            self.hist_table = True
        else:
            self.hist_table = not self.hist_table
        self.first = 0
        self.pane = "dashboard"
        self.redraw()

    def action_search(self) -> None:
        if not self.has_logits:
            note = self.data.get("logits", {}).get("note", "no logit effects stored")
            self.notify(f"no promoted tokens to search: {note}", severity="warning")
            return
        self.app.push_screen(FindPromoted(self.query_text), self.search)

    def search(self, text: str | None) -> None:
        """Keep the features promoting a token containing ``text`` (``None``: unchanged)."""
        if text is None:
            return
        self.query_text = text.strip()
        self.reorder()
        self.pane = "list"
        self.redraw()

    # --- drawing -------------------------------------------------------------------------------

    def room(self) -> tuple[int, int]:
        """Width and height the view may fill: the panel it sits in, else the defaults."""
        width = self.size.width or self.default_size[0]
        parent = self.parent
        height = getattr(getattr(parent, "content_region", None), "height", 0) or self.default_size[1]
        return max(20, width), max(6, height)

    def draw(self) -> Any:
        width, height = self.room()
        if self.pane == "dashboard":
            lines = self.draw_dashboard(width, height)
        elif self.pane == "here":
            lines = self.draw_here(width, height)
        else:
            lines = self.draw_list(width, height)
        return Group(*lines[:height])

    def here_line(self, width: int) -> Text:
        """``at #3:5 'cat': 12 3.45 · 7 1.2``: the features at the focused token."""
        out = line((f"at #{self.prompt}:{self.pos} ", "bold"))
        feats = self.here()
        if feats is None:
            out.append(self.sae_error or "", style="dim")
            return out
        labels = self.labels(self.prompt) if 0 <= self.prompt < len(self.run) else []
        if 0 <= self.pos < len(labels):
            out.append(token_label(labels[self.pos], 8), style="reverse")
        out.append(": " if feats else ": nothing fires", style="dim" if not feats else "")
        out.append(joined([f"{f} {num(v)}" for f, v in feats], max(0, width - cell_len(out.plain))))
        return out

    def list_columns(self, width: int) -> tuple[bool, int]:
        """Whether the mean column fits, and the width left for the promoted token."""
        fixed = 1 + self.id_w + 1 + 7 + 1 + 6
        rest = width - fixed - 7
        mean = rest >= 10 or not self.has_logits
        return mean, max(0, rest if mean else rest + 7) - 1

    def draw_list(self, width: int, height: int) -> list[Text]:
        a = self.arrays
        order = self.order()
        fires = np.asarray(a["fires"])
        dead = int((fires == 0).sum())
        title = line((f"{len(order)}/{self.n} features", "bold"))
        parts = [f"/{self.query_text}"] if self.query_text else []
        if dead:
            parts.append(f"{dead} dead {'shown' if self.show_dead else 'hidden'}")
        parts.append(f"by {SORT_LABEL[self.sort_by]}")  # also the header's ▼
        title.append(joined(["", *parts], width - len(title.plain)))
        mean, tok_w = self.list_columns(width)
        mark = {k: ("▼" if self.sort_by == k else "") for k in SORTS}
        head = f" {'f':>{self.id_w}} {'dens' + mark['density']:>7} {'max' + mark['max']:>6}"
        if mean:
            head += f" {'mean':>6}"
        if self.has_logits and tok_w >= 4:
            head += " " + ("promotes" + mark["logit"])[:tok_w]
        out = [title, line((head, "bold"))]
        rows = max(1, height - 3)
        self.page_size = rows
        if not len(order):
            why = f"no feature promotes a token containing {self.query_text!r}" if self.query_text else \
                "no features (all dead: d shows them)"
            out.append(line((why, "dim")))
        w = Window.around(len(order), self.cursor, rows)
        for k in range(w.start, w.stop):
            f = int(order[k])
            here = k == self.cursor
            s = f"{'▶' if here else ' '}{f:>{self.id_w}} {pct(float(a['density'][f])):>7}"
            s += f" {num(float(a['max'][f])) if fires[f] else '-':>6}"
            if mean:
                s += f" {num(float(a['mean_active'][f])) if fires[f] else '-':>6}"
            row = line((s, "bold reverse" if here else ("dim" if not fires[f] else "")))
            if self.has_logits and tok_w >= 4:
                value = f" {float(a['promoted'][f, 0]):+.2f}" if tok_w >= 12 else ""
                row.append(" " + token_label(self.token(int(a["promoted_ids"][f, 0])), tok_w - len(value)),
                           style="bold" if here else "")
                row.append(value, style="dim")
            out.append(row)
        out += [line("")] * max(0, rows - max(1, w.stop - w.start))
        out.append(self.here_line(width))
        return out

    def spark(self, f: int, width: int) -> Text:
        """``hist 0.1 ▂▅█▃▁ 4.6``: the histogram's non-empty span as one line of bars (bins merged
        in pairs, threes ... when it is wider than the room), between the activations at its
        ends."""
        hist = np.asarray(self.arrays["hist"][f], dtype=np.int64)
        edges = np.asarray(self.arrays["hist_edges"], dtype=np.float64)
        out = line(("hist ", "bold"))
        nz = np.flatnonzero(hist)
        if not len(nz):
            out.append("empty", style="dim")
            return out
        first, last = int(nz[0]), int(nz[-1])
        lo, hi = f"{10 ** edges[first]:.2g}", f"{10 ** edges[last + 1]:.2g}"
        room = max(1, width - 5 - len(lo) - len(hi) - 2)
        span = hist[first:last + 1]
        group = -(-len(span) // room)
        span = np.add.reduceat(span, np.arange(0, len(span), group))
        top = span.max()
        bars = "".join(SPARK[0] if c == 0 else SPARK[max(1, min(8, int(np.ceil(8 * c / top))))] for c in span)
        out.append(lo + " ", style="dim")
        out.append(bars, style="cyan")
        out.append(" " + hi, style="dim")
        return out

    def logit_lines(self, f: int, width: int) -> list[Text]:
        if not self.has_logits:
            note = self.data.get("logits", {}).get("note", "not stored")
            return [line(("logits ", "bold"), (note, "dim"))]
        a = self.arrays
        out = []
        for sign, ids, vals, style in (("+", "promoted_ids", "promoted", "green"),
                                       ("−", "suppressed_ids", "suppressed", "red")):
            t = line((sign, f"bold {style}"))
            for tid, v in zip(a[ids][f], a[vals][f], strict=True):
                piece = f" {token_label(self.token(int(tid)), 8)} {float(v):+.2f}"
                if cell_len(t.plain) + cell_len(piece) > width:
                    break
                t.append(" " + token_label(self.token(int(tid)), 8), style="bold")
                t.append(f" {float(v):+.2f}", style="dim")
            out.append(t)
        return out

    def context(self, f: int, j: int, width: int, prefix: int) -> list[Text]:
        """Context ``j`` of feature ``f``: the tokens around its position shaded by the feature's
        activation, and under them the level as block characters."""
        a = self.arrays
        p, t = int(a["top_prompt"][f, j]), int(a["top_pos"][f, j])
        value = float(a["top_values"][f, j])
        vmax = float(a["max"][f])
        labels = [token_label(s, TOKEN_W) for s in self.labels(p)]
        acts = self.activations(p, f)
        room = max(1, width - prefix)
        lo, hi = t, t + 1
        used = 2 + (cell_len(labels[t]) if t < len(labels) else 0)  # with its brackets
        while True:  # two tokens on the left for one on the right, while they fit
            grew = False
            for side in ("l", "l", "r"):
                k = lo - 1 if side == "l" else hi
                if 0 <= k < len(labels) and used + cell_len(labels[k]) <= room:
                    used += cell_len(labels[k])
                    lo, hi = (k, hi) if side == "l" else (lo, k + 1)
                    grew = True
            if not grew:
                break
        top = line((f"{num(value):>{prefix - 1}} ", "bold"))
        under = line((f"{f'#{p}:{t}':>{prefix - 1}} ", "dim"))
        for k in range(lo, hi):
            act = float(acts[k]) if acts is not None and k < len(acts) else 0.0
            style = Style.parse(shade(act / vmax) if act > 0 and vmax > 0 else "")
            if k == t:
                top.append("[", style="bold")
                under.append(" ")
            top.append(labels[k], style=style + Style(bold=True) if k == t else style)
            n = cell_len(labels[k])
            if acts is None:
                under.append(("^" if k == t else " ") * n, style="dim")
            elif act > 0:
                lv = level(act, vmax)
                under.append(CHARS[lv] * n, style=Style(color=f"color({RAMP[lv]})"))
            else:
                under.append(" " * n)
            if k == t:
                top.append("]", style="bold")
                under.append(" ")
        return [top, under]

    def hist_rows(self, f: int, width: int) -> list[Text]:
        """The histogram as a table: each bin from the first to the last non-empty one, its
        activation range, a bar and its count."""
        hist = np.asarray(self.arrays["hist"][f], dtype=np.int64)
        edges = np.asarray(self.arrays["hist_edges"], dtype=np.float64)
        nz = np.flatnonzero(hist)
        if not len(nz):
            return [line(("no active tokens", "dim"))]
        bins = range(int(nz[0]), int(nz[-1]) + 1)
        ranges = [f"{10 ** edges[b]:.3g}–{10 ** edges[b + 1]:.3g}" for b in bins]
        lw = max(len(r) for r in ranges)
        cw = len(f"{hist.max():,}")
        bar_w = max(1, width - lw - cw - 2)
        top = int(hist.max())
        out = []
        for r, b in zip(ranges, bins, strict=True):
            c = int(hist[b])
            n = 0 if c == 0 else max(1, round(c / top * bar_w))
            out.append(line((f"{r:>{lw}} ", "dim"), ("█" * n, "cyan"), " " * (bar_w - n),
                            (f" {c:>{cw},}", "bold" if c == top else "")))
        return out

    def draw_dashboard(self, width: int, height: int) -> list[Text]:
        a = self.arrays
        f = self.feature
        fires = int(a["fires"][f])
        head = line((f"feature {f}", "bold"))
        order = self.order()
        where = np.flatnonzero(order == f)
        rank = f"{int(where[0]) + 1}/{len(order)} by {self.sort_by}" if len(where) else "not listed"
        head.append(" " + joined([f"fires {fires:,}", pct(float(a["density"][f])), rank], width - len(head.plain) - 1))
        stats = line(joined([f"max {num(float(a['max'][f]))}", f"mean {num(float(a['mean_active'][f]))}",
                             f"tokens {self.data.get('tokens_encoded', 0):,}"], width))
        out = [head, stats, self.spark(f, width), *self.logit_lines(f, width)]
        rows = height - len(out) - 1
        if self.hist_table:
            body = self.hist_rows(f, width)
            title = line(("histogram", "bold"), (" log10 bins · v: contexts", "dim"))
            self.first = min(self.first, max(0, len(body) - (rows - 1)))
            shown = body[self.first:self.first + max(0, rows - 1)]
            self.page_size = max(1, rows - 1)
        else:
            ctxs = [j for j in range(a["top_prompt"].shape[1]) if int(a["top_prompt"][f, j]) >= 0]
            fit = max(0, (rows - 1) // 2)
            self.first = min(self.first, max(0, len(ctxs) - fit))
            title = line(("top contexts", "bold"))
            if not ctxs:
                title.append(" none: it never fired", style="dim")
            else:
                title.append(f" {self.first + 1}-{min(len(ctxs), self.first + fit)} of {len(ctxs)}", style="dim")
                if self.sae_error:
                    title.append(f" · {self.sae_error}", style="dim")
                else:
                    title.append(" · █ near the max", style="dim")
            chosen = ctxs[self.first:self.first + fit]
            self.page_size = max(1, fit)
            prefix = max((max(len(num(float(a["top_values"][f, j]))),
                              len(f"#{int(a['top_prompt'][f, j])}:{int(a['top_pos'][f, j])}")) for j in chosen),
                         default=0) + 1
            shown = [x for j in chosen for x in self.context(f, j, width, prefix)]
        if rows >= 2:
            out.append(title)
            out += shown
        out += [line("")] * max(0, height - 1 - len(out))
        out.append(self.here_line(width))
        return out

    def draw_here(self, width: int, height: int) -> list[Text]:
        a = self.arrays
        title = line((f"fires at #{self.prompt}:{self.pos} ", "bold"))
        labels = self.labels(self.prompt) if 0 <= self.prompt < len(self.run) else []
        if 0 <= self.pos < len(labels):
            title.append(token_label(labels[self.pos], 16), style="reverse")
        out = [title]
        feats = self.here()
        if feats is None:
            out.append(line((self.sae_error or "", "dim")))
            return out
        notes = [f"{len(feats)} active", "⏎ dashboard"]
        skipped = self.data.get("skipped", {})
        if self.pos == 0 and skipped.get("first_position"):
            notes.insert(1, "position 0: not in the statistics")
        out.append(line((joined(notes, width), "dim")))
        if not feats:
            out.append(line(("no feature fires on this token", "dim")))
            return out
        self.here_cursor = min(self.here_cursor, len(feats) - 1)
        out.append(line((f" {'f':>{self.id_w}} {'act':>6} {'%max':>4}" + (" promotes" if self.has_logits else ""),
                         "bold")))
        self.page_size = max(1, height - 3)
        w = Window.around(len(feats), self.here_cursor, self.page_size)
        for k in range(w.start, w.stop):
            f, v = feats[k]
            here = k == self.here_cursor
            share = v / float(a["max"][f]) if float(a["max"][f]) > 0 else 0.0
            row = line((f"{'▶' if here else ' '}{f:>{self.id_w}} {num(v):>6} {min(share, 9.99):>4.0%}",
                        "bold reverse" if here else ""))
            if self.has_logits:
                room = width - cell_len(row.plain)
                toks = [token_label(self.token(int(t)), 8) for t in a["promoted_ids"][f][:6]]
                row.append(" " + joined(toks, max(0, room - 1), " "), style="bold" if here else "")
            out.append(row)
        return out
