"""``workbench ARGS`` run inside the test process: what ``python -m workbench.cli ARGS`` does,
without starting an interpreter and importing torch again for every call (about 6 s each on the
CI machine). Tests of installation, entry points and signals still start real processes."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def run_cli(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``workbench ARGS`` in this process: its exit status, stdout and stderr, as
    :func:`subprocess.run` with ``capture_output=True, text=True`` returns them. ``env`` entries
    are set for the call only; signal handlers the command installs are put back."""
    from workbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    here = os.getcwd()
    code: Any = 0
    try:
        os.environ.update({"HF_HUB_OFFLINE": "1", **(env or {})})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for s, h in saved_signals.items():
            signal.signal(s, h)
    code = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess(["workbench", *args], code, out.getvalue(), err.getvalue())
