"""Drawing the panes of :class:`workbench_plugins.features_view.FeaturesView` (the feature list,
a feature's dashboard, the features at the focused token): Rich lines fitted to the panel. Kept
apart from the view's state and keys so each module stays small; imported only when the UI shows
the view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.cells import cell_len
from rich.console import Group
from rich.style import Style
from rich.text import Text

from workbench.kit import CHARS, RAMP, Window, level, shade, token_label

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



class Panes:
    """The drawing methods of the features view (a mix-in: the view holds the state they read)."""


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
