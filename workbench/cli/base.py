"""The command group, its error handling and the helpers every command shares.

User mistakes (:class:`~workbench.errors.UserError`, bad flags) print one line
(``workbench: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from workbench.errors import UserError
from workbench.version import __version__

BOS_CHOICE = click.Choice(["tokenizer", "prepend", "none"])
SAMPLE_PROMPTS = (
    {"id": "france", "prompt": "The capital of France is", "answer": " Paris", "wrong": " London"},
    {"id": "ioi", "prompt": "When Mary and John went to the store, John gave a drink to",
     "answer": " Mary", "wrong": " John"},
    {"id": "opposite", "prompt": "The opposite of hot is", "answer": " cold", "wrong": " warm"},
    {"id": "emoji", "prompt": "I love pizza 🍕 and", "answer": " pasta"},
)


def hang_ups_interrupt() -> None:
    """SIGTERM and SIGHUP (an SSH session closing) stop this command as Ctrl-C does: a capture
    commits its finished batches and leaves a resumable ``.partial``, an analysis being stored
    leaves no result file. For the commands that write (capture, analyze); the terminal UI keeps
    Textual's own handling."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def fail(message: str, code: int = 2) -> NoReturn:
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
            fail(" ".join(exc.format_message().split()) + hint)
        except UserError as exc:
            fail(str(exc), exc.exit_code)  # 2; 130 for an interrupted capture
        except click.Abort:
            click.echo("workbench: aborted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(141)
        sys.exit(rv if isinstance(rv, int) else 0)


def make_console(stderr: bool = False):  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def load_with_spinner(name: str, device: str, bos: str | None):  # type: ignore[no-untyped-def]
    from workbench.registries import load_model

    console = make_console(stderr=True)
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


def format_params(params: dict[str, Any]) -> str:
    return "".join(f"{k}={v!r} " for k, v in params.items())
