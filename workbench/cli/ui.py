"""Commands that show runs: ``tui``, ``serve`` (the same app in web browsers), ``plot``."""

from __future__ import annotations

import errno
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import click

from workbench.cli.base import cli
from workbench.errors import UserError

# --- terminal UI and plots -------------------------------------------------------------------

VIEWS = ["attention", "residual", "topk", "info", "results", "qkv", "vectors"]


def app_options(where: str) -> Any:
    """The runs and the options of the app that ``tui`` runs and ``serve`` serves, one definition
    for both (``where``: whose app and files the help speaks of)."""

    def decorate(f: Any) -> Any:
        f = click.option("--export-dir", type=click.Path(), default=".",
                         help=f"Where 's' saves SVG screenshots{where} (created, with its parents, if "
                              "missing).  [default: the current folder]")(f)
        f = click.option("--prompt", "prompt_index", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Index of the prompt to open on.")(f)
        f = click.option("--view", type=click.Choice(VIEWS), default="attention", show_default=True,
                         help="The view to open on.")(f)
        return click.argument("run_paths", metavar="[RUN]...", nargs=-1)(f)

    return decorate


@cli.command("tui")
@app_options("")
def tui_cmd(run_paths: tuple[str, ...], view: str, prompt_index: int, export_dir: str) -> None:
    """Browse runs in the terminal: prompts, tokens, attention heatmaps, residual-stream norms,
    top-k predictions, metadata, and analysis results (with their plugins' views).

    With no RUN, every run in the current folder (a run still being captured included: its
    prompts appear as they are committed). Press ? in the app for the keys; ctrl+p for the
    command palette. Does not import torch or TransformerLens.
    """
    from workbench.tui import make_app

    app = make_app(list(run_paths), view=view, prompt=prompt_index, export_dir=Path(export_dir))
    export_folder(export_dir)  # after the runs: a run that cannot be opened is the first error
    app.run()


@cli.command("serve")
@app_options(", on the server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The page has no password: any other address lets "
                   "whoever reaches it browse the runs (prefer ssh -L).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port to listen on.")
@click.option("--public-url", default=None,
              help="The address the browser uses, when it is not http://HOST:PORT (ssh -L to "
                   "another local port, a reverse proxy): the page connects back to it.")
def serve_cmd(run_paths: tuple[str, ...], view: str, prompt_index: int, export_dir: str, host: str,
              port: int, public_url: str | None) -> None:
    """Serve the terminal UI to web browsers (pip install 'workbench[serve]', textual-serve).

    Each visit to the page starts its own `workbench tui` process on this machine, with the
    same runs and options, and ends it when the page closes. Listens on 127.0.0.1 unless --host
    says otherwise; from another machine, forward the port:  ssh -L 8000:127.0.0.1:8000 HOST
    and open http://127.0.0.1:8000 there. Ctrl+C stops the server and its apps.
    """
    try:
        import textual_serve  # noqa: F401
    except ImportError:
        raise UserError("workbench serve needs textual-serve: pip install 'workbench[serve]'") from None
    from workbench.tui.state import open_runs

    for run in open_runs(list(run_paths)):  # a run that cannot be opened: one line, before serving
        run.close()
    folder = export_folder(export_dir)
    if public_url is None:
        if host in ("", "0.0.0.0", "::"):
            raise UserError(f"--host {host or repr(host)} listens on every address, but the page "
                            "connects back to one: give it with --public-url http://NAME:PORT")
        public_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    check_port(host, port)
    runs = f"{len(run_paths)} run{'s' if len(run_paths) != 1 else ''}" if run_paths else "the runs here"
    banner = (f"workbench serve: {public_url}  (the terminal UI over {runs}; "
              "each visit starts its own app; Ctrl+C stops)")
    server = make_server(tui_command(run_paths, view=view, prompt=prompt_index, export_dir=folder),
                         host=host, port=port, public_url=public_url, banner=banner)
    try:
        server.serve()
    except OSError as exc:  # lost a race for the port since check_port
        raise UserError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None


def make_server(command: str, *, host: str, port: int, public_url: str | None, banner: str) -> Any:
    """textual-serve's Server, printing ``banner`` instead of its logo and one line per visit
    (not every HTTP request), and ending the visitors' apps on Ctrl+C at once (textual-serve
    leaves an open page's websocket to aiohttp's shutdown, which waits for it)."""
    import asyncio
    import logging

    from textual_serve.server import Server

    class WorkbenchServer(Server):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.visits: set[asyncio.Task[Any]] = set()

        def initialize_logging(self) -> None:
            super().initialize_logging()
            logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

        async def on_startup(self, app: Any) -> None:
            click.echo(banner, err=True)

        async def on_shutdown(self, app: Any) -> None:
            for task in list(self.visits):
                task.cancel()  # handle_websocket then stops the visitor's app and closes its socket

        async def handle_websocket(self, request: Any) -> Any:
            task = asyncio.current_task()
            assert task is not None
            self.visits.add(task)
            click.echo(f"visit from {request.remote}: app started ({len(self.visits)} open)", err=True)
            try:
                return await super().handle_websocket(request)
            finally:
                self.visits.discard(task)
                click.echo(f"visit from {request.remote} ended ({len(self.visits)} open)", err=True)

    return WorkbenchServer(command, host=host, port=port, title="workbench", public_url=public_url)


def tui_command(run_paths: tuple[str, ...], *, view: str, prompt: int, export_dir: Path) -> str:
    """The shell command textual-serve starts for each visitor: this interpreter running
    ``workbench tui`` with absolute paths (``exec``: no shell stays between server and app)."""
    args = [sys.executable, "-m", "workbench.cli", "tui", "--view", view, "--prompt", str(prompt),
            "--export-dir", str(export_dir.resolve()), "--", *(str(Path(p).resolve()) for p in run_paths)]
    return "exec " + shlex.join(args)


def check_port(host: str, port: int) -> None:
    """A UserError (one line, exit 2) unless every address of ``host`` can listen on ``port``."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UserError(f"--port {port}: already in use on {host}; choose another") from None
                raise UserError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None


def export_folder(path: str) -> Path:
    """``--export-dir``: the folder, created with its parents if missing; a UserError (one line,
    exit 2) if it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--export-dir {path}: exists and is not a folder") from None
    except OSError as exc:
        raise UserError(f"--export-dir {path}: cannot create it ({exc.strerror or exc})") from None
    return folder


@cli.command("tour")
@click.option("--dir", "folder", type=click.Path(file_okay=False), default=None,
              help="Where the tour's runs are kept.  [default: tour-vN/ in the workbench cache]")
@click.option("--rebuild", is_flag=True, help="Capture the tour's runs again.")
@click.option("--step", type=click.IntRange(min=1), default=1, show_default=True, help="Open on this step.")
def tour_cmd(folder: str | None, rebuild: bool, step: int) -> None:
    """A guided tour of a transformer, one concept per step, on real models: tokens, the
    embedding matrix, a token's vector, Q·K·V, the causal mask and softmax, MLP blocks, the
    residual stream, context shaping a word, the unembedding and logits, softmax, temperature
    and sampling, the context limit, pre-training and fine-tuning, an encoder (BERT's family)
    and its masked-word prediction, and an encoder-decoder's cross-attention (T5's family).

    The first tour captures three small runs (SmolLM2-135M, MiniLM, toy-reversal; about a minute
    or two) and keeps them. In the app: space next step, backspace back; every view's keys work.
    """
    from workbench.paths import cache_dir
    from workbench.tui.tour import TOUR_VERSION, make_tour_app, prepare

    runs = prepare(Path(folder) if folder else cache_dir() / f"tour-v{TOUR_VERSION}", rebuild=rebuild)
    app = make_tour_app(runs, first_step=step - 1)
    app.run()


@cli.command("plot")
@click.argument("run_path", metavar="RUN")
@click.option("--kind", type=click.Choice(["attention", "residual"]), default="attention",
              show_default=True, help="attention: one head's pattern; residual: norms per layer.")
@click.option("--prompt", "prompt_index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the prompt.")
@click.option("--hook", default=None, help="Attention pattern hook (default: the first stored, "
              "e.g. blocks.0.attn.hook_pattern).")
@click.option("--layer", type=click.IntRange(min=0), default=None,
              help="Shorthand for the pattern hook of this layer.")
@click.option("--head", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--log/--linear", "log", default=True, show_default=True,
              help="residual: colour the norms on a log or a linear scale.")
@click.option("--sink", type=click.Choice(["auto", "skip", "keep"]), default="auto", show_default=True,
              help="residual: leave position 0 out of the colour scale (auto: when it is an attention "
              "sink, a decoder's first position with a norm many times the rest).")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Image file to write (.png, .svg, .pdf: matplotlib decides by the suffix).")
def plot_cmd(run_path: str, kind: str, prompt_index: int, hook: str | None, layer: int | None,
             head: int, log: bool, sink: str, out_path: str) -> None:
    """Draw a heatmap from RUN with matplotlib (pip install 'workbench[plot]').

    A scores hook (--hook blocks.L.attn.hook_attn_scores) is drawn as pre-softmax scores with
    their own colour range; where the model's bridge makes that name an alias of the pattern,
    a note says so and the weights are drawn."""
    from workbench.plot import plot_attention, plot_residual
    from workbench.store import open_run

    with open_run(run_path) as run:
        if kind == "attention":
            notes = plot_attention(run, prompt_index, out_path, hook=hook, layer=layer, head=head)
        else:
            notes = plot_residual(run, prompt_index, out_path, log=log, sink=sink)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {out_path}")
