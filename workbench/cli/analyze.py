"""Commands about plugins and analyses: ``plugins``, ``analyze``."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from workbench.cli.base import cli, format_params, hang_ups_interrupt
from workbench.errors import UserError

# --- plugins and analyses --------------------------------------------------------------------


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_cmd(as_json: bool) -> None:
    """List the plugins: where each comes from, its version, the hooks it implements, what it
    registers (models, analyses, views, commands), and any load or hook errors.

    Does not import torch or TransformerLens.
    """
    from workbench.plugins import plugin_manager, report_of
    from workbench.registries import build_analyses, build_registry, build_views

    pm = plugin_manager()
    build_registry(pm)
    build_analyses(pm)
    build_views(pm)
    plugins = list(report_of(pm).plugins.values())
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in plugins], indent=2))
        return
    for p in plugins:
        state = "loaded" if p.loaded else "NOT LOADED"
        version = f" {p.version}" if p.version else ""
        click.echo(f"{p.name}{version}  [{p.source}, {state}]  {p.location}")
        if p.hooks:
            click.echo(f"    hooks:    {', '.join(p.hooks)}")
        for kind in ("models", "analyses", "views", "commands"):
            items = getattr(p, kind)
            if items:
                click.echo(f"    {kind + ':':9} {', '.join(items)}")
        for e in p.errors:
            click.echo(f"    error:    {e}")


def _parse_param_options(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        m = re.match(r"^([a-z0-9][a-z0-9_.-]*?)\.([A-Za-z_][A-Za-z0-9_]*)=(.*)$", item, re.DOTALL)
        if not m:
            raise UserError(f"--param {item!r}: write ANALYSIS.KEY=VALUE")
        out.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
    return out


def _list_analyses(registry: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([a.describe() for a in registry], indent=2))
        return
    from workbench.hooknames import preset_patterns

    def hooks(items: tuple[str, ...]) -> str:  # presets expanded into their patterns
        return ", ".join(f"preset {n} ({', '.join(preset_patterns(n) or ())})" if preset_patterns(n) is not None
                         else n for n in items)

    for a in registry:
        click.echo(f"{a.name} {a.version}  ({a.plugin})  {a.description}")
        click.echo(f"    hooks:      {hooks(a.needs) or 'none'}"
                   + ("  (a preset's pattern the model lacks is skipped)"
                      if any(preset_patterns(n) is not None for n in a.needs) else ""))
        if a.optional:
            click.echo(f"    if stored:  {hooks(a.optional)}  (read where the run holds them; --for captures them)")
        also = ((["LM outputs (the stored per-token loss and top-k predictions)"] if a.needs_lm_outputs else [])
                + [f"the prompts' '{k}' field (JSONL; at least one prompt)" for k in a.needs_task]
                + (["the model (reloaded by the run's provenance)"] if a.needs_model else [])
                + (["the model where it can be reloaded (for an optional part)"] if a.may_use_model else []))
        click.echo(f"    also reads: {'; '.join(also) or 'nothing else (the stored tokens)'}")
        click.echo(f"    models:     {', '.join(a.families)}"
                   + ("" if a.auto else "  (named only: not run by 'analyze RUN' without names)"))
        for p in a.params:
            extra = f", one of {', '.join(map(str, p.choices))}" if p.choices else ""
            click.echo(f"    --param {a.name}.{p.name}={p.default!r}  ({p.type.__name__}{extra}) {p.help}")


class _Progress:
    """An analysis's progress on stderr: a bar with its status line on a terminal; in a log (not
    a terminal), a line at most every 15 s and at the end."""

    def __init__(self, bar: bool) -> None:
        self.bar = bar
        self.progress: Any = None
        self.task: Any = None
        self.name = ""
        self.last = 0.0

    def __call__(self, a: Any, done: int, total: int, status: str = "") -> None:
        import time

        if not self.bar:
            now = time.monotonic()
            if now - self.last >= 15 or done >= total:
                self.last = now
                click.echo(f"workbench: {a.name} {done:,}/{total:,} {status}".rstrip(), err=True)
            return
        if self.progress is None or self.name != a.name:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.close()
            self.name = a.name
            self.progress = Progress(TextColumn(a.name), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                     transient=False, console=Console(stderr=True))
            self.progress.__enter__()
            self.task = self.progress.add_task(a.name, total=total, status="")
        self.progress.update(self.task, completed=done, total=total, status=status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None


@cli.command("analyze")
@click.argument("run_path", metavar="RUN", required=False)
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--param", "param_items", multiple=True, metavar="NAME.KEY=VALUE",
              help="Set a parameter of analysis NAME (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one record per analysis.")
@click.option("--force", is_flag=True, help="Compute again even if a result with the same key is stored.")
@click.option("--device", default="auto", show_default=True,
              help="Where analyses that run the model run it: cpu, cuda, cuda:N or auto.")
@click.option("--list", "list_only", is_flag=True, help="List the analyses and their parameters.")
@click.option("--chat", is_flag=True,
              help="Check that RUN was captured with --chat. Analyses always follow the run: its prompts "
                   "are the chat template's tokens, and a reloaded model reads them so.")
def analyze_cmd(run_path: str | None, names: tuple[str, ...], param_items: tuple[str, ...],
                as_json: bool, force: bool, device: str, list_only: bool, chat: bool) -> None:
    """Run analyses over RUN and store their results beside it (RUN.h5.results/).

    With no NAME, every analysis whose inputs the run holds, except those that need a parameter
    only you can give (--list marks them "named only"). A result already stored for the
    same analysis, version and parameters is shown again, not recomputed (unless --force). An
    analysis that fails is reported and recorded; the others still run.
    """
    from workbench.analysis import missing_inputs
    from workbench.registries import analyze, build_analyses
    from workbench.store import open_run

    hang_ups_interrupt()
    registry = build_analyses()
    if list_only:
        _list_analyses(registry, as_json)
        return
    if not run_path:
        raise UserError("give a RUN to analyse (or --list)")
    params = _parse_param_options(param_items)
    for name in params:
        registry.get(name)
    with open_run(run_path) as run:
        if chat and not run.capture_settings.chat:
            raise UserError(f"{run.final_path.name} was not captured with --chat: its prompts are plain text "
                            "(capture again with --chat to study the chat layout)")
        if names:
            chosen = [registry.get(n) for n in dict.fromkeys(names)]
        else:
            chosen = [a for a in registry if a.auto and not missing_inputs(run, a)]
            skipped = [a.name for a in registry if a.auto and a not in chosen]
            if skipped and not as_json:
                click.echo(f"workbench: skipping {', '.join(skipped)} (inputs not in this run; "
                           "'workbench analyze --list' says what each needs)", err=True)
            if not chosen:
                raise UserError(f"no analysis can run on {run.final_path.name}: it lacks their inputs "
                                "(capture with --for NAME)")
        show = sys.stderr.isatty() and not as_json
        bar = _Progress(show)

        def start(a: Any) -> None:
            bar.close()
            if show:
                click.echo(f"workbench: running {a.name} ...", err=True)

        try:
            outcomes = analyze(run, chosen, params, force=force, device=device, on_start=start,
                               progress=bar)
        finally:
            bar.close()
        if as_json:
            records = []
            for o in outcomes:
                rec = o.stored.record(run)
                rec["outcome"] = o.status
                rec["result"] = o.analysis.json(o.stored.result()) if o.ok else None
                records.append(rec)
            click.echo(json.dumps(records, indent=2, default=str))
            return
        for o in outcomes:
            how = {"computed": f"computed in {o.seconds:.2f} s", "reused": "stored earlier",
                   "error": "FAILED"}[o.status]
            click.echo(f"== {o.analysis.name} {o.analysis.version}  {format_params(o.params)}"
                       f"[{how}; {o.stored.path}]")
            if o.ok:
                click.echo(o.analysis.text(o.stored.result()))
            else:
                click.echo(f"error: {o.stored.error}")
            click.echo("")
