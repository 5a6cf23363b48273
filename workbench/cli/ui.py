"""Commands that show runs: ``tui``, ``plot``."""

from __future__ import annotations

from pathlib import Path

import click

from workbench.cli.base import cli
from workbench.errors import UserError

# --- terminal UI and plots -------------------------------------------------------------------


@cli.command("tui")
@click.argument("run_paths", metavar="[RUN]...", nargs=-1)
@click.option("--view", type=click.Choice(["attention", "residual", "topk", "info", "results", "qkv", "vectors"]),
              default="attention", show_default=True, help="The view to open on.")
@click.option("--prompt", "prompt_index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the prompt to open on.")
@click.option("--export-dir", type=click.Path(), default=".",
              help="Where 's' saves SVG screenshots (created, with its parents, if missing).  "
                   "[default: the current folder]")
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
