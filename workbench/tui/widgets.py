"""The UI's widgets: the token strip and the raw views of a stored run.

Every view is a :class:`RunView`: the app calls :meth:`RunView.show` with the run and the focus
whenever either changes (only for the view on screen), and the view draws itself to its size.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.cells import cell_len
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from workbench.hooknames import part_of
from workbench.tui import render as R
from workbench.tui.state import shows_damage

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.tui.state import Focus


class RunView(Static):
    """Base of the views drawn from the stored run alone."""

    DEFAULT_CSS = "RunView { height: 1fr; width: 1fr; padding: 0 1; }"
    title = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.run: Run | None = None
        self.focus_state: Focus | None = None
        self._cache: tuple[Any, Any] | None = None

    def cached(self, key: Any, compute: Any) -> Any:
        """``compute()``, kept for as long as ``key`` stays the same: moving the cursor redraws
        without reading the run again (a prompt's arrays change only with the prompt, the layer
        or the run)."""
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, compute())
        return self._cache[1]

    def show(self, run: Run, focus: Focus) -> None:
        self.run, self.focus_state = run, focus
        self.redraw()

    @shows_damage
    def redraw(self) -> None:
        if self.run is None or self.focus_state is None or len(self.run) == 0:
            self.update(Text("no prompts committed yet", style="dim"))
            return
        width, height = self.content_size
        self.update(self.draw(self.run, self.focus_state, max(20, width), max(4, height)))

    def on_resize(self) -> None:
        self.redraw()

    def draw(self, run: Run, focus: Focus, width: int, height: int) -> Any:
        raise NotImplementedError

    def readout(self) -> str:
        """The view's cursor line as plain text (what the user reads; tests read it too)."""
        return getattr(self, "_readout", "")


def _legend_if_room(line: Text, legend: Text, width: int) -> None:
    if line.cell_len + 3 + legend.cell_len <= width:
        line.append(" " * (width - line.cell_len - legend.cell_len))
        line.append_text(legend)


class TokenStrip(Static):
    """The focused prompt's tokens on one or two lines, the focused one highlighted; with ids on,
    each token shows its id (tokenization made visible)."""

    DEFAULT_CSS = "TokenStrip { height: auto; max-height: 4; padding: 0 1; }"

    def show(self, run: Run, focus: Focus) -> None:
        self.run, self.focus_state = run, focus
        self.redraw()

    def on_resize(self) -> None:
        if getattr(self, "run", None) is not None:
            self.redraw()

    @shows_damage
    def redraw(self) -> None:
        run, focus = self.run, self.focus_state
        if run is None or len(run) == 0:
            self.update(Text("waiting for the first prompt…", style="dim"))
            return
        tokens = run.display_tokens(focus.prompt)
        ids = run.tokens(focus.prompt)
        width = max(20, self.content_size.width or 78)
        pieces = []
        for p, tok in enumerate(tokens):
            label = R.token_label(tok.label, 16)
            if focus.show_ids:
                label = f"{label}₍{int(ids[p])}₎"
            pieces.append(label)
        # Two lines of tokens at most: a window of whole tokens around the focus.
        budget = 2 * width - 4
        lo = hi = focus.pos
        used = cell_len(pieces[focus.pos]) + 1  # terminal cells: CJK and emoji take two
        while True:
            grew = False
            if hi + 1 < len(pieces) and used + cell_len(pieces[hi + 1]) + 1 <= budget:
                hi += 1
                used += cell_len(pieces[hi]) + 1
                grew = True
            if lo > 0 and used + cell_len(pieces[lo - 1]) + 1 <= budget:
                lo -= 1
                used += cell_len(pieces[lo]) + 1
                grew = True
            if not grew:
                break
        text = Text(overflow="fold")
        if lo > 0:
            text.append("… ", style="dim")
        for p in range(lo, hi + 1):
            style = "bold reverse" if p == focus.pos else ("cyan" if p % 2 else "")
            if p >= run.n_input_tokens(focus.prompt):
                style += " italic"  # generated
            text.append(pieces[p], style=style)
            text.append(" ")
        if hi + 1 < len(pieces):
            text.append("…", style="dim")
        self.update(text)


class InfoLine(Static):
    """One line under the token strip: the focused token, its id, its loss."""

    DEFAULT_CSS = "InfoLine { height: 1; padding: 0 1; color: $text-muted; }"

    @shows_damage
    def show(self, run: Run, focus: Focus) -> None:
        if len(run) == 0:
            self.update("")
            return
        tokens = run.display_tokens(focus.prompt)
        ids = run.tokens(focus.prompt)
        parts = [f"prompt {focus.prompt + 1}/{len(run)}", f"token {focus.pos}/{len(tokens) - 1}",
                 f"{tokens[focus.pos].describe()} id {int(ids[focus.pos])}"]
        if run.has_lm_outputs and run.lm_stream == "tokens":
            loss = float(run.loss(focus.prompt)[focus.pos])
            if math.isfinite(loss):
                parts.append(f"loss {loss:.3f}")
        self.update(" · ".join(parts))


class AttentionView(RunView):
    """One attention pattern (layer, head) as a shaded query × key grid."""

    title = "Attention"

    def draw(self, run: Run, focus: Focus, width: int, height: int) -> Any:
        hooks = R.pattern_hooks(run)
        if not hooks:
            self._readout = ""
            return Text("this run stores no attention patterns (capture with --hooks attention)",
                        style="dim")
        focus.pattern %= len(hooks)
        name = hooks[focus.pattern]
        spec = run.resolve(name)
        pattern = self.cached((run, focus.prompt, name),
                              lambda: run.activation(name, focus.prompt))  # (heads, q, k)
        n_heads = pattern.shape[0]
        focus.head %= n_heads
        q_stream, k_stream = spec.square_streams()
        q_tokens, k_tokens = (run.display_tokens(focus.prompt, s) for s in (q_stream, k_stream))
        # The strip's position is the query on every stream (a decoder query past the encoder's
        # length is reached by clamping; the cursor line names the query token).
        qpos = min(focus.pos, len(q_tokens) - 1)
        focus.key = max(0, min(focus.key, len(k_tokens) - 1))
        weight = float(pattern[focus.head, qpos, focus.key])
        self._readout = (f"query {qpos} {q_tokens[qpos].describe()} → key {focus.key} "
                         f"{k_tokens[focus.key].describe()}: {weight:.4f}")
        info = run.model_info
        kv = ""
        n_kv = info.get("n_kv_heads")
        if n_kv and n_kv != n_heads and n_heads % n_kv == 0:
            kv = f" (KV head {focus.head // (n_heads // n_kv)} of {n_kv})"
        kind = ("cross-attention" if q_stream != k_stream else
                "bidirectional" if run.family == "encoder" or part_of(name) == "encoder"
                else "causal")
        header = Text.assemble(
            (name, "bold"), f"  [{focus.pattern + 1}/{len(hooks)}]  ",
            (f"head {focus.head}/{n_heads - 1}{kv}", "bold"), f"  {kind}", no_wrap=True)
        _legend_if_room(header, R.legend(1.0, "weight "), width)
        body = R.grid(pattern[focus.head], [t.label for t in q_tokens], [t.label for t in k_tokens],
                      (qpos, focus.key), width, height - 2, vmax=1.0)
        return Group(header, body, Text(self._readout, style="bold", no_wrap=True))


class NormsView(RunView):
    """Residual-stream norms: points of the stream (embedding, each layer) × positions, on a log
    colour scale (``l``: linear) with an attention-sink first position out of the scale (``x``)."""

    title = "Residual"

    def draw(self, run: Run, focus: Focus, width: int, height: int) -> Any:
        labels, norms = self.cached((run, focus.prompt), lambda: R.residual_norms(run, focus.prompt))
        if not labels:
            self._readout = ""
            return Text("this run stores no residual stream (capture with --hooks residual)", style="dim")
        focus.point = max(0, min(focus.point, len(labels) - 1))
        tokens = run.display_tokens(focus.prompt)
        pos = min(focus.pos, norms.shape[1] - 1)
        value = float(norms[focus.point, pos])
        self._readout = f"{labels[focus.point]} at {pos} {tokens[pos].describe()}: ‖x‖ = {value:.4g}"
        skip = focus.skip_sink if focus.skip_sink is not None else R.sink_position(run, norms)
        scaled = norms[:, 1:] if skip and norms.shape[1] > 1 else norms
        vmax = float(np.nanmax(scaled)) if scaled.size else 1.0
        shown, top = norms, vmax
        if focus.log_scale:
            positive = scaled[scaled > 0]
            floor = float(positive.min()) if positive.size else 1.0
            # log(norm / floor) + a sliver, so the smallest norm is still drawn (0 is left blank)
            shown = np.log(np.maximum(norms, floor) / floor) + 1e-3
            top = math.log(vmax / floor) + 1e-3 if vmax > floor else 1.0
        shown = np.minimum(shown, top)
        header = Text.assemble(("residual norm", "bold"), f" {'log' if focus.log_scale else 'linear'} scale (l)",
                               " · sink 0 off scale (x)" if skip else "", no_wrap=True)
        _legend_if_room(header, R.legend(vmax, "norm "), width)
        body = R.grid(shown, labels, [t.label for t in tokens], (focus.point, pos), width, height - 2,
                      vmax=top, label_width=10)
        return Group(header, body, Text(self._readout, style="bold", no_wrap=True))


class TopKView(RunView):
    """The model's top-k next-token predictions at the focused position, with probabilities."""

    title = "Top-k"

    def draw(self, run: Run, focus: Focus, width: int, height: int) -> Any:
        if not run.has_lm_outputs:
            self._readout = ""
            return Text("this run has no predictions: its model has no trained LM head", style="dim")
        stream = run.lm_stream
        tokens = run.display_tokens(focus.prompt, stream)
        pos = min(focus.pos, len(tokens) - 1)
        ids, logprobs = run.top_k(focus.prompt)
        names = run.display_ids(ids[pos])
        target = None
        if run.lm_target == "next":
            if pos + 1 < len(tokens):
                target = int(run.tokens(focus.prompt, stream)[pos + 1])
        elif run.lm_target == "same":
            target = int(run.tokens(focus.prompt, stream)[pos])
        else:
            t = int(run.targets(focus.prompt)[pos])
            target = t if t >= 0 else None
        what = {"next": "next token after", "same": "token at"}.get(run.lm_target, "target at")
        table = Table(box=None, pad_edge=False, expand=False, header_style="bold")
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("id", justify="right")
        table.add_column("prob", justify="right")
        table.add_column("", min_width=10)
        bar_width = max(4, min(30, width - 40))
        for r in range(min(len(names), max(1, height - 4))):
            p = math.exp(float(logprobs[pos, r]))
            hit = target is not None and int(ids[pos, r]) == target
            table.add_row(str(r + 1), Text(R.token_label(names[r].label, 24), style="bold green" if hit else ""),
                          str(int(ids[pos, r])), f"{p:.4f}", Text("█" * max(0, round(p * bar_width)), style="green"))
        loss = float(run.loss(focus.prompt)[pos])
        actual = ""
        if target is not None:
            shown = tokens[pos + 1] if run.lm_target == "next" else run.display_ids([target])[0]
            actual = f"actual {shown.describe()}"
            if math.isfinite(loss):
                actual += f": p = {math.exp(-loss):.4f}, loss {loss:.3f}"
        self._readout = (f"{what} {pos} {tokens[pos].describe()}: top {names[0].describe()} "
                         f"{math.exp(float(logprobs[pos, 0])):.4f}")
        header = Text.assemble((f"predictions for the {what} {pos} ", "bold"), tokens[pos].describe())
        return Group(header, table, Text(actual, style="dim"))


class InfoView(RunView):
    """Run metadata and provenance: what was run, on what, how."""

    title = "Run"

    def draw(self, run: Run, focus: Focus, width: int, height: int) -> Any:
        info = run.model_info
        s = run.capture_settings
        n_kv = info.get("n_kv_heads")
        kv = f" ({n_kv} KV)" if n_kv not in (None, info.get("n_heads")) else ""
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        rows: list[tuple[str, str]] = [
            ("file", f"{run.final_path.name} ({run.size_bytes() / 1e6:.1f} MB, {run.status})"),
            ("prompts", f"{len(run)} committed of {run.planned_prompts} planned"),
            ("tokens", ", ".join(f"{k}: {run.n_tokens_total(k)}" for k in run.streams)),
            ("model", f"{info.get('name')} · {info.get('architecture')} · {info.get('family')}"),
            ("shape", (f"{info.get('n_layers')} layers · {info.get('n_heads')} heads{kv} · "
                       f"d_model {info.get('d_model')} · vocab {info.get('d_vocab')} · "
                       f"context {info.get('n_ctx')} tokens")),
            ("provenance", json.dumps(info.get("provenance"), default=str)),
            ("BOS", json.dumps(info.get("bos"), default=str)),
            ("stored", f"{len(run.hooks)} tensors, {run.storage_dtype}, compression "
                       + str(s.compression or "none")),
            ("requested", ", ".join(map(str, s.hooks_requested))),
            ("LM outputs", f"loss + top-{s.top_k} ({run.lm_target})" if run.has_lm_outputs else "none"),
            ("generation", json.dumps(s.generation) if s.generation else "none"),
            ("versions", ", ".join(f"{k} {v}" for k, v in s.versions.items())),
            ("run id", run.run_id),
        ]
        for k, v in rows:
            table.add_row(k, v)
        hooks = Table(box=None, header_style="bold", pad_edge=False)
        hooks.add_column("stored tensor")
        hooks.add_column("axes")
        hooks.add_column("shape")
        room = max(1, height - len(rows) - 3)
        specs = list(run.hooks.values())
        for spec in specs[:room]:
            hooks.add_row(spec.name, ",".join(spec.axes), "×".join(map(str, spec.feature_shape)))
        more = Text(f"… and {len(specs) - room} more" if len(specs) > room else "", style="dim")
        self._readout = rows[0][1]
        return Group(table, Text(""), hooks, more)
