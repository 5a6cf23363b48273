"""Live prompts in the terminal UI: type a sentence, see it in every view.

``e`` opens an input; the app loads the model of the run on screen once (by the provenance the
run recorded, in a background thread, so the UI keeps responding), captures the prompt with the
run's own hooks, BOS policy and top-k into a small run of its own, and shows it. The model stays
loaded for the next prompt.

Sampling, one token at a time: ``>`` samples one more token after the prompt (``<`` one fewer),
``t`` steps the temperature through :data:`TEMPERATURES` (0 is greedy), ``r`` draws a new seed.
Each step recaptures the prompt with ``generate=N`` at that temperature and seed: with the same
seed the first tokens stay the same, so ``>`` reads as "the next token", and the Top-k view at the
last prompt position shows the distribution it was drawn from.

Live runs are scratch files (``live-NNN.h5`` in a temporary folder, or the folder given to the
app); a new prompt makes a new run, a sampling step replaces the current one.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import UserError
from workbench.tui.state import shows_damage

if TYPE_CHECKING:
    from workbench.models.model import Model
    from workbench.store.reader import Run

TEMPERATURES = (0.0, 0.3, 0.7, 1.0, 1.5, 2.0)
"""What ``t`` steps through (0: greedy)."""
MAX_NEW = 64
"""Most tokens ``>`` samples after a live prompt."""


@dataclass
class LiveState:
    """The live prompt on screen and how its continuation is sampled."""

    text: str = ""
    generate: int = 0
    temperature: float = 1.0
    seed: int = 0
    path: Path | None = None

    def describe(self) -> str:
        if not self.generate:
            return "live"
        how = "greedy" if self.temperature == 0 else f"T={self.temperature:g} seed {self.seed}"
        return f"live · +{self.generate} sampled ({how})"


@dataclass
class LiveModel:
    """A model loaded once for live prompts, and the captures made with it."""

    folder: Path
    model: Model | None = None
    model_name: str = ""
    load_seconds: float = 0.0
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def in_folder(cls, folder: Path | None) -> LiveModel:
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="workbench-live-"))
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder=folder)

    def ensure(self, run: Run) -> Model:
        """The model ``run`` was captured with, loaded on first use (and again when a run of
        another model asks)."""
        from workbench.registries import reload_model

        name = str(run.model_info.get("name"))
        if self.model is None or self.model_name != name:
            started = time.perf_counter()
            self.model = reload_model(run)
            self.model_name = name
            self.load_seconds = time.perf_counter() - started
        return self.model

    def capture(self, run: Run, state: LiveState, new: bool) -> tuple[Path, float]:
        """Capture ``state``'s prompt like ``run`` (its hooks, BOS policy, top-k) into a live
        run: a new one when ``new``, else the current one replaced. Returns the path and the
        seconds the capture took (model loading excluded)."""
        from workbench.registries import capture

        if not state.text.strip():
            raise UserError("an empty prompt: type some text")
        with self.lock:
            model = self.ensure(run)
            if new or state.path is None:
                self.count += 1
                state.path = self.folder / f"live-{self.count:03d}.h5"
            settings = run.capture_settings
            started = time.perf_counter()
            kwargs: dict[str, Any] = {}
            if state.generate:
                kwargs = {"generate": state.generate, "temperature": state.temperature, "seed": state.seed}
            capture(model, [state.text], hooks=list(settings.hooks_requested) or ["residual"], out=state.path,
                    overwrite=True, progress=False, predictions=max(settings.top_k, 1) if settings.top_k else 0,
                    bos=settings.bos, dtype=_dtype(run), **kwargs)
            return state.path, time.perf_counter() - started


def _dtype(run: Run) -> str:
    dtype = str(run.storage_dtype)
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def next_temperature(t: float) -> float:
    """The next of :data:`TEMPERATURES` after ``t`` (wrapping round)."""
    later = [x for x in TEMPERATURES if x > t + 1e-9]
    return later[0] if later else TEMPERATURES[0]


class LivePrompts:
    """The live-prompt actions of :class:`workbench.tui.app.WorkbenchApp` (mixed into it)."""

    live: LiveState
    live_model: LiveModel
    last_live_seconds: float | None

    def init_live(self, folder: Path | None) -> None:
        self.live = LiveState()
        self._live_folder = folder
        self.live_model = None  # type: ignore[assignment]  # made on first use (a temp folder)
        self.last_live_seconds = None

    def action_live_prompt(self) -> None:
        from workbench.tui.screens import PromptScreen

        self.push_screen(PromptScreen(self.live.text), self._live_submitted)  # type: ignore[attr-defined]

    def _live_submitted(self, text: str | None) -> None:
        if text and text.strip():
            self.live = LiveState(text=text, temperature=self.live.temperature, seed=self.live.seed)
            self._live_start(new=True)

    def _live_step(self, **change: Any) -> None:
        if not self.live.text:
            self.notify("type a prompt first: e", severity="warning")  # type: ignore[attr-defined]
            return
        for k, v in change.items():
            setattr(self.live, k, v)
        self._live_start(new=False)

    def action_live_more(self) -> None:
        self._live_step(generate=min(MAX_NEW, self.live.generate + 1))

    def action_live_fewer(self) -> None:
        self._live_step(generate=max(0, self.live.generate - 1))

    def action_live_temperature(self) -> None:
        self._live_step(temperature=next_temperature(self.live.temperature))

    def action_live_reseed(self) -> None:
        self._live_step(seed=self.live.seed + 1)

    def _live_start(self, new: bool) -> None:
        from textual.widgets import Label, ProgressBar

        app: Any = self
        if self.live_model is None:
            self.live_model = LiveModel.in_folder(self._live_folder)
        loading = self.live_model.model is None
        app.query_one("#progress-row").display = True
        app.query_one("#progress-label", Label).update(
            "live: loading the model (once) " if loading else f"live: {self.live.describe()} ")
        app.query_one(ProgressBar).update(total=None, progress=0)
        state = LiveState(**{k: getattr(self.live, k) for k in ("text", "generate", "temperature", "seed", "path")})
        app.run_worker(lambda: self._live_work(app.active_run, state, new, time.perf_counter()),
                       thread=True, exclusive=True, group="live")

    def _live_work(self, run: Run, state: LiveState, new: bool, started: float) -> None:
        app: Any = self
        try:
            path, seconds = self.live_model.capture(run, state, new)
        except UserError as exc:
            app.call_from_thread(self._live_failed, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - shown in the app, which keeps running
            app.call_from_thread(self._live_failed, f"{type(exc).__name__}: {exc}")
            return
        app.call_from_thread(self._live_done, state, path, seconds, started)

    def _live_failed(self, message: str) -> None:
        app: Any = self
        app.query_one("#progress-row").display = False
        app.notify(f"live prompt: {message}", severity="error", timeout=10)

    @shows_damage
    def _live_done(self, state: LiveState, path: Path, seconds: float, started: float) -> None:
        from rich.text import Text
        from textual.widgets import OptionList
        from textual.widgets.option_list import Option

        from workbench.store import open_run

        app: Any = self
        self.live = state
        fresh = open_run(path)
        runs: list[Run] = app.runs
        names = [r.final_path.resolve() for r in runs]
        path = path.resolve()
        listing = app.query_one("#runs", OptionList)
        if path in names:
            k = names.index(path)
            old, runs[k] = runs[k], fresh
            old.close()
        else:
            runs.append(fresh)
            listing.add_option(Option(Text(path.name)))
        listing.display = app.query_one("#runs-label").display = len(runs) > 1
        app.load_run(fresh)
        app.focus_state.pos = max(0, fresh.n_input_tokens(0) - 1)  # the last prompt token: its top-k
        listing.highlighted = runs.index(fresh)
        app.refresh_views()
        app.query_one("#progress-row").display = False
        self.last_live_seconds = time.perf_counter() - started
        load = (f", the model loaded in {self.live_model.load_seconds:.1f} s"
                if self.live_model.load_seconds and self.live_model.count == 1 and not state.generate else "")
        app.sub_title = f"{state.describe()} · {path.name}"
        app.notify(f"live: captured in {seconds:.2f} s, shown {self.last_live_seconds:.2f} s after Enter{load}",
                   timeout=4)
