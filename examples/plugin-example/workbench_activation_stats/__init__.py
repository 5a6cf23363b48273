"""Summary statistics of stored activations: an example workbench plugin.

For every stored hook matching a pattern (default: the residual stream after each block), over
every token of every prompt: the mean and standard deviation of the values, the mean L2 norm of
the token vectors, and the largest absolute value. Reads the run only; no model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench import Analysis, Param, Result, hookimpl
from workbench.analysis import AnalysisContext
from workbench.hooknames import EMBED_HOOKS, matches

DEFAULT_PATTERN = "blocks.*.hook_resid_post"


def compute(ctx: AnalysisContext) -> Result:
    run = ctx.run
    names = [n for n in run.hooks if matches(ctx.params["pattern"], n)]  # the same globs as --hooks
    if not names:
        raise ValueError(f"no stored hook matches {ctx.params['pattern']!r}")
    rows: list[dict[str, Any]] = []
    for k, name in enumerate(names):
        if run.axes(name)[0] not in ("pos", "enc_pos", "dec_pos"):
            continue  # one vector per token only (attention patterns are per query and key)
        total = total_sq = norm_sum = 0.0
        count = n_tokens = 0
        max_abs = 0.0
        for i in ctx.prompts:
            acts = run.activation(name, i).astype(np.float64)   # (pos, ...)
            flat = acts.reshape(acts.shape[0], -1)
            total += float(flat.sum())
            total_sq += float((flat * flat).sum())
            norm_sum += float(np.linalg.norm(flat, axis=1).sum())
            max_abs = max(max_abs, float(np.abs(flat).max(initial=0.0)))
            count += flat.size
            n_tokens += flat.shape[0]
        mean = total / count
        rows.append({"hook": name, "n_tokens": n_tokens, "mean": mean,
                     "std": float(np.sqrt(max(total_sq / count - mean * mean, 0.0))),
                     "mean_norm": norm_sum / n_tokens, "max_abs": max_abs})
        ctx.progress(k + 1, len(names))
    return Result(data={"pattern": ctx.params["pattern"], "hooks": rows},
                  arrays={"mean_norm": np.array([r["mean_norm"] for r in rows])})


def render(result: Result) -> str:
    lines = [f"{'hook':40} {'tokens':>7} {'mean':>9} {'std':>9} {'mean norm':>10} {'max |x|':>9}"]
    for r in result.data["hooks"]:
        lines.append(f"{r['hook']:40} {r['n_tokens']:>7} {r['mean']:9.4f} {r['std']:9.4f} "
                     f"{r['mean_norm']:10.4f} {r['max_abs']:9.4f}")
    return "\n".join(lines)


ANALYSIS = Analysis(
    name="activation-stats",
    description="mean, standard deviation, mean token norm and largest value of stored activations",
    version="1",
    compute=compute,
    needs=(DEFAULT_PATTERN,),
    params=(Param("pattern", str, DEFAULT_PATTERN, "which stored hooks (a glob, as for --hooks)"),),
    render_text=render,
)


@hookimpl
def register_analyses(register):
    register(ANALYSIS)


def make_view(stored, run):
    """A Textual table of the per-hook statistics (Textual is imported only when it is shown)."""
    from textual.widgets import DataTable

    class StatsTable(DataTable):
        def on_mount(self) -> None:
            self.add_columns("hook", "tokens", "mean", "std", "mean norm", "max |x|")
            for r in stored.data["hooks"]:
                self.add_row(r["hook"], r["n_tokens"], f"{r['mean']:.4f}", f"{r['std']:.4f}",
                             f"{r['mean_norm']:.4f}", f"{r['max_abs']:.4f}")

    return StatsTable()


@hookimpl
def register_views(register):
    from workbench import View

    register(View(name="activation-stats-table", analysis="activation-stats",
                  title="Activation statistics", make=make_view))


@hookimpl
def register_commands(cli):
    import click

    @cli.command("norms")
    @click.argument("run_path", metavar="RUN")
    def norms(run_path):
        """Mean L2 norm of each stored residual-stream vector, per hook (from RUN alone)."""
        import workbench

        with workbench.open_run(run_path) as run:
            for name in run.hooks:
                if name in EMBED_HOOKS or matches("**.hook_resid_*", name):
                    norms = [np.linalg.norm(run.activation(name, i), axis=-1).mean() for i in range(len(run))]
                    click.echo(f"{name:40} {float(np.mean(norms)):10.4f}")
