"""Terminal views of the lens analyses (imported only when the UI shows them). Each follows the
app's focused prompt (and token) through ``follow(run, focus)``.

- :class:`LensGridView`: layers x positions, each cell the lens's top token shaded by its
  probability (``r``: the target's rank instead); the focused token's column is marked.
- :class:`DLAView`: the metric's largest terms as bars, and attention vs MLP per layer.
- :class:`DistributionView`: the next-token distribution recomputed from the stored logits at a
  temperature the user changes live (``+`` / ``-``), with entropy, top-k, nucleus and seeded
  samples (``r`` draws the next seed's).
- :class:`NeuronsView`: the top neurons of the focused prompt, and each described neuron's
  top-activating tokens and promoted / suppressed tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import Binding, BindingType

from workbench.kit import PromptView, bar, shade, short

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

TEMPERATURES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)


class LensGridView(PromptView):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("r", "toggle_rank", "top token / target rank")]
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run, window: int = 10) -> None:
        super().__init__(stored, run)
        self.arrays = stored.arrays
        self.window = window
        self.show_rank = False

    def action_toggle_rank(self) -> None:
        self.show_rank = not self.show_rank
        self.update(self.draw())

    def draw(self) -> Any:
        rec = self.record()
        if rec is None:
            return Text(f"prompt {self.prompt} is not in this result (it covers {len(self.by_index)} prompts)",
                        style="dim")
        labels = self.data["layers"]
        off, n = rec["offset"], rec["n_tokens"]
        pos = min(self.pos, n - 1)
        strs = [t.label for t in self.run.display_tokens(self.prompt)]  # byte pieces as <E4>
        cols = self.columns(n)
        top = self.arrays["top_ids"][off : off + n, :, 0]
        probs = self.arrays["top_probs"][off : off + n, :, 0]
        rank = self.arrays["target_rank"][off : off + n]
        targets = self.arrays["target_ids"][off : off + n]
        names = [t.label for t in self.run.display_ids(np.unique(top[list(cols)]))]
        decode = dict(zip(np.unique(top[list(cols)]).tolist(), names))
        title = Text.assemble(("logit lens", "bold"), f" · prompt {self.prompt} · ",
                              ("target rank" if self.show_rank else "top token, shaded by probability"),
                              ("   r: toggle", "dim"))
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("layer", justify="right")
        for p in cols:
            table.add_column(Text(short(strs[p], 7), style="reverse" if p == pos else ""), justify="center")
        for r in reversed(range(len(labels))):
            cells: list[Any] = []
            for p in cols:
                if self.show_rank:
                    rk = int(rank[p, r])
                    cells.append(Text("-" if rk < 0 else str(rk), style=shade(1.0 / rk) if rk > 0 else ""))
                else:
                    cells.append(Text(short(decode[int(top[p, r])], 7), style=shade(float(probs[p, r]))))
            table.add_row(labels[r], *cells)
        target_row = [Text(short(self.run.display_ids([int(t)])[0].label, 7) if t >= 0 else "-", style="italic")
                      for t in (targets[p] for p in cols)]
        table.add_row(Text("target", style="italic"), *target_row)
        return Group(title, table, self.detail(off, pos, strs))

    def detail(self, off: int, pos: int, strs: list[str]) -> Text:
        labels = self.data["layers"]
        t = off + pos
        ids = self.arrays["top_ids"][t, -1].tolist()
        words = [t.label for t in self.run.display_ids(ids)]
        text = Text(f"\nposition {pos} {strs[pos]!r}: output ")
        text.append(", ".join(f"{w!r} {p:.1%}" for w, p in zip(words, self.arrays["top_probs"][t, -1])))
        target = int(self.arrays["target_ids"][t])
        if target >= 0:
            ranks = self.arrays["target_rank"][t]
            first = next((labels[r] for r in range(len(labels)) if ranks[r] == 1), None)
            text.append(f"\ntarget {self.run.display_ids([target])[0].describe()}: rank "
                        + " → ".join(f"{int(ranks[r])}" for r in range(0, len(labels), max(1, len(labels) // 8)))
                        + f" → {int(ranks[-1])} (every {max(1, len(labels) // 8)} layers)"
                        + (f"; first top-1 after layer {first}" if first else ""))
        kl = self.arrays["kl"][t]
        parts = [f"{labels[0] if labels[0] == 'embed' else 'layer ' + labels[0]} {kl[0]:.2f}"]
        if len(kl) > 2:
            parts.append(f"middle {kl[len(kl) // 2]:.2f}")
        if len(kl) > 1:
            parts.append(f"next-to-last {kl[-2]:.3f}")
        text.append(f"\nKL(final || layer): {', '.join(parts)} nats", style="dim")
        return text


class DLAView(PromptView):
    def draw(self) -> Any:
        rec = self.record()
        if rec is None or "skipped" in rec:
            return Text(f"prompt {self.prompt}: no attribution stored"
                        + (f" ({rec['skipped']})" if rec else ""), style="dim")
        i = self.prompt
        a = self.stored.arrays
        head = Text.assemble(("direct logit attribution", "bold"),
                             f" · prompt {i}, position {rec['position']} {rec['token']!r} ({rec['source']})\n",
                             f"{rec['metric']} = {rec['actual']:.3f}; parts sum to {rec['total']:.3f} "
                             f"(error {rec['abs_error']:.1e}) · attention {rec['attention_total']:+.2f}, "
                             f"MLPs {rec['mlp_total']:+.2f}")
        scale = max((abs(c["value"]) for c in rec["top"]), default=1.0)
        top = Table(box=None, pad_edge=False, show_header=False)
        top.add_column(justify="right")
        top.add_column(justify="right")
        top.add_column()
        for c in rec["top"]:
            top.add_row(c["component"], f"{c['value']:+.3f}", bar(c["value"], scale))
        heads = a["heads"][i]
        attn = heads.sum(1) + np.nan_to_num(a["attn_bias"][i])
        mlp = a["mlp"][i]
        lscale = float(max(np.abs(attn).max(), np.abs(mlp).max(), 1e-12))
        layers = Table(title="per layer", title_justify="left", box=None, pad_edge=False, header_style="bold")
        for col in ("layer", "attention", "", "MLP", "", "top head"):
            layers.add_column(col, justify="right" if col in ("layer", "attention", "MLP") else "left")
        for layer in range(len(attn)):
            h = int(np.argmax(np.abs(heads[layer])))
            layers.add_row(str(layer), f"{attn[layer]:+.2f}", bar(float(attn[layer]), lscale, 14),
                           f"{mlp[layer]:+.2f}", bar(float(mlp[layer]), lscale, 14),
                           f"H{h} {heads[layer, h]:+.2f}")
        return Group(head, top, Text(""), layers)


class DistributionView(PromptView):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("plus,equals_sign", "temperature(1)", "hotter"),
        Binding("minus", "temperature(-1)", "colder"),
        Binding("r", "resample", "new samples"),
    ]
    can_focus = True

    def __init__(self, stored: StoredResult, run: Run, shown: int = 12, n_samples: int = 12) -> None:
        super().__init__(stored, run)
        self.t_index = TEMPERATURES.index(1.0)
        self.seed = int(self.data.get("seed", 0))
        self.shown = shown
        self.n_samples = n_samples

    @property
    def temperature(self) -> float:
        return TEMPERATURES[self.t_index]

    def action_temperature(self, step: int) -> None:
        self.t_index = min(max(self.t_index + step, 0), len(TEMPERATURES) - 1)
        self.update(self.draw())

    def action_resample(self) -> None:
        self.seed += 1
        self.update(self.draw())

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """softmax(logits / T) in float64; T = 0 puts all mass on the argmax."""
        x = logits.astype(np.float64)
        if self.temperature == 0:
            p = np.zeros_like(x)
            p[int(np.argmax(x))] = 1.0
            return p
        x = x / self.temperature
        e = np.exp(x - x.max())
        return e / e.sum()  # type: ignore[no-any-return]

    def draw(self) -> Any:
        rec = self.record()
        if rec is None or "skipped" in rec:
            return Text(f"prompt {self.prompt}: no distribution stored", style="dim")
        logits = self.stored.arrays["logits"][self.prompt]
        p = self.probs(logits)
        order = np.argsort(-p)
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum()) + 0.0
        cum = np.cumsum(p[order])
        top_p = float(self.data["top_p"])
        nucleus = min(int(np.searchsorted(cum, top_p)) + 1, len(p))
        k = int(self.data["top_k"])
        head = Text.assemble(("next-token distribution", "bold"),
                             f" · prompt {self.prompt}, after {rec['token']!r}\n",
                             ("T = ", "bold"), (f"{self.temperature:g}", "bold yellow"),
                             f"   entropy {entropy:.3f} nats · top-{k} mass {cum[min(k, len(p)) - 1]:.1%} · "
                             f"top-p {top_p:g} takes {nucleus} token{'s' if nucleus != 1 else ''}",
                             ("   +/-: temperature · r: resample", "dim"))
        words = [t.label for t in self.run.display_ids(order[: self.shown])]
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for col, just in (("token", "right"), ("logit", "right"), ("prob", "right"), ("", "left")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for w, t in zip(words, order[: self.shown]):
            table.add_row(repr(w), f"{logits[t]:.2f}", f"{p[t]:.2%}", bar(float(p[t]), 1.0, 30))
        rng = np.random.default_rng([self.seed, self.prompt, self.t_index])
        samples = rng.choice(len(p), size=self.n_samples, p=p)
        sample_words = [t.label for t in self.run.display_ids(samples)]
        foot = Text(f"samples (seed {self.seed}): " + " ".join(repr(w) for w in sample_words), style="dim")
        return Group(head, table, foot)


class NeuronsView(PromptView):
    def draw(self) -> Any:
        rec = self.record()
        parts: list[Any] = []
        if rec is None or "skipped" in rec:
            parts.append(Text(f"prompt {self.prompt}: no neurons stored", style="dim"))
        else:
            parts.append(Text.assemble(("MLP neurons", "bold"),
                                       f" · prompt {self.prompt}, position {rec['position']} {rec['token']!r}: "
                                       f"{rec['metric']} · all MLPs {rec['mlp_total']:+.3f}"))
            scale = max((abs(x["term"]) for x in rec["top"] + rec["bottom"]), default=1.0)
            table = Table(box=None, pad_edge=False, header_style="bold")
            for col in ("neuron", "activation", "effect", "term", ""):
                table.add_column(col, justify="right" if col else "left")
            for x in rec["top"] + rec["bottom"]:
                table.add_row(x["neuron"], f"{x['activation']:.3f}", f"{x['effect']:.3f}", f"{x['term']:+.3f}",
                              bar(x["term"], scale, 20))
            parts.append(table)
        for nd in self.data["neurons"]:
            t = Text(f"\n{nd['neuron']}", style="bold")
            t.append("  promotes ", style="green")
            t.append(", ".join(repr(x["token"]) for x in nd["promotes"][:6]))
            t.append("  suppresses ", style="red")
            t.append(", ".join(repr(x["token"]) for x in nd["suppresses"][:6]))
            for e in nd["top_activations"][:5]:
                t.append(f"\n  {e['activation']:7.3f}  {e['context']!r}", style="dim")
            if nd.get("bottom_activations"):
                t.append("\n  most negative:", style="red")
            for e in nd.get("bottom_activations", [])[:3]:
                t.append(f"\n  {e['activation']:7.3f}  {e['context']!r}", style="dim")
            parts.append(t)
        return Group(*parts)
