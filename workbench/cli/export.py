"""``workbench export``: a run's per-token hooks as files other tools read (SAELens' cached
activations through Hugging Face ``datasets``, numpy, safetensors); :mod:`workbench.store.export`
does the work."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from workbench.cli.base import cli, hang_ups_interrupt


@cli.command("export")
@click.argument("run_path", metavar="RUN", type=click.Path(dir_okay=False))
@click.option("--hook", "hooks", multiple=True, required=True, metavar="HOOK",
              help="Hook to export: a stored name, an alias or a glob (blocks.*.hook_resid_post); "
                   "repeatable. Per-token hooks only (attention patterns: Run.to_xarray).")
@click.option("--format", "fmt", type=click.Choice(["arrow", "npy", "safetensors"]), default="arrow",
              show_default=True,
              help="arrow: a datasets folder in SAELens' cached-activations layout "
                   "(datasets.load_from_disk); npy: a folder of .npy files; safetensors: one file.")
@click.option("-o", "--out", required=True, type=click.Path(), metavar="PATH",
              help="Folder (arrow, npy) or file (safetensors) to write; written beside it and "
                   "renamed into place when complete.")
@click.option("--context", default=None, type=click.IntRange(min=1), metavar="N",
              help="arrow: tokens per row (SAELens' context_size).  [default: 128]")
@click.option("--rows", "rows", type=click.Choice(["pack", "prompt"]), default="pack", show_default=True,
              help="arrow: 'pack' cuts the run's tokens into full rows across prompts (the last "
                   "partial row is left out); 'prompt' takes each prompt's first N tokens and "
                   "skips shorter prompts. Rows are never padded: SAELens has no mask.")
@click.option("--force", is_flag=True, help="Replace PATH if it exists (once the new export is complete).")
@click.option("--progress/--no-progress", "show_progress", default=None,
              help="Show progress on stderr.  [default: when stderr is a terminal]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_cmd(run_path: str, hooks: tuple[str, ...], fmt: str, out: str, context: int | None,
               rows: str, force: bool, show_progress: bool | None, as_json: bool) -> None:
    """Write hooks of RUN to files other tools read, streamed (memory stays flat).

    Values equal the run's (bfloat16 runs as float32, exactly). Formats and their file sets:
    docs/store.md, "Export".
    """
    from workbench.store import open_run
    from workbench.store.export import export, result_summary

    hang_ups_interrupt()
    show = sys.stderr.isatty() if show_progress is None else show_progress
    with open_run(run_path) as run, _Progress(show, fmt) as bar:
        result = export(run, list(hooks), out, format=fmt, context=context, rows=rows, force=force,
                        progress=bar.update)
    if as_json:
        click.echo(json.dumps(result_summary(result), indent=2))
        return
    what = (f"{result.rows:,} rows of {result.context} tokens" if fmt == "arrow"
            else f"{result.tokens:,} tokens")
    click.echo(f"wrote {result.path}  ({fmt}: {', '.join(result.columns)}; {what}; "
               f"{result.bytes / 1e6:,.1f} MB in {result.seconds:.1f} s)")
    if result.dropped_tokens:
        left = (f"{result.skipped_prompts:,} prompts shorter than {result.context} tokens skipped; "
                if result.skipped_prompts else "")
        click.echo(f"left out: {left}{result.dropped_tokens:,} tokens that fill no whole row")


class _Progress:
    """Tokens written, on stderr (rich, like capture's bar); nothing when not shown."""

    def __init__(self, show: bool, fmt: str) -> None:
        self.show, self.fmt = show, fmt
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from workbench.cli.base import make_console

            self.bar = Progress(TextColumn(f"exporting ({self.fmt})"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("tokens"), TimeRemainingColumn(), console=make_console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task("export", total=None)
        self.t0 = time.monotonic()
        return self

    def update(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
