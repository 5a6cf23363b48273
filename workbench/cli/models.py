"""Commands about models: ``models``, ``describe``, ``predict``, ``cache``."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from workbench.cli.base import BOS_CHOICE, cli, load_with_spinner, make_console, model_option
from workbench.errors import UserError
from workbench.hooknames import collapse_layers

# --- models -------------------------------------------------------------------------------------


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_cmd(as_json: bool) -> None:
    """List model sources and whether each can be loaded here (loads nothing)."""
    from workbench.models import DEFAULT_MODEL
    from workbench.models.registry import GENERIC_SOURCES
    from workbench.registries import build_registry

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
    console = make_console()
    console.print(table)
    console.print("[dim]* default model. 'workbench describe NAME' loads one and shows its provenance.[/]")
    for note in notes:
        console.print(f"[red]unavailable[/] {note}", soft_wrap=True)


# --- describe -----------------------------------------------------------------------------------


def hook_patterns(names: list[str]) -> list[tuple[str, int]]:
    """Collapse layer indices: ``blocks.{0..29}.attn.hook_q`` -> (``blocks.*.attn.hook_q``, 30)."""
    counts: dict[str, int] = {}
    for name in names:
        pattern = collapse_layers(name)
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
    model = load_with_spinner(model_name, device, bos)
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
    console = make_console()
    console.print(t)
    if show_hooks:
        for pattern, n in hook_patterns(model.hook_names):
            console.print(f"  {pattern}" + (f"  [dim]x{n}[/]" if n > 1 else ""))


# --- predict / demo -------------------------------------------------------------------------------


def print_prediction(console: Any, pred: Any, show_ids: bool, table: Any = None) -> None:
    """``table`` (a :class:`~workbench.store.tokens_display.TokenTable`: each id's bytes, the
    special tokens) shows byte-level pieces as their bytes and special tokens by name."""
    from rich.table import Table
    from rich.text import Text

    from workbench.store.tokens_display import byte_groups, show_tokens

    shown = show_tokens(pred.token_ids, pred.str_tokens, table)
    top_shown = show_tokens([t.id for t in pred.top], [t.token for t in pred.top], table, sequence=False)
    toks = Text()
    for j, (tid, s) in enumerate(zip(pred.token_ids, shown)):
        if j:
            toks.append("\u2502", style="dim")  # a bar between tokens; spaces shown as a dot
        label = repr(s.label)[1:-1] if s.kind == "text" else s.label
        toks.append(label.replace(" ", "\u00b7") or "\u2400", style="reverse" if j == pred.position else "")
        if show_ids:
            toks.append(f"[{tid}]", style="dim")
    console.print(Text.assemble(("prompt ", "bold"), repr(pred.prompt)))
    console.print(Text.assemble((f"tokens ({len(pred.token_ids)}, bos={pred.bos_policy}) ", "bold"), toks))
    groups = byte_groups(shown)
    if groups and table is not None:  # the characters that byte pieces form together
        console.print(Text.assemble(("characters ", "bold"), " \u00b7 ".join(
            f"{table.text(pred.token_ids[a:b])} = tokens {a}-{b - 1}" for a, b in groups)))
    table = Table(title=f"{pred.kind} at position {pred.position}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("probability", justify="right")
    with_logits = not all(math.isnan(t.logit) for t in pred.top)  # runs store log-probs only
    if with_logits:
        table.add_column("logit", justify="right")
    for rank, (t, s) in enumerate(zip(pred.top, top_shown), 1):
        bar = "\u2588" * max(1, round(t.prob * 20)) if t.prob >= 0.025 else ""
        cells = [str(rank), repr(t.token) if s.kind == "text" else s.label, str(t.id), f"{t.prob:7.2%} {bar}"]
        table.add_row(*cells, *([f"{t.logit:.2f}"] if with_logits else []))
    console.print(table)


@cli.command("predict")
@click.argument("prompts", nargs=-1, required=True)
@model_option
@click.option("-k", "--top-k", "k", default=10, show_default=True, type=click.IntRange(min=1),
              help="How many tokens to show.")
@click.option("--ids", "show_ids", is_flag=True, help="Show token ids beside the tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--chat", is_flag=True,
              help="Each PROMPT is a user's turn, laid out by the model's chat template; the prediction "
                   "opens the assistant's reply.")
def predict_cmd(prompts: tuple[str, ...], model_name: str, device: str, bos: str | None,
                k: int, show_ids: bool, as_json: bool, chat: bool) -> None:
    """Show how each PROMPT is tokenized and the model's top next-token predictions.

    Encoders predict the token at [MASK]; encoder-decoders their first output token. With
    --chat the prompt is what a user says to a chat model (SmolLM2-135M-Instruct is one).
    """
    if chat and bos not in (None, "none"):
        raise UserError(f"--chat lays the prompt out with the chat template, which writes its own special "
                        f"tokens: drop --bos {bos}")
    from workbench.store.tokens_display import TokenTable, show_tokens

    model = load_with_spinner(model_name, device, bos)
    preds = [model.predict(p, k=k, chat=chat) for p in prompts]
    table = TokenTable.from_pieces(model.vocab_bytes(), model.special_ids())
    if as_json:
        out = []
        for p in preds:  # beside each token string, how it is shown (byte pieces as <E4>)
            d = p.to_dict()
            d["display_tokens"] = [t.label for t in show_tokens(p.token_ids, p.str_tokens, table)]
            for t, s in zip(d["top"], show_tokens([t.id for t in p.top], [t.token for t in p.top],
                                                  table, sequence=False)):
                t["display"] = s.label
            out.append(d)
        click.echo(json.dumps({"model": model.info.to_dict(), "predictions": out}, indent=2))
        return
    console = make_console()
    console.print(f"[bold]{model.name}[/] ({model.info.family}, {model.info.n_layers} layers)")
    for pred in preds:
        print_prediction(console, pred, show_ids, table)


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
