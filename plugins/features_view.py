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
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static
from workbench_plugins.features_panes import CACHED_PROMPTS, SORTS, Panes

if TYPE_CHECKING:
    from workbench.kit import Focus
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

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


class FeaturesView(Panes, Static):
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
            x = np.asarray(self.run.activation(self.hook, prompt), dtype=np.float32)
            rows, cols, vals = sae.encode_sparse(x)
            if len(self._encoded) >= CACHED_PROMPTS:
                self._encoded.pop(next(iter(self._encoded)))
            self._encoded[prompt] = (rows, cols, vals, len(x))
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
