"""``workbench ARGS`` run inside the test process: what ``python -m workbench.cli ARGS`` does,
without starting an interpreter and importing torch again for every call (about 6 s each on the
CI machine). Tests of installation, entry points and signals still start real processes."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any


def run_cli(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``workbench ARGS`` in this process: its exit status, stdout and stderr, as
    :func:`subprocess.run` with ``capture_output=True, text=True`` returns them. ``env`` entries
    are set for the call only; the environment, signal handlers and the command group are put back
    as they were (and the plugin manager reset if the call loaded a plugins folder)."""
    from workbench.cli import cli, main
    from workbench.plugins import DIR_ENV, reset_plugin_manager

    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    saved_commands = dict(cli.commands)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    here = os.getcwd()
    code: Any = 0
    try:
        os.environ.update({"HF_HUB_OFFLINE": "1", **(env or {})})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # shown on the captured stderr, as a new process would
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
        plugins_changed = os.environ.get(DIR_ENV) != saved_env.get(DIR_ENV)
        os.environ.clear()
        os.environ.update(saved_env)
        cli.commands.clear()
        cli.commands.update(saved_commands)  # a --plugins-dir plugin's commands go with it
        if plugins_changed:
            reset_plugin_manager()
        for s, h in saved_signals.items():
            signal.signal(s, h)
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        err.write(code + "\n")
    code = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess(["workbench", *args], code, out.getvalue(), err.getvalue())
