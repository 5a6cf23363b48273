"""Commands that record runs: ``demo``, ``capture``, ``inspect``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from workbench.cli.base import (
    SAMPLE_PROMPTS,
    cli,
    format_params,
    hang_ups_interrupt,
    load_with_spinner,
    make_console,
    model_option,
)
from workbench.cli.models import hook_patterns, print_prediction
from workbench.errors import UserError


@cli.command("demo")
@model_option
@click.option("-o", "--out", default="runs/demo.h5", show_default=True, type=click.Path(dir_okay=False),
              help="Run file the demo writes (replaced on every run).")
@click.option("--tui/--no-tui", "open_tui", default=None,
              help="Open the run in the terminal UI at the end.  [default: when in a terminal]")
def demo_cmd(model_name: str, device: str, bos: str | None, out: str, open_tui: bool | None) -> None:
    """The main job: capture sample prompts with the default model into a run, read the
    predictions back from the run (without the model), run the analyses whose inputs the run
    holds, storing their results beside it, and open the run in the terminal UI."""
    from pathlib import Path

    import numpy as np

    from workbench.capturing import capture
    from workbench.models.model import Prediction, TopToken
    from workbench.store import open_run

    model = load_with_spinner(model_name, device, bos)
    console = make_console()
    i = model.info
    console.print(
        f"[bold]{model.name}[/]: {i.family} {i.architecture}, {i.n_layers} layers, "
        f"{i.n_heads} query / {i.n_kv_heads} KV heads, d_model {i.d_model}, vocab {i.d_vocab:,}; "
        f"weights {i.provenance.quantization or i.dtype}; BOS policy '{i.bos.policy}'"
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    capture(model, list(SAMPLE_PROMPTS), hooks=["residual", "attention"], out=path, batch_size=4,
            overwrite=True)
    with open_run(path) as run:  # from here on, only the stored run is read
        for k in range(len(run)):
            ids = run.tokens(k).tolist()
            top_ids, top_lp = run.top_k(k)
            top = [TopToken(int(t), model.tokenizer.decode([int(t)]), float(np.exp(lp)), float("nan"))
                   for t, lp in zip(top_ids[-1, :5], top_lp[-1, :5])]
            pred = Prediction(prompt=run.prompt(k), token_ids=ids, str_tokens=run.str_tokens(k),
                              position=len(ids) - 1, top=top, bos_policy=run.capture_settings.bos)
            print_prediction(console, pred, show_ids=True, table=run.token_table)
            answer = run.metadata(k).get("answer")
            if answer is not None:
                rank = [t.token for t in top].index(answer) + 1 if answer in [t.token for t in top] else None
                console.print(f"expected {answer!r}: " + (f"rank {rank}" if rank else "not in the top 5"))
        from workbench.analysis import missing_inputs
        from workbench.registries import analyze, build_analyses

        chosen = [a for a in build_analyses() if a.auto and not missing_inputs(run, a)]
        for o in analyze(run, chosen, model=model):
            console.print(f"\n[bold]analysis {o.analysis.name}[/]: {o.analysis.description}")
            if o.ok:
                console.print(o.analysis.text(o.stored.result()), markup=False, highlight=False)
            else:
                console.print(f"failed: {o.stored.error}", markup=False)
        console.print(f"\n[bold]run[/] {path}: {len(run)} prompts, {run.n_tokens_total()} tokens, "
                      f"{len(run.hooks)} stored tensors ({len(run.hook_names)} hook names), "
                      f"{run.size_bytes() / 1e6:.1f} MB; analysis results in {path}.results/. "
                      f"Explore it with 'workbench tui {path}', 'workbench inspect {path}', "
                      f"'workbench analyze {path}' or workbench.open_run('{path}').")
    if open_tui is None:
        open_tui = sys.stdin.isatty() and sys.stdout.isatty()
    if open_tui:
        from workbench.tui import make_app

        make_app([str(path)]).run()


# --- capture / inspect -----------------------------------------------------------------------------

PRESET_HELP = (
    "presets: residual, attention, attention-full, mlp, lens, all "
    "('workbench capture --list-presets' says what each holds)"
)


@cli.command("capture")
@model_option
@click.option("-p", "--prompt", "prompt_texts", multiple=True, metavar="TEXT",
              help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Prompts file: .jsonl (objects with 'prompt', optional 'id', and any metadata: "
                   "'answer', 'wrong', 'corrupted', ...) or text (one prompt per line).")
@click.option("--hooks", "hook_items", multiple=True, metavar="PATTERN",
              help="Hook name, glob ('*' within a dot segment, '**' across) or preset; repeatable. "
                   "Default: residual. " + PRESET_HELP)
@click.option("-o", "--out", type=click.Path(dir_okay=False), metavar="RUN.h5",
              help="Run file to write (written as RUN.h5.partial, renamed when complete).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", "storage_dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              default="float32", show_default=True,
              help="Storage dtype (float32 is exact; bfloat16 is kept bit-exact as raw bits).")
@click.option("--compression", type=click.Choice(["none", "gzip", "lzf", "blosc2-zstd", "zstd"]),
              default="none", show_default=True,
              help="HDF5 compression of activations (dense floats barely compress: BENCHMARKS.md). "
                   "blosc2-zstd and zstd need the 'export' extra (hdf5plugin).")
@click.option("--predictions", default=10, show_default=True, type=click.IntRange(0, 1000),
              metavar="K", help="Top-K next-token predictions (ids and log-probs) stored per position, "
                                "with the per-token loss; 0 stores no LM outputs (the fastest capture).")
@click.option("--generate", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Sample N tokens after each prompt (decoders), then capture the whole sequence "
                   "and each step's sampling distribution (entropy, chosen token's probability).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature for --generate (0: greedy).")
@click.option("--top-k", "sample_top_k", default=None, type=click.IntRange(min=1),
              help="Sample only among the K most likely tokens (--generate).")
@click.option("--top-p", "sample_top_p", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Sample only among the most likely tokens holding P of the mass (--generate).")
@click.option("--seed", default=None, type=int,
              help="Random seed for --generate (recorded in the run; drawn at random if omitted).")
@click.option("--truncate", is_flag=True, help="Cut prompts longer than the model's context (warns).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run once the new one is complete.")
@click.option("--resume", is_flag=True, help="Continue an interrupted capture (same prompts and settings).")
@click.option("--commit-every", "commit_seconds", default=2.0, show_default=True,
              type=click.FloatRange(min=0), metavar="SECONDS",
              help="Commit finished batches together at most this often (0: every batch). A killed "
                   "capture (kill -9) loses at most the batches of the last SECONDS; Ctrl-C "
                   "loses none.")
@click.option("--dry-run", is_flag=True, help="Print the resolved hooks and the size estimate; write nothing.")
@click.option("--list-presets", is_flag=True, help="List the hook presets and exit.")
@click.option("--for", "for_analyses", multiple=True, metavar="ANALYSIS",
              help="Also capture what ANALYSIS needs (repeatable; 'workbench analyze --list'). "
                   "Without --hooks, only that.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Capture on N Ray workers, each loading the model, into a sharded run (RUN.h5 "
                   "indexes unit files in RUN.h5.shards/). 1: in this process, without Ray.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Join the Ray cluster at ADDRESS (default: a local runtime on 127.0.0.1).")
@click.option("--worker-cpus", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="CPUs per worker (its torch threads).")
@click.option("--worker-gpus", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="GPUs per worker (use with --device cuda; 1 places one worker per GPU).")
@click.option("--units", default=None, type=click.IntRange(min=1), metavar="N",
              help="Work units to split the prompts into (default: 4 per worker).")
@click.option("--chat", is_flag=True,
              help="Lay each prompt out with the model's chat template (a user turn, the assistant's "
                   "turn opened); JSONL lines may give 'messages' instead of 'prompt'. Recorded in the run.")
def capture_cmd(model_name: str, device: str, bos: str | None, prompt_texts: tuple[str, ...],
                prompts_file: str | None, hook_items: tuple[str, ...], out: str | None,
                batch_size: int, storage_dtype: str, compression: str, predictions: int,
                generate: int, temperature: float, sample_top_k: int | None,
                sample_top_p: float | None, seed: int | None, truncate: bool,
                overwrite: bool, resume: bool, commit_seconds: float, dry_run: bool,
                list_presets: bool, for_analyses: tuple[str, ...], workers: int,
                ray_address: str | None, worker_cpus: float, worker_gpus: float,
                units: int | None, chat: bool) -> None:
    """Run MODEL over prompts and record activations into an HDF5 run.

    Also stored for every prompt: token ids and strings, per-token loss, the top-k next-token
    predictions at every position, and everything needed to reproduce the run. Encoder-decoders
    (T5) read the prompt in the encoder and the JSONL field 'target' (else 'answer') in the decoder.
    """
    from workbench.hooknames import PRESETS

    if list_presets:
        for name, (description, patterns) in PRESETS.items():
            click.echo(f"{name:15} {description}\n{'':15} {' '.join(patterns)}")
        return
    from workbench.capturing import capture
    from workbench.capturing.prompts import command_line_prompts

    prompts = command_line_prompts(prompt_texts, prompts_file)
    if chat and bos not in (None, "none"):
        raise UserError(f"--chat lays prompts out with the chat template, which writes its own special tokens: "
                        f"drop --bos {bos}")
    if not out and not dry_run:
        raise UserError("--out RUN.h5 is required (or --dry-run)")
    hooks = list(hook_items)
    wanted = []
    if for_analyses:
        from workbench.analysis import capture_hooks_for
        from workbench.registries import build_analyses

        registry = build_analyses()
        wanted = [registry.get(n) for n in for_analyses]
        hooks += [h for h in capture_hooks_for(wanted) if h not in hooks]
    elif not hooks:
        hooks = ["residual"]

    hang_ups_interrupt()

    def load():  # type: ignore[no-untyped-def]  # capture() calls it once its checks pass
        model = load_with_spinner(model_name, device, bos)
        for a in wanted:
            if model.family not in a.families:
                raise UserError(f"analysis {a.name!r} works on {' or '.join(a.families)} models, "
                                f"not on {model.name} ({model.family})")
            if a.needs_lm_outputs and not model.info.has_lm_head:
                raise UserError(f"analysis {a.name!r} needs LM outputs; {model.name} has no LM head")
        return model

    result = capture(
        load, prompts, hooks=hooks, out=out, batch_size=batch_size,
        dtype=storage_dtype, compression=compression, predictions=predictions, truncate=truncate,
        generate=generate, temperature=temperature, top_k=sample_top_k, top_p=sample_top_p,
        seed=seed, overwrite=overwrite, resume=resume, dry_run=dry_run,
        commit_seconds=commit_seconds, workers=workers, ray_address=ray_address,
        worker_cpus=worker_cpus, worker_gpus=worker_gpus, units=units, chat=chat,
    )
    if generate and not dry_run and out:
        from workbench.store import open_run

        with open_run(out) as run:
            print_generated(run, min(len(run), GENERATED_SHOWN))
    if dry_run:
        plan = result.plan
        for line in plan.summary():
            click.echo(line)
        click.echo("stored tensors:")
        for line in plan.hook_table():
            click.echo(line)
        free = None
        if out:
            import shutil
            from pathlib import Path

            parent = Path(out).expanduser().absolute().parent
            if parent.is_dir():
                free = shutil.disk_usage(parent).free
        if free is not None:
            click.echo(f"free space at the output: {free / 1e9:.1f} GB")


@cli.command("inspect")
@click.argument("run_path", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-n", "--prompts", "n_show", default=5, show_default=True, type=click.IntRange(min=0),
              help="How many prompts to list.")
def inspect_cmd(run_path: str, as_json: bool, n_show: int) -> None:
    """Summarise a run (finished, still being written, or interrupted) without loading the model."""
    from workbench.store import open_run
    from workbench.store.results import list_results
    from workbench.store.tokens_display import generated_text

    if show_shard_progress(run_path, as_json):
        return
    with open_run(run_path) as run:
        summary = run.summary(n_show)
        summary["results"] = [r.record(run) for r in list_results(run)]
        if run.has_generation:
            for p in summary["first_prompts"]:
                p["generated"] = generated_text(run, p["index"])
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        info = run.model_info
        prov = info.get("provenance") or {}
        settings = run.capture_settings
        click.echo(f"run      {run.path}  [{run.status}]  {run.size_bytes() / 1e6:,.1f} MB")
        click.echo(f"model    {info['name']}: {info['family']} {info['architecture']}, "
                   f"{info['n_layers']} layers, d_model {info['d_model']}; "
                   f"{prov.get('quantization') or prov.get('source')}")
        counts = ", ".join(f"{run.n_tokens_total(s):,} {s.replace('_', ' ')}" for s in run.streams)
        click.echo(f"prompts  {len(run):,} of {run.planned_prompts:,} committed, {counts}; "
                   f"BOS policy '{settings.bos}'")
        lm = "yes" if run.has_lm_outputs else "no (the model has no LM head)"
        click.echo(f"storage  {run.storage_dtype}, {settings.compression or 'no'} compression, "
                   f"{len(run.hooks)} stored tensors; loss and top-{settings.top_k}: {lm}")
        if run.shards:
            click.echo(f"shards   {len(run.shards)} unit files in {run.shards[0]['file'].split('/')[0]}/ "
                       "(each checked: present, complete, of this run)")
        if settings.chat:
            click.echo(f"chat     prompts laid out by the model's chat template (sha256 "
                       f"{settings.chat.get('template_sha256', '?')[:12]}); shown below by their last turn")
        click.echo(f"hooks    requested: {' '.join(settings.hooks_requested)}")
        for pattern, n in hook_patterns(list(run.hooks)):
            click.echo(f"           {pattern}" + (f"  x{n}" if n > 1 else ""))
        for p in summary["first_prompts"]:
            text, meta_doc = p["text"], dict(p["metadata"])
            messages = meta_doc.pop("messages", None) if settings.chat else None
            if messages:  # the template's text starts alike for every prompt: show the last turn
                text = f"{messages[-1]['role']}: {messages[-1]['content']}"
            text = text if len(text) <= 60 else text[:57] + "..."
            meta = f"  {meta_doc}" if meta_doc else ""
            click.echo(f"  [{p['index']}] {p['id']} ({p['n_tokens']} tokens) {text!r}{meta}")
        if len(run) > len(summary["first_prompts"]):
            click.echo(f"  ... {len(run) - len(summary['first_prompts']):,} more")
        if run.has_generation:
            print_generated(run, len(summary["first_prompts"]))
        results = list_results(run)
        if results:
            click.echo(f"results  {len(results)} beside the run, in {results[0].path.parent}")
        for r in results:
            state = "ok" if r.ok else f"ERROR: {r.error}"
            if not r.current(run):
                state += (" (stale: computed on an earlier run at this path)"
                          if not r.computed_on(run) else
                          f" (covers {r.meta.get('n_prompts')} prompts)")
            click.echo(f"  {r.analysis} {r.version}  {format_params(r.params)}{state}")


GENERATED_SHOWN = 20  # generated texts printed after a capture (inspect -n shows more)


def print_generated(run: Any, n: int) -> None:
    """The text generated after each of the first ``n`` prompts of a generated run, beside its
    prompt: the generated tokens' bytes decoded together (byte-level pieces joined into their
    characters)."""
    from workbench.store.tokens_display import generated_text

    each = run.capture_settings.generation or {}
    click.echo(f"generated  {each.get('n', '?')} tokens after each prompt (prompt → continuation):")
    for i in range(n):
        click.echo(f"  [{i}] {run.prompt_id(i)} {run.prompt(i)!r} → {generated_text(run, i)!r}")
    if len(run) > n:
        click.echo(f"  ... {len(run) - n:,} more ('workbench inspect RUN -n N' shows N)")


def show_shard_progress(run_path: str, as_json: bool) -> bool:
    """A sharded capture in progress or interrupted (no index yet): print each unit's state."""
    from pathlib import Path

    from workbench.store.files import partial_path, writer_alive
    from workbench.store.shards import shard_progress

    final = Path(run_path).expanduser().absolute()
    if final.exists() or partial_path(final).exists():
        return False
    progress = shard_progress(final)
    if progress is None:
        return False
    progress["status"] = "in progress" if writer_alive(final) else "interrupted"
    if as_json:
        click.echo(json.dumps(progress, indent=2))
        return True
    click.echo(f"run      {final}  [sharded capture {progress['status']}]")
    click.echo(f"prompts  {progress['committed']:,} of {progress['prompts']:,} committed, in "
               f"{len(progress['units'])} units ({progress['workers']} workers)")
    for u in progress["units"]:
        n = u["stop"] - u["start"]
        click.echo(f"  unit {u['index']:>4}  prompts {u['start']}-{u['stop'] - 1}  {u['state']:10} "
                   f"{u['committed']:,}/{n:,}  {u['file']}")
    if progress["status"] == "interrupted":
        click.echo("resume   run the same capture command with --resume")
    return True
