"""Runs, results and views in Jupyter.

- A :class:`~workbench.store.reader.Run` shows itself as an HTML summary: model, status,
  settings, stored hooks, and its first prompts as token strips (special tokens marked).
- A :class:`~workbench.store.results.StoredResult` shows itself through its analysis's registered
  view (else the terminal UI's generic view), rendered as the terminal shows it.
- :func:`show` returns a figure: ``show(run, "attention", layer=3, head=1, prompt=0)`` (and
  ``residual``) draw from the stored activations with matplotlib; an analysis or view name whose
  view draws a figure (``lens``, ``dla``, ``features``) draws from the stored result; any other
  registered view is rendered as its terminal picture (:class:`Picture`).

A terminal view is rendered by mounting its widget in a headless Textual app, exactly as the UI
mounts it, and exporting Textual's SVG screenshot: the picture shows the same numbers as the
terminal because it *is* the terminal's drawing. The app runs in a thread of its own, so it works
inside Jupyter's running event loop.

The facade (``workbench/__init__.py``) registers the HTML formatters with IPython by type name
when IPython is running, so nothing here is imported until a run or result is displayed.
"""

from __future__ import annotations

import asyncio
import html
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.store.reader import Run
    from workbench.store.results import StoredResult
    from workbench.views import View

__all__ = ["Picture", "result_html", "run_html", "show", "view_picture"]

WIDTH = 120
"""Columns of a rendered terminal view."""
FIGURE_KINDS = ("attention", "residual")


# --- pictures of terminal views --------------------------------------------------------------------


@dataclass
class Picture:
    """A terminal view as Textual draws it (SVG), shown inline by Jupyter."""

    svg: str = field(repr=False)
    title: str = ""

    @property
    def text(self) -> str:
        """The picture's text, without markup (what the terminal shows, line by line)."""
        rows: dict[float, list[tuple[float, str]]] = {}
        cell = 0.0
        for attrs, body in re.findall(r"<text([^>]*)>(.*?)</text>", self.svg, flags=re.S):
            x, y = re.search(r'\bx="([-\d.]+)"', attrs), re.search(r'\by="([-\d.]+)"', attrs)
            length = re.search(r'textLength="([\d.]+)"', attrs)
            body = html.unescape(body).replace("\xa0", " ")
            if x and y:
                rows.setdefault(float(y.group(1)), []).append((float(x.group(1)), body))
                if length and body and not cell:
                    cell = float(length.group(1)) / len(body)  # one terminal cell (ASCII)
        lines = []
        for _, spans in sorted(rows.items()):
            line = ""
            for x, text in sorted(spans):  # each span at its column: the gaps between are blanks
                line = line.ljust(round(x / cell) if cell else len(line)) + text
            lines.append(line.rstrip())
        return "\n".join(lines)

    def _repr_svg_(self) -> str:
        return self.svg

    def _repr_html_(self) -> str:
        return f'<div class="workbench-view" title="{html.escape(self.title)}">{self.svg}</div>'

    def save(self, path: str) -> None:
        """Write the SVG to ``path``."""
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.svg)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _Focus:
    prompt: int
    pos: int


def _in_own_thread(coro_fn: Any) -> Any:
    """Run ``coro_fn()`` to completion in a new event loop on a new thread (Jupyter's loop is
    already running in this one); its exception is raised here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(coro_fn())
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    t = threading.Thread(target=target, name="workbench-render", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def render_widget(make: Any, run: Run, *, prompt: int = 0, pos: int | None = None, width: int = WIDTH,
                  title: str = "workbench") -> Picture:
    """Mount the widget ``make()`` returns in a headless Textual app ``width`` columns wide, tell
    it the focus (``prompt``, ``pos``: default the prompt's last token) as the UI does, size the
    screen to its content and take Textual's SVG screenshot."""
    from textual.app import App, ComposeResult
    from textual.containers import VerticalScroll

    if not 0 <= prompt < len(run):
        raise UserError(f"prompt {prompt} is not in this run (it has {len(run)} prompts: 0..{len(run) - 1})")
    n = run.n_tokens(prompt)
    focus = _Focus(prompt, n - 1 if pos is None else max(0, min(pos, n - 1)))

    class Frame(App[None]):
        CSS = "Screen { background: $surface; } VerticalScroll { height: auto; }"

        def compose(self) -> ComposeResult:
            self.view = make()
            with VerticalScroll():
                yield self.view

    async def shoot() -> str:
        from unittest import mock

        app = Frame()
        # Rich, seeing Jupyter, would also *display* every console it prints to (Textual's
        # screenshot prints into a recording console): not for this drawing. (The caller's
        # thread is waiting in join(): nothing else runs Rich meanwhile.)
        with mock.patch("rich.console._is_jupyter", return_value=False):
            return await _shoot(app)

    async def _shoot(app: Frame) -> str:
        async with app.run_test(size=(width, 24)) as pilot:
            await pilot.pause()
            follow = getattr(app.view, "follow", None)
            if callable(follow):
                follow(run, focus)
            await pilot.pause()
            height = max(4, min(400, app.view.outer_size.height + 1, app.view.virtual_size.height + 2))
            await pilot.resize_terminal(width, height)
            await pilot.pause()
            return app.export_screenshot(title=title)

    return Picture(svg=_in_own_thread(shoot), title=title)


def _registry() -> Any:
    from workbench.registries import build_views

    return build_views()


def _stored(run: Run, analysis: str, result: StoredResult | None) -> StoredResult:
    from workbench.store.results import result as find_result

    if result is not None:
        return result
    return find_result(run, analysis)


def view_picture(run: Run, view: str, *, result: StoredResult | None = None, prompt: int = 0,
                 pos: int | None = None, width: int = WIDTH) -> Picture:
    """Registered view ``view`` of ``result`` (default: the newest stored result of the view's
    analysis) for ``prompt``, as the terminal shows it."""
    chosen = _view_named(view)
    stored = _stored(run, chosen.analysis, result)
    if not stored.ok:
        raise UserError(f"the stored {stored.analysis} result is an error: {stored.error}")
    return render_widget(lambda: chosen.make(stored, run), run, prompt=prompt, pos=pos, width=width,
                         title=f"{chosen.title} · {run.final_path.name}")


def _view_named(name: str) -> View:
    views = _registry()
    if name in views.by_name:
        return views.by_name[name]
    found = views.for_analysis(name)
    if found:
        return found[0]
    raise UserError(f"no view or analysis named {name!r} (views: {', '.join(sorted(views.by_name))})")


# --- show ------------------------------------------------------------------------------------------


def show(run: Run, what: str, *, prompt: int = 0, result: StoredResult | None = None, terminal: bool = False,
         **options: Any) -> Any:
    """A figure of ``run``:

    - ``"attention"`` (``layer``, ``head``, ``hook``): one head's pattern, queries down, keys across;
    - ``"residual"`` (``log``, ``sink``): the residual stream's norm per layer and position;
    - an analysis or view name whose view draws figures (``"lens"``/``"logit-lens"``, ``"dla"``,
      ``"features"`` and any plugin's): a matplotlib figure of its stored result;
    - any other registered view name, or any view with ``terminal=True``: that view as the
      terminal draws it (:class:`Picture`; ``pos`` focuses a token, ``width`` sets the columns).

    Figures are matplotlib ``Figure`` objects (Jupyter shows them inline; ``fig.savefig`` saves).
    """
    from workbench import plot

    if what == "attention":
        fig, _ = plot.attention_figure(run, prompt, hook=options.pop("hook", None), layer=options.pop("layer", None),
                                       head=options.pop("head", 0))
        _no_more(what, options)
        return fig
    if what == "residual":
        fig, _ = plot.residual_figure(run, prompt, log=options.pop("log", True), sink=options.pop("sink", "auto"))
        _no_more(what, options)
        return fig
    aliases = {"lens": "lens-grid", "logit-lens": "lens-grid", "dla": "dla-bars", "features": "feature-dashboard"}
    view = _view_named(aliases.get(what, what))
    if view.figure is not None and not terminal:
        stored = _stored(run, view.analysis, result)
        if not stored.ok:
            raise UserError(f"the stored {stored.analysis} result is an error: {stored.error}")
        return view.figure(stored, run, prompt=prompt, **options)
    pos = options.pop("pos", None)
    width = options.pop("width", WIDTH)
    _no_more(what, options)
    return view_picture(run, view.name, result=result, prompt=prompt, pos=pos, width=width)


def _no_more(what: str, options: dict[str, Any]) -> None:
    if options:
        raise UserError(f"show(..., {what!r}) takes no option {', '.join(map(repr, options))}")


# --- HTML of runs and results ----------------------------------------------------------------------


_STYLE = ("<style>.wb-run td,.wb-run th{text-align:left;padding:1px 8px}"
          ".wb-tok{border:1px solid #bbb;border-radius:3px;padding:0 2px;margin:1px;"
          "font-family:monospace;white-space:pre;display:inline-block}"
          ".wb-special{background:#e8e0ff;color:#4b2aa8}.wb-bytes{background:#fff1d6}</style>")


def _strip(run: Run, i: int, limit: int = 64) -> str:
    tokens = run.display_tokens(i)
    cells = []
    for t in tokens[:limit]:
        cls = {"special": "wb-tok wb-special", "bytes": "wb-tok wb-bytes"}.get(t.kind, "wb-tok")
        cells.append(f'<span class="{cls}" title="{html.escape(t.kind)}">{html.escape(t.label)}</span>')
    more = f" … {len(tokens) - limit} more" if len(tokens) > limit else ""
    return "".join(cells) + more


def run_html(run: Run, n_prompts: int = 5) -> str:
    """A run as an HTML summary (what ``workbench inspect`` prints, with token strips)."""
    from workbench.hooknames import collapse_layers

    s = run.summary(n_prompts)
    model = s["model"]
    settings = run.capture_settings
    rows = [
        ("run", f"{html.escape(str(run.path))} [{s['status']}], {s['bytes'] / 1e6:,.1f} MB"),
        ("model", html.escape(f"{model['name']}: {model['family']} {model['architecture']}, {model['n_layers']} "
                              f"layers, {model['n_heads']} heads, d_model {model['d_model']}")),
        ("prompts", f"{s['prompts']:,} of {s['planned_prompts']:,}; "
                    + ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in s["tokens"].items())),
        ("storage", html.escape(f"{run.storage_dtype}, {settings.compression or 'no'} compression, BOS policy "
                                f"'{settings.bos}'" + (", chat template" if settings.chat else ""))),
        ("hooks", html.escape(", ".join(f"{p} ×{n}" if n > 1 else p
                                        for p, n in Counter(map(collapse_layers, run.hooks)).items()))),
    ]
    head = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    prompts = "".join(
        f"<tr><th>[{p['index']}] {html.escape(p['id'])}</th><td>{_strip(run, p['index'])}</td></tr>"
        for p in s["first_prompts"])
    more = f"<tr><td></td><td>… {len(run) - len(s['first_prompts']):,} more</td></tr>" \
        if len(run) > len(s["first_prompts"]) else ""
    return f'{_STYLE}<table class="wb-run">{head}{prompts}{more}</table>'


def result_html(stored: StoredResult, run: Run | None = None) -> str:
    """A stored result as its registered view draws it (the focused prompt: the result's
    first), else as the UI's generic view; ``run`` defaults to the run it was computed on."""
    from workbench.store import open_run

    own = run is None
    if run is None:
        run = open_run(stored.path.parent.parent / str(stored.meta.get("run") or ""))
    try:
        views = _registry().for_analysis(stored.analysis) if stored.ok else []
        if views:
            first = (stored.data.get("prompts") or [{}])[0] if isinstance(stored.data, dict) else {}
            prompt = int(first.get("index", 0)) if isinstance(first, dict) else 0
            picture = render_widget(lambda: views[0].make(stored, run), run, prompt=prompt,
                                    title=f"{views[0].title} · {stored.analysis} {stored.version}")
            return picture._repr_html_()
        from textual.widgets import Static

        from workbench.tui.results import generic_renderable

        picture = render_widget(lambda: Static(generic_renderable(stored, width=WIDTH - 4)), run,
                                title=f"{stored.analysis} {stored.version}")
        return picture._repr_html_()
    finally:
        if own:
            run.close()
