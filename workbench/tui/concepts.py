"""Views that show a transformer's concepts on the stored numbers themselves.

- :class:`QKVView` (``6``): one head's attention at the focused token, step by step — the query
  vector, each key's ``q·k``, the scaling, the mask, the softmax, the weighted sum of values —
  with the largest difference from the stored hooks (:mod:`workbench.store.attention_steps`).
- :class:`VectorsView` (``7``): the focused token's vector at every stored point of the residual
  stream, dimension by dimension: its embedding row (the row of W_E the token picks, plus the
  position embedding where the model adds one) and how every block changes it.

Both follow the app's focus: ``←/→`` the token, ``[``/``]`` the layer, ``,``/``.`` the head,
``shift+←/→`` the key (Q·K·V) or the dimension (Vectors).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from workbench.errors import UserError
from workbench.kit.shading import Window, token_label
from workbench.store.attention_steps import attention_blocks, steps
from workbench.store.depth import residual_hooks
from workbench.tui.widgets import RunView

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.tui.state import Focus

TOLERANCE = 1e-5
"""Largest |computed − stored| shown as agreeing."""


def _rgb(v: float) -> Style:
    """A diverging background for ``v`` in [-1, 1]: red below zero, blue above, dark at zero."""
    v = 0.0 if not math.isfinite(v) else min(max(v, -1.0), 1.0)
    a = abs(v)
    if v >= 0:
        return Style(bgcolor=f"rgb({int(20 + 20 * a)},{int(25 + 95 * a)},{int(40 + 170 * a)})")
    return Style(bgcolor=f"rgb({int(40 + 170 * a)},{int(25 + 40 * a)},{int(20 + 20 * a)})")


def vector_strip(values: np.ndarray, width: int, cursor: int | None = None, scale: float | None = None) -> Text:
    """A vector as a line of shaded cells, one per dimension (blue positive, red negative, by
    ``|value| / scale``, the block character's density giving the magnitude on a terminal
    without colour; ``scale`` defaults to the largest ``|value|``), windowed to ``width``
    cells around ``cursor`` (drawn as ``◆``); ``…`` marks dimensions cut off."""
    n = len(values)
    top = scale if scale else float(np.abs(values).max(initial=0.0)) or 1.0
    win = Window.around(n, cursor or 0, max(1, width - 2))
    out = Text(no_wrap=True, overflow="crop")
    out.append("…" if win.start > 0 else " ", style="dim")
    for d in range(win.start, win.stop):
        if d == cursor:
            out.append("◆", style=Style(color="black", bgcolor="white", bold=True))
        else:  # the character carries |value| without colour; the colour its sign
            v = float(values[d]) / top
            level = " ░▒▓█"[min(4, int(abs(v) * 4 + 0.5))] if math.isfinite(v) else "?"
            out.append(level, style=Style(color="rgb(90,160,255)" if v >= 0 else "rgb(255,110,90)")
                       + _rgb(v))
    out.append("…" if win.stop < n else " ", style="dim")
    return out


def _check(errors: dict[str, float]) -> Text:
    if not errors:
        return Text("nothing stored to check against", style="dim")
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    text = Text("computed vs stored: ", style="bold")
    text.append(" · ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    text.append("  ✓ equal within 1e-5" if not bad else f"  ✗ {', '.join(bad)} differ", style="green" if not bad else "bold red")
    return text


class QKVView(RunView):
    """Q·K·V for one head at the focused token, every number checked against the stored hooks."""

    title = "Q·K·V"

    def draw(self, run: Run, focus: Focus, width: int, height: int) -> Any:
        blocks = attention_blocks(run)
        if not blocks:
            self._readout = ""
            return Text("this run stores no queries, keys and values (capture with --hooks attention-full)",
                        style="dim")
        prefix = blocks[focus.pattern % len(blocks)]
        n_heads = run.resolve(f"{prefix}.hook_q").feature_shape[0]
        focus.head %= n_heads
        q_stream = run.resolve(f"{prefix}.hook_q").stream_of_rows()
        pos = min(focus.pos, run.n_tokens(focus.prompt, q_stream) - 1)
        try:
            s = self.cached((run, focus.prompt, prefix, focus.head, pos),
                            lambda: steps(run, focus.prompt, prefix, focus.head, pos))
        except UserError as exc:
            self._readout = ""
            return Text(str(exc), style="dim")
        n_keys = len(s.key_tokens)
        focus.key = max(0, min(focus.key, n_keys - 1))
        kv = f" KV{s.kv_head}" if s.n_kv_heads != s.n_heads else ""
        header = Text.assemble((prefix, "bold"), f" [{focus.pattern % len(blocks) + 1}/{len(blocks)}] ",
                               (f"head {s.head}/{s.n_heads - 1}{kv}", "bold"), " query ",
                               (f"{pos} {token_label(s.query_token, 12)}", "bold"), no_wrap=True)
        formula = Text(f"score = q·k {s.scale_text}{' + bias' if s.bias is not None else ''}"
                       " → mask → softmax → weight;  z = Σ weight·v", style="dim", no_wrap=True)
        strips = Table.grid(padding=(0, 1))
        strips.add_column(style="bold", no_wrap=True)
        strips.add_column(no_wrap=True)
        strips.add_column(no_wrap=True, style="dim")
        room = max(8, width - 22)
        for label, vec in ((f"q @{pos}", s.q), (f"k @{focus.key}", s.keys[focus.key]),
                           (f"v @{focus.key}", s.values[focus.key]), ("z", s.z)):
            strips.add_row(label, vector_strip(vec, room), f"‖{float(np.linalg.norm(vec)):.3g}‖")

        table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
        for col, justify in (("key", "left"), ("q·k", "right"), ("scaled", "right"),
                             *((("bias", "right"),) if s.bias is not None else ()),
                             ("mask", "center"), ("weight", "right"), ("", "left")):
            table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        rows = max(1, height - 10 - len(s.notes))
        win = Window.around(n_keys, focus.key, rows)
        for k in range(win.start, win.stop):
            masked = bool(s.masked[k])
            style = "reverse" if k == focus.key else ("dim" if masked else "")
            cells: list[Any] = [f"{k} {token_label(s.key_tokens[k], 10)}", f"{s.dots[k]:+.3f}",
                                f"{s.dots[k] * s.scale:+.3f}"]
            if s.bias is not None:
                cells.append("" if masked else f"{s.bias[k]:+.3f}")
            cells += ["−∞" if masked else "", f"{s.weights[k]:.4f}",
                      Text("█" * round(s.weights[k] * 12), style="green")]
            table.add_row(*cells, style=style)
        k = focus.key
        self._readout = (f"head {s.head} query {pos} → key {k}: q·k {s.dots[k]:+.4f}, scaled "
                         f"{s.dots[k] * s.scale:+.4f}, " + ("masked (−∞), weight 0" if s.masked[k]
                                                          else f"weight {s.weights[k]:.4f}"))
        notes = [Text("• " + n, style="italic dim") for n in s.notes]
        return Group(header, formula, strips, table, _check(s.errors), *notes,
                     Text(self._readout, style="bold", no_wrap=True))


class VectorsView(RunView):
    """The focused token's vector at every stored residual point, dimension by dimension."""

    title = "Vectors"

    def draw(self, run: Run, focus: Focus, width: int, height: int) -> Any:
        points = residual_hooks(run)
        if not points:
            self._readout = ""
            return Text("this run stores no residual stream (capture with --hooks residual)", style="dim")
        pos = min(focus.pos, run.n_tokens(focus.prompt) - 1)
        vectors = self.cached((run, focus.prompt, pos), lambda: np.stack(
            [run.activation(name, focus.prompt)[pos].astype(np.float64) for _, name in points]))
        d_model = vectors.shape[1]
        focus.key = max(0, min(focus.key, d_model - 1))
        focus.point = max(0, min(focus.point, len(points) - 1))
        token = run.display_tokens(focus.prompt)[pos].label  # byte pieces as <E4>, specials by name
        token_id = int(run.tokens(focus.prompt)[pos])
        info = run.model_info
        tied = "tied to W_U (the unembedding is its transpose)" if info.get("tied_embeddings") else "W_U is separate"
        header = Text.assemble(("token ", "bold"), (f"{pos} {token_label(token, 14)} (id {token_id})", "bold"),
                               f"  d_model {d_model}  dim {focus.key}", no_wrap=True)
        sub = Text(f"embed = row {token_id} of W_E ({tied}); each row below: the vector after that point, "
                   "shaded per row by its largest |value|", style="dim")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, justify="right", style="dim")
        rows = Window.around(len(points), focus.point, max(1, height - 4))
        room = max(8, width - 24)
        for r in range(rows.start, rows.stop):
            vec = vectors[r]
            grid.add_row(Text(points[r][0].ljust(9), style="bold reverse" if r == focus.point else "bold"),
                         vector_strip(vec, room, cursor=focus.key), f"‖{float(np.linalg.norm(vec)):.4g}‖")
        here = vectors[focus.point]
        self._readout = (f"{points[focus.point][0]} at {pos} {token!r}: dim {focus.key} = {here[focus.key]:+.5g}, "
                         f"‖x‖ = {float(np.linalg.norm(here)):.4g}")
        return Group(header, sub, grid, Text(self._readout, style="bold", no_wrap=True))
