"""The Textual app: pick a run, a prompt and a view; move along the tokens; run analyses.

Start it with ``workbench tui [RUN ...]`` or :func:`make_app`. It reads runs lazily (only the
focused prompt's arrays) and never imports torch or TransformerLens itself: an analysis that needs
the live model imports them in its background worker.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import (
    Footer,
    Header,
    Label,
    OptionList,
    ProgressBar,
    TabbedContent,
    TabPane,
    Tabs,
)
from textual.widgets.option_list import Option

from workbench.kit import FollowsFocus
from workbench.store.attention_steps import attention_blocks
from workbench.tui import render as R
from workbench.tui.concepts import QKVView, VectorsView
from workbench.tui.live import LivePrompts
from workbench.tui.messages import ShowAttentionHead
from workbench.tui.results import ResultsPanel
from workbench.tui.screens import AnalysisPicker, HelpScreen, SearchScreen
from workbench.tui.state import Focus, shows_damage
from workbench.tui.widgets import (
    AttentionView,
    InfoLine,
    InfoView,
    NormsView,
    RunView,
    TokenStrip,
    TopKView,
)

if TYPE_CHECKING:
    from workbench.analysis import Outcome
    from workbench.store.reader import Run
    from workbench.views import ViewRegistry

VIEWS = (("attention", "1 Attention", AttentionView), ("residual", "2 Residual", NormsView),
         ("topk", "3 Top-k", TopKView), ("info", "4 Run", InfoView))
CONCEPT_VIEWS = (("qkv", "6 Q·K·V", QKVView), ("vectors", "7 Vectors", VectorsView))
VIEW_NAMES = (*(v[0] for v in VIEWS), "results", *(v[0] for v in CONCEPT_VIEWS))
POLL_SECONDS = 0.5
log = logging.getLogger(__name__)
PAGE = 1000
"""Prompts listed at a time: Textual's option list measures every option, so a run of 20,000
prompts is listed a page at a time (n / p and search cross pages)."""


def _prompt_label(i: int, text: str) -> Text:
    text = text.replace("\n", " ")
    # One line each: the sidebar is 24 columns (the rest of a long prompt is in the token strip).
    if len(text) > 17:
        text = text[:16] + "…"
    return Text.assemble((f"{i:>3} ", "dim"), text, no_wrap=True)


class WorkbenchApp(LivePrompts, App[None]):
    """Browse stored runs. ``runs`` are open :class:`~workbench.store.reader.Run` objects; the app
    closes them when it exits."""

    CSS_PATH = "app.tcss"
    TITLE = "workbench"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left", "move(-1)", "token ←", show=False),
        Binding("right", "move(1)", "token →", show=False),
        Binding("g", "move_to(0)", "first token", show=False),
        Binding("G", "move_to(-1)", "last token", show=False),
        Binding("shift+left", "key(-1)", "attention: key ←", show=False),
        Binding("shift+right", "key(1)", "attention: key →", show=False),
        Binding("left_square_bracket", "layer(-1)", "layer −"),
        Binding("right_square_bracket", "layer(1)", "layer +"),
        Binding("comma", "head(-1)", "head −"),
        Binding("full_stop", "head(1)", "head +"),
        Binding("n", "prompt(1)", "next prompt", show=False),
        Binding("p", "prompt(-1)", "previous prompt", show=False),
        Binding("1", "show_view('attention')", "attention heatmap", show=False),
        Binding("2", "show_view('residual')", "residual-stream norms", show=False),
        Binding("3", "show_view('topk')", "top-k predictions", show=False),
        Binding("4", "show_view('info')", "run metadata and provenance", show=False),
        Binding("5", "show_view('results')", "stored analysis results", show=False),
        Binding("6", "show_view('qkv')", "Q·K·V: one head's attention step by step", show=False),
        Binding("7", "show_view('vectors')", "the focused token's vector through the residual stream",
                show=False),
        Binding("i", "toggle_ids", "token ids"),
        Binding("l", "toggle_log", "residual: log / linear scale", show=False),
        Binding("x", "toggle_sink", "residual: position 0 (attention sink) off / on the scale", show=False),
        Binding("slash", "search", "find token"),
        Binding("a", "analyze", "run analysis"),
        Binding("e", "live_prompt", "type a prompt (live model)"),
        Binding("greater_than_sign", "live_more", "live: sample one more token", show=False),
        Binding("less_than_sign", "live_fewer", "live: one token fewer", show=False),
        Binding("t", "live_temperature", "live: next temperature (0 = greedy)", show=False),
        Binding("r", "live_reseed", "live: another seed", show=False),
        Binding("s", "export_svg", "save SVG"),
        Binding("b", "toggle_sidebar", "hide/show sidebar", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, runs: list[Run], *, view: str = "attention", prompt: int = 0,
                 export_dir: Path | None = None, poll: float = POLL_SECONDS,
                 live_dir: Path | None = None) -> None:
        super().__init__()
        self.init_live(live_dir)
        if not runs:
            raise ValueError("WorkbenchApp needs at least one open run")
        self.runs = runs
        self.active_run = runs[0]
        self.focus_state = Focus(prompt=prompt)
        self.start_view = view
        self.export_dir = export_dir or Path.cwd()
        self.poll_seconds = poll
        self._views: ViewRegistry | None = None
        self._listed = 0  # prompts known (committed when last looked)
        self._page_start = 0
        self._page_filled = 0  # options in the list
        self.last_outcome: Outcome | None = None
        self.exported: list[Path] = []

    # --- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Label("runs", classes="section", id="runs-label")
                yield OptionList(*[Option(Text(r.final_path.name)) for r in self.runs], id="runs")
                yield Label("prompts", classes="section", id="prompts-label")
                yield OptionList(id="prompts")
            with Vertical(id="content"):
                yield TokenStrip(id="strip")
                yield InfoLine(id="info")
                with TabbedContent(id="views", initial=f"tab-{self.start_view}"):
                    for name, title, cls in VIEWS:
                        with TabPane(title, id=f"tab-{name}"):
                            yield cls(id=f"view-{name}")
                    with TabPane("5 Results", id="tab-results"):
                        yield ResultsPanel(id="view-results")
                    for name, title, cls in CONCEPT_VIEWS:
                        with TabPane(title, id=f"tab-{name}"):
                            yield cls(id=f"view-{name}")
        with Horizontal(id="progress-row"):
            yield Label("", id="progress-label")
            yield ProgressBar(id="progress", show_eta=False)
        yield Footer()

    def on_mount(self) -> None:
        for tabs in self.query(Tabs):
            tabs.can_focus = False  # arrows move along the tokens, not between tabs
        multi = len(self.runs) > 1
        self.query_one("#runs").display = multi
        self.query_one("#runs-label").display = multi
        self.query_one("#progress-row").display = False
        self.load_run(self.active_run, prompt=self.focus_state.prompt)
        self.query_one("#prompts", OptionList).focus()
        self.set_interval(self.poll_seconds, self.poll)

    # --- state ---------------------------------------------------------------------------------

    @shows_damage
    def load_run(self, run: Run, prompt: int = 0) -> None:
        self.active_run = run
        f = self.focus_state
        f.prompt = max(0, min(prompt, len(run) - 1)) if len(run) else 0
        f.pos = f.key = 0
        self._listed = len(run)
        self._page_start = -1
        self.select_prompt(f.prompt)
        self._update_title()
        self.refresh_views()
        if self.query_one("#views", TabbedContent).active == "tab-results":
            self._show_results()

    def select_prompt(self, i: int) -> None:
        """Highlight prompt ``i`` in the list (turning the page if needed); the highlight event
        makes it the focused prompt."""
        run = self.active_run
        i = max(0, min(i, len(run) - 1))
        start = (i // PAGE) * PAGE
        prompts = self.query_one("#prompts", OptionList)
        if start != self._page_start:
            self._page_start = start
            self._page_filled = 0
            prompts.clear_options()
            self._fill_page()
        if len(run):
            prompts.highlighted = i - start
            if i != self.focus_state.prompt:
                self.focus_state.prompt = i
                self.refresh_views()

    def _fill_page(self) -> None:
        """Add the page's prompts committed since it was last filled."""
        start = self._page_start + self._page_filled
        stop = min(len(self.active_run), self._page_start + PAGE)
        if stop > start:
            texts = self.active_run.prompt_texts(start, stop)
            self.query_one("#prompts", OptionList).add_options(
                [Option(_prompt_label(start + k, t)) for k, t in enumerate(texts)])
            self._page_filled += len(texts)
        n = len(self.active_run)
        label = "prompts"
        if n > PAGE:
            label = f"prompts {self._page_start}–{self._page_start + self._page_filled - 1} of {n}"
        self.query_one("#prompts-label", Label).update(label)

    def _update_title(self) -> None:
        run = self.active_run
        self.title = f"workbench · {run.final_path.name}"
        status = "" if run.status == "complete" else f" · {run.status}"
        self.sub_title = f"{len(run)}/{run.planned_prompts} prompts{status}"

    def active_view(self) -> str:
        return self.query_one("#views", TabbedContent).active.removeprefix("tab-")

    def view_widget(self, name: str | None = None) -> Any:
        return self.query_one(f"#view-{name or self.active_view()}")

    @shows_damage
    def refresh_views(self) -> None:
        """Redraw the token strip and the view on screen (the others redraw when shown)."""
        run, f = self.active_run, self.focus_state
        if len(run):
            n = run.n_tokens(f.prompt)
            f.pos = max(0, min(f.pos, n - 1))
        self.query_one(TokenStrip).show(run, f)
        self.query_one(InfoLine).show(run, f)
        widget = self.view_widget()
        if isinstance(widget, RunView):
            widget.show(run, f)
        elif self.active_view() == "results":
            self.follow_results()

    def follow_results(self) -> None:
        """Tell the plugin views on screen that follow the focus
        (:class:`workbench.kit.FollowsFocus`) where it is."""
        for widget in self.query(".result-view"):
            if not isinstance(widget, FollowsFocus) or not (widget.is_mounted and widget.is_attached):
                continue  # not composed yet: the results panel asks it once it is mounted
            try:
                widget.follow(self.active_run, self.focus_state)
            except Exception as exc:  # a plugin's view must not take the app down
                log.exception("view %s failed to follow the focus", type(widget).__name__)
                widget.remove_class("result-view")  # asked once, not on every key
                self.notify(f"view {type(widget).__name__} failed to follow the focus: {exc!r}",
                            severity="error", timeout=10)

    @shows_damage
    def on_show_attention_head(self, message: ShowAttentionHead) -> None:
        """A plugin's view asked for a head's heatmap."""
        hooks = R.pattern_hooks(self.active_run)
        if message.hook not in hooks:
            self.notify(f"{message.hook} is not stored in this run", severity="warning")
            return
        self.focus_state.pattern = hooks.index(message.hook)
        self.focus_state.head = message.head
        self.action_show_view("attention")
        self.refresh_views()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if self.active_view() == "results":
            self._show_results()
        else:
            self.refresh_views()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_list.id == "prompts" and event.option_index is not None:
            index = self._page_start + event.option_index
            if index != self.focus_state.prompt:
                self.focus_state.prompt = index
                self.refresh_views()
        elif event.option_list.id == "runs" and event.option_index is not None:
            run = self.runs[event.option_index]
            if run is not self.active_run:
                self.load_run(run)

    # --- live runs -----------------------------------------------------------------------------

    @shows_damage
    def poll(self) -> None:
        """Pick up prompts a capture committed since the last look; a run whose capture has
        finished is reopened under its final name."""
        run = self.active_run
        if not run.is_partial:
            return
        from workbench.store import open_run

        # finished: a partial file renamed, or a sharded capture's index written
        if run.final_path.exists() and (run.path == run.final_path or not run.path.exists()):
            # Opened before the old one closes, so a failure leaves the old one in use (the new
            # handle refreshes the extents HDF5 shares with the old: files.opened_twice).
            fresh = open_run(run.final_path)
            k = self.runs.index(run)
            run.close()
            self.runs[k] = self.active_run = run = fresh
        before = self._listed
        self._listed = run.refresh()
        self._fill_page()
        self._update_title()
        if before == 0 and len(run):
            self.select_prompt(0)
            self.refresh_views()

    # --- actions -------------------------------------------------------------------------------

    def action_move(self, step: int) -> None:
        self.focus_state.pos += step
        self.refresh_views()

    def action_move_to(self, pos: int) -> None:
        self.focus_state.pos = pos if pos >= 0 else 10**9
        self.refresh_views()

    def action_key(self, step: int) -> None:
        self.focus_state.key = max(0, self.focus_state.key + step)
        self.refresh_views()

    def action_layer(self, step: int) -> None:
        f = self.focus_state
        if self.active_view() in ("residual", "vectors"):
            f.point = max(0, f.point + step)
        else:
            hooks = attention_blocks(self.active_run) if self.active_view() == "qkv" else R.pattern_hooks(self.active_run)
            n = max(1, len(hooks))
            f.pattern = (f.pattern + step) % n
        self.refresh_views()

    def action_head(self, step: int) -> None:
        self.focus_state.head += step  # wrapped by the view, which knows the head count
        self.refresh_views()

    def action_prompt(self, step: int) -> None:
        if not len(self.active_run):
            return
        self.select_prompt(self.focus_state.prompt + step)

    def action_show_view(self, name: str) -> None:
        self.query_one("#views", TabbedContent).active = f"tab-{name}"

    def action_toggle_ids(self) -> None:
        self.focus_state.show_ids = not self.focus_state.show_ids
        self.refresh_views()

    def action_toggle_log(self) -> None:
        self.focus_state.log_scale = not self.focus_state.log_scale
        self.refresh_views()

    def action_toggle_sink(self) -> None:
        f, run = self.focus_state, self.active_run
        current = f.skip_sink if f.skip_sink is not None else (
            len(run) > 0 and R.sink_position(run, R.residual_norms(run, f.prompt)[1]))
        f.skip_sink = not current
        self.refresh_views()

    def action_toggle_sidebar(self) -> None:
        side = self.query_one("#sidebar")
        side.display = not side.display
        self.call_after_refresh(self.refresh_views)

    def action_help(self) -> None:
        self.push_screen(HelpScreen([(b.key, b.description) for b in self.BINDINGS
                                     if isinstance(b, Binding)]))

    def action_search(self) -> None:
        self.push_screen(SearchScreen(), self._search_done)

    @shows_damage
    def _search_done(self, text: str | None) -> None:
        self.find_token(text)

    def find_token(self, text: str | None) -> bool:
        """Move to the next token containing ``text`` (case-insensitive), from the one after the
        focus on, across prompts and around. Returns whether one was found."""
        if not text or not len(self.active_run):
            return False
        needle = text.lower()
        run, f = self.active_run, self.focus_state
        n = len(run)
        for step in range(n + 1):
            i = (f.prompt + step) % n
            tokens = run.str_tokens(i)
            first = f.pos + 1 if step == 0 else 0
            last = len(tokens) if step < n else f.pos + 1
            for p in range(first, last):
                if needle in tokens[p].lower():
                    f.pos = p
                    self.select_prompt(i)
                    self.refresh_views()
                    return True
        self.notify(f"no token contains {text!r}", severity="warning")
        return False

    def action_export_svg(self) -> None:
        name = f"{self.active_run.final_path.stem}-{self.active_view()}-p{self.focus_state.prompt}.svg"
        path = Path(self.save_screenshot(filename=name, path=str(self.export_dir)))
        self.exported.append(path)
        self.notify(f"saved {path}")

    # --- analyses ------------------------------------------------------------------------------

    def views(self) -> ViewRegistry:
        if self._views is None:
            from workbench.registries import build_views

            self._views = build_views()
        return self._views

    def _show_results(self, select: str | None = None) -> None:
        self.query_one(ResultsPanel).show(self.active_run, self.views(), select=select)

    def action_analyze(self) -> None:
        from workbench.analysis import missing_inputs
        from workbench.registries import build_analyses

        choices = [(a.name, a.description, missing_inputs(self.active_run, a)) for a in build_analyses()]
        if not choices:
            self.notify("no analyses are installed ('workbench plugins' lists plugins)", severity="warning")
            return
        self.push_screen(AnalysisPicker(choices), self._start_analysis)

    def _start_analysis(self, name: str | None) -> None:
        if name:
            self.run_analysis(name)

    def run_analysis(self, name: str, params: dict[str, Any] | None = None) -> None:
        """Run analysis ``name`` on the run in a background thread; the UI keeps responding, a
        progress bar follows it, and its result opens in the results view when done."""
        row = self.query_one("#progress-row")
        row.display = True
        self.query_one("#progress-label", Label).update(f"{name}: starting ")
        self.query_one(ProgressBar).update(total=None, progress=0)
        self._analysis_worker(name, params or {})

    @work(thread=True, exclusive=True, group="analysis")
    def _analysis_worker(self, name: str, params: dict[str, Any]) -> None:
        from workbench.errors import UserError
        from workbench.registries import analyze, build_analyses

        started = time.perf_counter()
        try:
            analysis = build_analyses().get(name)
            outcomes = analyze(self.active_run, [analysis], {name: params} if params else None,
                               progress=lambda a, i, n, *_: self.call_from_thread(self._progress, name, i, n))
        except UserError as exc:
            self.call_from_thread(self._analysis_failed, name, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - shown in the app; analyze records plugin errors itself
            self.call_from_thread(self._analysis_failed, name, f"{type(exc).__name__}: {exc}")
            return
        self.call_from_thread(self._analysis_done, outcomes[0], time.perf_counter() - started)

    def _progress(self, name: str, i: int, n: int) -> None:
        self.query_one("#progress-label", Label).update(f"{name}: {i}/{n} ")
        self.query_one(ProgressBar).update(total=n, progress=i)

    def _analysis_failed(self, name: str, message: str) -> None:
        self.query_one("#progress-row").display = False
        self.notify(f"{name}: {message}", severity="error", timeout=10)

    def _analysis_done(self, outcome: Outcome, seconds: float) -> None:
        self.last_outcome = outcome
        self.query_one("#progress-row").display = False
        name = outcome.analysis.name
        if outcome.ok:
            how = "stored earlier" if outcome.status == "reused" else f"computed in {seconds:.1f} s"
            self.notify(f"{name}: {how}")
        else:
            self.notify(f"{name} failed: {outcome.stored.error}", severity="error", timeout=10)
        self.action_show_view("results")
        self._show_results(select=name)

    # --- command palette -----------------------------------------------------------------------

    def get_system_commands(self, screen: Any) -> Any:
        yield from super().get_system_commands(screen)
        for name, title, _ in VIEWS:
            yield SystemCommand(f"Show {title[2:]}", f"switch to the {title[2:].lower()} view",
                                lambda n=name: self.action_show_view(n))
        yield SystemCommand("Show Results", "stored analysis results", lambda: self.action_show_view("results"))
        yield SystemCommand("Run analysis…", "run an analysis in the background", self.action_analyze)
        yield SystemCommand("Find token…", "search the prompts' tokens", self.action_search)
        yield SystemCommand("Export view as SVG", "save what is on screen", self.action_export_svg)
        yield SystemCommand("Toggle token ids", "show each token's id in the strip", self.action_toggle_ids)
        yield SystemCommand("Toggle sidebar", "more room for the view", self.action_toggle_sidebar)
        yield SystemCommand("Keys", "every key binding", self.action_help)

    def on_unmount(self) -> None:
        for run in self.runs:
            try:
                run.close()
            except Exception:  # noqa: BLE001, S110 - closing at exit must not hide the real error
                pass


def make_app(paths: list[str] | None = None, **kwargs: Any) -> WorkbenchApp:
    """The app over the runs at ``paths`` (or every run in the current folder). The one factory
    the CLI and the tests share. Raises :class:`~workbench.errors.UserError` for a missing or
    unreadable run."""
    from workbench.tui.state import open_runs

    return WorkbenchApp(open_runs(list(paths or [])), **kwargs)
