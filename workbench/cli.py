"""The ``workbench`` command line.

Start-up stays light: this module imports click only. torch, TransformerLens and rich are imported
inside the commands that need them, so ``workbench --help`` and ``workbench models`` answer fast.
User mistakes print one line (``workbench: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from workbench.version import __version__
from workbench.errors import UserError

BOS_CHOICE = click.Choice(["tokenizer", "prepend", "none"])
SAMPLE_PROMPTS = (
    {"id": "france", "prompt": "The capital of France is", "answer": " Paris", "wrong": " London"},
    {"id": "ioi", "prompt": "When Mary and John went to the store, John gave a drink to",
     "answer": " Mary", "wrong": " John"},
    {"id": "opposite", "prompt": "The opposite of hot is", "answer": " cold", "wrong": " warm"},
    {"id": "emoji", "prompt": "I love pizza 🍕 and", "answer": " pasta"},
)


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"workbench: error: {message}", err=True)
    sys.exit(code)


class WorkbenchGroup(click.Group):
    """A click group whose user errors are one line on stderr and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(" ".join(exc.format_message().split()) + hint)
        except UserError as exc:
            _fail(str(exc))
        except click.Abort:
            click.echo("workbench: aborted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(141)
        sys.exit(rv if isinstance(rv, int) else 0)


def _console(stderr: bool = False):  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _load(name: str, device: str, bos: str | None):  # type: ignore[no-untyped-def]
    from workbench.registries import load_model

    console = _console(stderr=True)
    with console.status(f"loading {name} ...", spinner="dots"):
        return load_model(name, device=device, bos=bos)  # type: ignore[arg-type]


def model_option(f: Any) -> Any:
    f = click.option("--device", default="auto", show_default=True,
                     help="cpu, cuda, cuda:N, or auto (CUDA when available).")(f)
    f = click.option("--bos", type=BOS_CHOICE, default=None,
                     help="How prompts are tokenized: 'tokenizer' adds the special tokens the "
                          "model's tokenizer adds; 'prepend' puts BOS first (TransformerLens' "
                          "habit); 'none' adds nothing. Default: the model's own policy "
                          "(shown by 'workbench describe').")(f)
    f = click.option("-m", "--model", "model_name", default="smollm2-135m", show_default=True,
                     help="Registered name ('workbench models'), Hugging Face id ORG/NAME, "
                          "model folder, or .gguf file.")(f)
    return f


@click.group(cls=WorkbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="workbench")
@click.option("--plugins-dir", "plugins_dirs", multiple=True, metavar="DIR", expose_value=False,
              is_eager=True, type=click.Path(file_okay=False),
              help="Also load every .py file in DIR as a plugin (repeatable; also "
                   "$WORKBENCH_PLUGINS_DIR).")
def cli() -> None:
    """workbench: an interpretability workbench for transformer language models.

    Load models through TransformerLens, capture their activations into HDF5 runs, and analyse
    the runs with plugins. The default model (SmolLM2-135M-Instruct) ships inside a Python
    package and works offline.

    Plugins: the 'workbench' entry-point group and --plugins-dir; $WORKBENCH_PLUGINS=a,b loads
    only those; WORKBENCH_STRICT_PLUGINS=1 makes any plugin failure an error.
    """


# --- models -------------------------------------------------------------------------------------


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_cmd(as_json: bool) -> None:
    """List model sources and whether each can be loaded here (loads nothing)."""
    from workbench.models import DEFAULT_MODEL
    from workbench.registries import build_registry
    from workbench.models.registry import GENERIC_SOURCES

    registry = build_registry()
    rows = []
    for source in registry:
        problem = source.availability()
        cached = None
        if source.is_cached is not None and problem is None:
            try:
                cached = bool(source.is_cached())
            except Exception:  # noqa: BLE001 - a listing reports "unknown", never crashes
                cached = None
        rows.append({
            "name": source.name,
            "aliases": list(source.aliases),
            "family": source.family,
            "available": problem is None,
            "unavailable_reason": problem,
            "converted_cached": cached,
            "has_lm_head": source.has_lm_head,
            "default_bos": source.default_bos,
            "origin": source.origin,
            "description": source.description,
            "plugin": source.plugin,
            "default": source.name == DEFAULT_MODEL,
        })
    generic = [{"pattern": p, "description": d} for p, d in GENERIC_SOURCES]
    if as_json:
        click.echo(json.dumps({"models": rows, "generic": generic}, indent=2))
        return
    from rich.table import Table

    table = Table(title="Model sources", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("available", no_wrap=True)
    table.add_column("description", overflow="fold")
    notes = []
    for r in rows:
        if r["available"]:
            status = "[green]yes[/]"
            if r["converted_cached"] is not None:
                status += ", cached" if r["converted_cached"] else ", converts once"
        else:
            status = "[red]no[/] (see below)"
            notes.append(f"{r['name']}: {r['unavailable_reason']}")
        name = r["name"] + (" *" if r["default"] else "")
        table.add_row(name, r["family"], status, r["description"])
    for g in generic:
        table.add_row(g["pattern"], "any", "[dim]if reachable[/]", g["description"])
    console = _console()
    console.print(table)
    console.print("[dim]* default model. 'workbench describe NAME' loads one and shows its provenance.[/]")
    for note in notes:
        console.print(f"[red]unavailable[/] {note}", soft_wrap=True)


# --- describe -----------------------------------------------------------------------------------


def hook_patterns(names: list[str]) -> list[tuple[str, int]]:
    """Collapse layer indices: ``blocks.{0..29}.attn.hook_q`` -> (``blocks.*.attn.hook_q``, 30)."""
    counts: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"(^|\.)(\d+)(?=\.)", r"\1*", name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return list(counts.items())


@cli.command("describe")
@click.argument("model_name", required=False, default="smollm2-135m")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with every hook name).")
@click.option("--hooks", "show_hooks", is_flag=True, help="List the hook points (layer-collapsed).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--bos", type=BOS_CHOICE, default=None, help="BOS policy to describe.")
def describe_cmd(model_name: str, as_json: bool, show_hooks: bool, device: str, bos: str | None) -> None:
    """Load MODEL and describe it: family, shape, normalisation, BOS policy, provenance, hooks."""
    model = _load(model_name, device, bos)
    info = model.info.to_dict()
    if as_json:
        info["hook_names"] = model.hook_names
        click.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    i = model.info
    bos_line = f"{i.bos.policy}: adds {list(i.bos.prefix) or 'nothing'} before"
    bos_line += f", {list(i.bos.suffix) or 'nothing'} after the text"
    rows = [
        ("model", f"{i.name}: {i.description}"),
        ("family", f"{i.family} ({i.architecture})"),
        ("layers", f"{i.n_layers}" + (f" encoder + {i.n_decoder_layers} decoder" if i.n_decoder_layers else "")),
        ("heads", f"{i.n_heads} query, {i.n_kv_heads} key/value, d_head {i.d_head}"),
        ("d_model / d_mlp", f"{i.d_model} / {i.d_mlp}"),
        ("vocabulary", f"{i.d_vocab:,} tokens" + (" (tied embeddings)" if i.tied_embeddings else "")),
        ("context", f"{i.n_ctx:,} tokens" if i.n_ctx else "unbounded"),
        ("normalisation", f"{i.normalization}, {i.norm_placement}-norm"),
        ("positions", i.positional),
        ("attention", i.attention),
        ("LM head", "trained" if i.has_lm_head else "[red]none (no trained head: predictions refused)[/]"),
        ("BOS policy", bos_line),
        ("numerics", f"{i.dtype} on {i.device}; {i.numerics}"),
        ("hook points", f"{i.n_hook_names:,} names"),
    ]
    for key, value in i.provenance.to_dict().items():
        if value is not None:
            rows.append((f"provenance.{key}", str(value)))
    for k, v in rows:
        t.add_row(k, v)
    console = _console()
    console.print(t)
    if show_hooks:
        for pattern, n in hook_patterns(model.hook_names):
            console.print(f"  {pattern}" + (f"  [dim]x{n}[/]" if n > 1 else ""))


# --- predict / demo -------------------------------------------------------------------------------


def _print_prediction(console: Any, pred: Any, show_ids: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    toks = Text()
    for j, (tid, s) in enumerate(zip(pred.token_ids, pred.str_tokens)):
        if j:
            toks.append("\u2502", style="dim")  # a bar between tokens; spaces shown as a dot
        shown = repr(s)[1:-1].replace(" ", "\u00b7") or "\u2400"
        toks.append(shown, style="reverse" if j == pred.position else "")
        if show_ids:
            toks.append(f"[{tid}]", style="dim")
    console.print(Text.assemble(("prompt ", "bold"), repr(pred.prompt)))
    console.print(Text.assemble((f"tokens ({len(pred.token_ids)}, bos={pred.bos_policy}) ", "bold"), toks))
    table = Table(title=f"{pred.kind} at position {pred.position}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("probability", justify="right")
    with_logits = not all(math.isnan(t.logit) for t in pred.top)  # runs store log-probs only
    if with_logits:
        table.add_column("logit", justify="right")
    for rank, t in enumerate(pred.top, 1):
        bar = "\u2588" * max(1, round(t.prob * 20)) if t.prob >= 0.025 else ""
        cells = [str(rank), repr(t.token), str(t.id), f"{t.prob:7.2%} {bar}"]
        table.add_row(*cells, *([f"{t.logit:.2f}"] if with_logits else []))
    console.print(table)


@cli.command("predict")
@click.argument("prompts", nargs=-1, required=True)
@model_option
@click.option("-k", "--top-k", "k", default=10, show_default=True, type=click.IntRange(min=1),
              help="How many tokens to show.")
@click.option("--ids", "show_ids", is_flag=True, help="Show token ids beside the tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def predict_cmd(prompts: tuple[str, ...], model_name: str, device: str, bos: str | None,
                k: int, show_ids: bool, as_json: bool) -> None:
    """Show how each PROMPT is tokenized and the model's top next-token predictions.

    Encoders predict the token at [MASK]; encoder-decoders their first output token.
    """
    model = _load(model_name, device, bos)
    preds = [model.predict(p, k=k) for p in prompts]
    if as_json:
        click.echo(json.dumps({"model": model.info.to_dict(), "predictions": [p.to_dict() for p in preds]}, indent=2))
        return
    console = _console()
    console.print(f"[bold]{model.name}[/] ({model.info.family}, {model.info.n_layers} layers)")
    for pred in preds:
        _print_prediction(console, pred, show_ids)


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

    model = _load(model_name, device, bos)
    console = _console()
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
                              position=len(ids) - 1, top=top, bos_policy=run.settings["bos"])
            _print_prediction(console, pred, show_ids=True)
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
@click.option("--compression", type=click.Choice(["none", "gzip", "lzf"]), default="none",
              show_default=True, help="HDF5 compression of activations (dense floats barely compress).")
@click.option("--predictions", default=10, show_default=True, type=click.IntRange(1, 1000),
              metavar="K", help="Top-K next-token predictions (ids and log-probs) stored per position.")
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
def capture_cmd(model_name: str, device: str, bos: str | None, prompt_texts: tuple[str, ...],
                prompts_file: str | None, hook_items: tuple[str, ...], out: str | None,
                batch_size: int, storage_dtype: str, compression: str, predictions: int,
                generate: int, temperature: float, sample_top_k: int | None,
                sample_top_p: float | None, seed: int | None, truncate: bool,
                overwrite: bool, resume: bool, commit_seconds: float, dry_run: bool,
                list_presets: bool, for_analyses: tuple[str, ...]) -> None:
    """Run MODEL over prompts and record activations into an HDF5 run.

    Also stored for every prompt: token ids and strings, per-token loss, the top-k next-token
    predictions at every position, and everything needed to reproduce the run. Encoder-decoders
    (T5) read the prompt in the encoder and the JSONL field 'target' (else 'answer') in the decoder.
    """
    from workbench.capturing.hooks import PRESETS

    if list_presets:
        for name, (description, patterns) in PRESETS.items():
            click.echo(f"{name:15} {description}\n{'':15} {' '.join(patterns)}")
        return
    from workbench.capturing import capture
    from workbench.capturing.prompts import command_line_prompts

    prompts = command_line_prompts(prompt_texts, prompts_file)
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

    def load():  # type: ignore[no-untyped-def]  # capture() calls it once its checks pass
        model = _load(model_name, device, bos)
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
        commit_seconds=commit_seconds,
    )
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

    with open_run(run_path) as run:
        summary = run.summary(n_show)
        summary["results"] = [r.record(run) for r in list_results(run)]
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        info = run.model_info
        prov = info.get("provenance") or {}
        settings = run.settings
        click.echo(f"run      {run.path}  [{run.status}]  {run.size_bytes() / 1e6:,.1f} MB")
        click.echo(f"model    {info['name']}: {info['family']} {info['architecture']}, "
                   f"{info['n_layers']} layers, d_model {info['d_model']}; "
                   f"{prov.get('quantization') or prov.get('source')}")
        counts = ", ".join(f"{run.n_tokens_total(s):,} {s.replace('_', ' ')}" for s in run.streams)
        click.echo(f"prompts  {len(run):,} of {run.planned_prompts:,} committed, {counts}; "
                   f"BOS policy '{settings.get('bos')}'")
        lm = "yes" if run.has_lm_outputs else "no (the model has no LM head)"
        click.echo(f"storage  {run.storage_dtype}, {settings.get('compression') or 'no'} compression, "
                   f"{len(run.hooks)} stored tensors; loss and top-{settings.get('top_k')}: {lm}")
        click.echo(f"hooks    requested: {' '.join(settings.get('hooks_requested') or [])}")
        for pattern, n in hook_patterns(list(run.hooks)):
            click.echo(f"           {pattern}" + (f"  x{n}" if n > 1 else ""))
        for p in summary["first_prompts"]:
            text = p["text"] if len(p["text"]) <= 60 else p["text"][:57] + "..."
            meta = f"  {p['metadata']}" if p["metadata"] else ""
            click.echo(f"  [{p['index']}] {p['id']} ({p['n_tokens']} tokens) {text!r}{meta}")
        if len(run) > len(summary["first_prompts"]):
            click.echo(f"  ... {len(run) - len(summary['first_prompts']):,} more")
        results = list_results(run)
        if results:
            click.echo(f"results  {len(results)} beside the run, in {results[0].path.parent}")
        for r in results:
            state = "ok" if r.ok else f"ERROR: {r.error}"
            if not r.current(run):
                state += (" (stale: computed on an earlier run at this path)"
                          if not r.computed_on(run) else
                          f" (covers {r.meta.get('n_prompts')} prompts)")
            click.echo(f"  {r.analysis} {r.version}  {_fmt_params(r.params)}{state}")


# --- terminal UI and plots -------------------------------------------------------------------


@cli.command("tui")
@click.argument("run_paths", metavar="[RUN]...", nargs=-1)
@click.option("--view", type=click.Choice(["attention", "residual", "topk", "info", "results"]),
              default="attention", show_default=True, help="The view to open on.")
@click.option("--prompt", "prompt_index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the prompt to open on.")
@click.option("--export-dir", type=click.Path(file_okay=False, exists=True), default=".",
              help="Where 's' saves SVG screenshots.  [default: the current folder]")
def tui_cmd(run_paths: tuple[str, ...], view: str, prompt_index: int, export_dir: str) -> None:
    """Browse runs in the terminal: prompts, tokens, attention heatmaps, residual-stream norms,
    top-k predictions, metadata, and analysis results (with their plugins' views).

    With no RUN, every run in the current folder (a run still being captured included: its
    prompts appear as they are committed). Press ? in the app for the keys; ctrl+p for the
    command palette. Does not import torch or TransformerLens.
    """
    from workbench.tui import make_app

    app = make_app(list(run_paths), view=view, prompt=prompt_index, export_dir=Path(export_dir))
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
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Image file to write (.png, .svg, .pdf: matplotlib decides by the suffix).")
def plot_cmd(run_path: str, kind: str, prompt_index: int, hook: str | None, layer: int | None,
             head: int, out_path: str) -> None:
    """Draw a heatmap from RUN with matplotlib (pip install 'workbench[plot]')."""
    from workbench.plot import plot_attention, plot_residual
    from workbench.store import open_run

    with open_run(run_path) as run:
        if kind == "attention":
            plot_attention(run, prompt_index, out_path, hook=hook, layer=layer, head=head)
        else:
            plot_residual(run, prompt_index, out_path)
    click.echo(f"wrote {out_path}")


# --- plugins and analyses --------------------------------------------------------------------


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_cmd(as_json: bool) -> None:
    """List the plugins: where each comes from, its version, the hooks it implements, what it
    registers (models, analyses, views, commands), and any load or hook errors.

    Does not import torch or TransformerLens.
    """
    from workbench.registries import build_analyses, build_registry, build_views
    from workbench.plugins import plugin_manager, report_of

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
                + (["the model (reloaded by the run's provenance)"] if a.needs_model else []))
        click.echo(f"    also reads: {'; '.join(also) or 'nothing else (the stored tokens)'}")
        click.echo(f"    models:     {', '.join(a.families)}"
                   + ("" if a.auto else "  (named only: not run by 'analyze RUN' without names)"))
        for p in a.params:
            extra = f", one of {', '.join(map(str, p.choices))}" if p.choices else ""
            click.echo(f"    --param {a.name}.{p.name}={p.default!r}  ({p.type.__name__}{extra}) {p.help}")


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
def analyze_cmd(run_path: str | None, names: tuple[str, ...], param_items: tuple[str, ...],
                as_json: bool, force: bool, device: str, list_only: bool) -> None:
    """Run analyses over RUN and store their results beside it (RUN.h5.results/).

    With no NAME, every analysis whose inputs the run holds, except those that need a parameter
    only you can give (--list marks them "named only"). A result already stored for the
    same analysis, version and parameters is shown again, not recomputed (unless --force). An
    analysis that fails is reported and recorded; the others still run.
    """
    from workbench.analysis import missing_inputs
    from workbench.registries import analyze, build_analyses
    from workbench.store import open_run

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

        def start(a: Any) -> None:
            if show:
                click.echo(f"workbench: running {a.name} ...", err=True)

        outcomes = analyze(run, chosen, params, force=force, device=device, on_start=start)
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
            click.echo(f"== {o.analysis.name} {o.analysis.version}  {_fmt_params(o.params)}"
                       f"[{how}; {o.stored.path}]")
            if o.ok:
                click.echo(o.analysis.text(o.stored.result()))
            else:
                click.echo(f"error: {o.stored.error}")
            click.echo("")


def _fmt_params(params: dict[str, Any]) -> str:
    return "".join(f"{k}={v!r} " for k, v in params.items())


# --- cache ------------------------------------------------------------------------------------


@cli.command("cache")
@click.option("--clear", is_flag=True, help="Delete every converted model (they convert again on next load).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_cmd(clear: bool, as_json: bool) -> None:
    """Show (or clear) the converted-weights cache ($WORKBENCH_CACHE_DIR, else XDG cache)."""
    from workbench.models import gguf_cache
    from workbench.paths import cache_dir

    if clear:
        n = gguf_cache.clear()
        click.echo(f"removed {n} converted model(s) from {gguf_cache.converted_root()}")
        return
    entries = gguf_cache.list_entries()
    if as_json:
        click.echo(json.dumps({"cache_dir": str(cache_dir()), "entries": entries}, indent=2))
        return
    click.echo(f"cache: {cache_dir()}")
    if not entries:
        click.echo("  (no converted models)")
    for e in entries:
        click.echo(f"  {e['label'] or '?':28} {e['bytes'] / 1e6:8.1f} MB  {e['status']}  {e['entry']}")


def _plugin_dirs_from_argv(argv: list[str]) -> list[str]:
    """``--plugins-dir`` values given before the sub-command (plugins must be loaded before
    arguments are parsed: they may add sub-commands)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--plugins-dir" and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--plugins-dir="):
            dirs.append(arg.split("=", 1)[1])
    return dirs


def _add_plugin_commands(group: click.Group) -> None:
    """Let plugins add sub-commands (``register_commands``); a taken name is refused."""
    from workbench.plugins import call_each, plugin_manager, report_of

    pm = plugin_manager()
    report = report_of(pm)
    last: list[Any] = [None, dict(group.commands)]

    def settle() -> None:
        plugin, before = last
        if plugin is None:
            return
        for name, cmd in list(group.commands.items()):
            if name in before and before[name] is not cmd:
                group.commands[name] = before[name]
                report.problem(plugin, f"command {name!r} already exists; not replaced")
            elif name not in before:
                report.info(plugin).commands.append(name)

    def kwargs_for(plugin: str) -> dict[str, Any]:
        settle()
        last[:] = [plugin, dict(group.commands)]
        return {"cli": group}

    call_each(pm, "register_commands", kwargs_for)
    settle()


def main(argv: list[str] | None = None) -> None:
    import os

    from workbench.plugins import DIR_ENV, reset_plugin_manager

    args = list(sys.argv[1:] if argv is None else argv)
    dirs = _plugin_dirs_from_argv(args)
    if dirs:
        os.environ[DIR_ENV] = os.pathsep.join([*dirs, *filter(None, [os.environ.get(DIR_ENV)])])
        reset_plugin_manager()
    _add_plugin_commands(cli)
    cli(args, prog_name="workbench")


if __name__ == "__main__":  # pragma: no cover
    main()
