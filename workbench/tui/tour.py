"""``workbench tour``: every concept of an introduction to transformers, on real models, one step
at a time in the terminal UI.

:func:`prepare` captures three small runs (and stores the analyses the steps show) in a folder
that is reused next time: a decoder (SmolLM2-135M: GPT's family), an encoder (MiniLM with the
masked-LM head this project trained, else the plain MiniLM: BERT's family) and an
encoder–decoder with cross-attention (``toy-reversal``, trained here: T5's family). The app then
opens with a caption panel: ``space`` goes to the next step, ``backspace`` back;
each step puts the right run, prompt, token and view on screen and names the keys to play with.
Every view stays live: the usual keys move the token, the layer, the head.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from workbench.errors import UserError
from workbench.tui.app import WorkbenchApp

DECODER, ENCODER, SEQ2SEQ = "decoder", "encoder", "seq2seq"
TOUR_VERSION = 1
"""Bumped when the tour's prompts or analyses change (its default folder is ``tour-vN``)."""


@dataclass(frozen=True)
class Step:
    title: str
    caption: str
    keys: str
    run: str = DECODER
    view: str = "attention"
    prompt: int = 0
    pos: int | None = None
    """Token to focus (``None``: keep; negative: from the end of the prompt)."""
    layer: int | None = None
    head: int | None = None
    result: str | None = None
    """For the results view: the analysis whose result to select."""


# The decoder run's prompts, in this order (steps refer to them by index).
DECODER_PROMPTS = [
    {"id": "capital", "prompt": "The capital of France is"},
    {"id": "bank-river", "prompt": "We rested on the grassy bank of the river", "word": " bank", "sense": "river"},
    {"id": "bank-money", "prompt": "She paid the cheque into her account at the bank", "word": " bank",
     "sense": "money"},
    {"id": "bank-river-2", "prompt": "The boat drifted to the muddy bank of the stream", "word": " bank",
     "sense": "river"},
    {"id": "bank-money-2", "prompt": "The loan from the bank paid for the house", "word": " bank", "sense": "money"},
    {"id": "tokens", "prompt": "Tokenization: 你好 🍕 unbelievably"},
    {"id": "ioi", "prompt": "When Mary and John went to the store, John gave a drink to"},
]
ENCODER_PROMPTS = ["Paris is the [MASK] of France.", "The [MASK] sat on the mat."]
SEQ2SEQ_PROMPTS = [{"prompt": "a b c d e f", "target": "f e d c b a"},
                   {"prompt": "q w e r t", "target": "t r e w q"}]

STEPS: tuple[Step, ...] = (
    Step("1 · Tokens", "A model never sees letters: the prompt is cut into tokens, each an id in a fixed "
         "vocabulary. Common words are one token; rare ones split; a Chinese character or an emoji can "
         "take several byte pieces, shown as their bytes (the strip at the top; the line under it "
         "names the token's id).", "←/→ token · i ids · n/p prompt", view="attention", prompt=5, pos=1),
    Step("2 · The embedding matrix", "Each token id picks one row of W_E, the embedding matrix "
         "(vocab × d_model). Below the slice: the dot-product (cosine) similarity between the rows — "
         "related tokens point the same way.", "tab into the view · arrows: cell · m: W_U",
         view="results", result="matrices"),
    Step("3 · A token's vector", "The token's vector is its W_E row (the 'embed' line). Every later line "
         "is the same position after another block: the residual stream, added to layer by layer.",
         "←/→ token · shift+←/→ dimension · [ ] depth", view="vectors", pos=-1),
    Step("4 · Q, K, V", "Attention, one head: the token's query q meets every key k (q·k), is scaled by "
         "1/√d_head, masked (future keys −∞), and a softmax turns the scores into weights; z is the "
         "weighted sum of the values. Every number is checked against what the model stored.",
         "[ ] layer · , . head · shift+←/→ key · ←/→ query", view="qkv", pos=-1, layer=3, head=0),
    Step("5 · Causal mask and softmax", "All heads' weights as a grid: each row (query) sums to 1, and "
         "the upper triangle is empty — a decoder's token sees only the past. Many heads park weight "
         "on the first token (an attention sink).", "[ ] layer · , . head · shift+←/→ key",
         view="attention", pos=-1, layer=3, head=0),
    Step("6 · MLP blocks", "After attention each block runs an MLP on every position alone. The neurons "
         "analysis lists the neurons that push this prompt's answer most, with the contexts that "
         "fire them (and those that drive them most negative).", "tab into the view · arrows",
         view="results", result="neurons"),
    Step("7 · The residual stream", "The vector's length at every depth and position, log scale. Position "
         "0 grows into an attention sink (thousands vs hundreds), kept off the colour scale.",
         "l log/linear · x sink on/off scale · [ ] depth", view="residual", pos=-1),
    Step("8 · Context shapes a word", "The same token ' bank' in river and money sentences: identical at "
         "the embedding (cosine 1), pulled apart layer by layer by its context.",
         "tab into the view · o other context · l lens tokens", view="results", result="context", prompt=1),
    Step("9 · Unembedding and logits", "The last vector times W_U (the unembedding; SmolLM2 ties it to "
         "W_E) gives one logit per vocabulary token. The logit lens applies it after every layer: the "
         "answer appears late.", "tab into the view · arrows", view="results", result="logit-lens"),
    Step("10 · Softmax to probabilities", "A softmax turns the logits into a distribution over the next "
         "token: ' Paris' after 'The capital of France is'.", "←/→ position", view="topk", pos=-1),
    Step("11 · Temperature and sampling", "Generation samples from that distribution, one token at a "
         "time. Temperature divides the logits first: 0 is greedy, high is wild.",
         "e type a prompt · > one more token · < one fewer · t temperature · r seed", view="topk", pos=-1),
    Step("12 · The context limit", "A model reads at most n_ctx tokens (its positions run out): the Run "
         "view lists it. Longer prompts are refused, or cut with capture --truncate.", "4 Run view",
         view="info"),
    Step("13 · Pre-training, fine-tuning", "Pre-training minimises exactly this next-token loss over a "
         "huge corpus; fine-tuning continues on a narrower task (SmolLM2-Instruct was tuned to chat; "
         "the encoder's masked-word head was trained here on a frozen encoder).", "←/→ token: its loss",
         view="topk", pos=-2),
    Step("14 · Encoder (BERT)", "An encoder attends both ways — no mask, the grid is full — and is "
         "trained to fill in a [MASK]ed word from both sides.", "[ ] layer · , . head · 3 predictions",
         run=ENCODER, view="attention", pos=4, layer=2),
    Step("15 · Masked-word prediction", "The encoder's guesses for the [MASK] of 'Paris is the [MASK] of "
         "France.'", "←/→ position", run=ENCODER, view="topk", pos=4),
    Step("16 · Encoder–decoder (T5)", "The decoder writes its output token by token and, in every layer, "
         "cross-attends to the encoder's reading of the input: this toy was trained to reverse its "
         "input, so each output token looks at its mirror position.", "[ ] layer · , . head · ←/→ query",
         run=SEQ2SEQ, view="attention", pos=2, layer=-1),
)


@dataclass
class TourRuns:
    folder: Path
    paths: dict[str, Path] = field(default_factory=dict)


def _say(message: str) -> None:
    print(f"workbench tour: {message}", file=sys.stderr)


def prepare(folder: Path, *, decoder: str = "smollm2-135m", encoder: str | None = None,
            seq2seq: str = "toy-reversal", rebuild: bool = False) -> TourRuns:
    """Capture the tour's runs into ``folder`` (kept: a second tour starts at once) and store the
    analyses its steps show. ``encoder``: default the MiniLM with this project's masked-LM head
    when it is installed, else the plain MiniLM."""
    from workbench.registries import analyze, build_analyses, build_registry, capture, load_model

    folder.mkdir(parents=True, exist_ok=True)
    registry = build_registry()
    if encoder is None:
        encoder = "minilm-l6-mlm" if "minilm-l6-mlm" in registry else "minilm-l6"
    plan = ((DECODER, decoder, DECODER_PROMPTS, ["attention-full", "lens", "mlp"]),
            (ENCODER, encoder, ENCODER_PROMPTS, ["attention-full", "residual"]),
            (SEQ2SEQ, seq2seq, SEQ2SEQ_PROMPTS, ["attention-full", "residual"]))
    runs = TourRuns(folder)
    for part, name, prompts, hooks in plan:
        path = folder / f"tour-{part}.h5"
        runs.paths[part] = path
        if path.exists() and not rebuild:
            continue
        _say(f"{part}: loading {name} and capturing {len(prompts)} prompts (once; kept in {folder})")
        model = load_model(name)
        capture(model, prompts, hooks=hooks, out=path, overwrite=True, progress=False)
        if part == DECODER:
            from workbench.store import open_run

            analyses = build_analyses()
            with open_run(path) as run:
                _say("decoder: storing the analyses the tour shows (matrices, neurons, context, logit-lens)")
                outcomes = analyze(run, [analyses.get(a) for a in ("matrices", "neurons", "context", "logit-lens")],
                                   {"matrices": {"prompt": 0}, "context": {"word": " bank"},
                                    "neurons": {"detail": 1}}, model=model)
                for o in outcomes:
                    if not o.ok:
                        _say(f"note: {o.analysis.name} was not stored: {o.error}")
        del model
    return runs


def tour_step(app: Any, k: int) -> Step:
    """Put step ``k`` on screen in ``app`` (a :class:`~workbench.tui.app.WorkbenchApp` opened on
    the tour's runs, in the order decoder, encoder, seq2seq)."""
    from workbench.store.attention_steps import attention_blocks
    from workbench.store.depth import pattern_hooks

    step = STEPS[k]
    order = (DECODER, ENCODER, SEQ2SEQ)
    run = app.runs[order.index(step.run)]
    if run is not app.active_run:
        app.load_run(run, prompt=step.prompt)
    app.select_prompt(step.prompt)
    f = app.focus_state
    if step.pos is not None:
        n = run.n_tokens(f.prompt)
        f.pos = step.pos % n
        f.key = 0
    if step.layer is not None:
        hooks = attention_blocks(run) if step.view == "qkv" else pattern_hooks(run)
        if step.run == SEQ2SEQ:
            hooks_cross = [i for i, h in enumerate(hooks) if ".cross_attn." in h]
            f.pattern = hooks_cross[step.layer] if hooks_cross else 0
        elif hooks:
            f.pattern = step.layer % len(hooks)
    if step.head is not None:
        f.head = step.head
    if step.view == "attention":  # the key cursor on the key the query looks at most
        hooks = pattern_hooks(run)
        if hooks:
            hook = hooks[f.pattern % len(hooks)]
            n_queries = run.n_tokens(f.prompt, run.resolve(hook).square_streams()[0])
            row = run.attention_row(hook, f.prompt, min(f.pos, n_queries - 1))
            f.key = int(row[f.head % row.shape[0]].argmax())
    app.pending_result = step.result
    was = app.active_view()
    app.action_show_view(step.view)
    if step.view == "results" and was == "results":
        app.show_results(step.result)  # the tab is already shown: no activation event comes
    app.refresh_views()
    return step


def require_runs(runs: TourRuns) -> list[str]:
    missing = [str(p) for p in runs.paths.values() if not p.exists()]
    if missing:
        raise UserError(f"the tour's runs are missing ({', '.join(missing)}): run workbench tour --rebuild")
    return [str(runs.paths[k]) for k in (DECODER, ENCODER, SEQ2SEQ)]


class TourApp(WorkbenchApp):
    """The terminal UI with the tour's caption panel (``space`` next step, ``backspace`` back)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "tour(1)", "next step"),
        Binding("backspace", "tour(-1)", "previous step"),
    ]
    DEFAULT_CSS = """
    #tour { dock: bottom; height: auto; max-height: 7; padding: 0 1; background: $boost;
            border-top: hkey $accent; }
    """

    def __init__(self, runs: list[Any], first_step: int = 0, **kwargs: Any) -> None:
        super().__init__(runs, **kwargs)
        self.step = first_step
        self.pending_result: str | None = None

    def show_results(self, select: str | None = None) -> None:
        """The results view, on the step's result."""
        from workbench.tui.results import ResultsPanel

        self.query_one(ResultsPanel).show(self.active_run, self.views(), select=select or self.pending_result)

    _show_results = show_results  # the app shows the results tab through this name

    def compose(self) -> ComposeResult:
        yield from super().compose()
        yield Static(id="tour")

    def on_mount(self) -> None:
        self.call_after_refresh(self.show_step, self.step)

    def show_step(self, k: int) -> None:
        self.step = max(0, min(k, len(STEPS) - 1))
        step = tour_step(self, self.step)
        body, tail = step.caption, f"keys: {step.keys} · space next · backspace back"
        self.query_one("#tour", Static).update(Text.assemble(
            (f"{step.title}", "bold"), (f"  ({self.step + 1}/{len(STEPS)})\n", "dim"), body + "\n", (tail, "dim")))

    def action_tour(self, step: int) -> None:
        self.show_step(self.step + step)


def make_tour_app(runs: TourRuns, **kwargs: Any) -> TourApp:
    from workbench.tui.state import open_runs

    return TourApp(open_runs(require_runs(runs)), **kwargs)
