"""A reader during a writer: ``open_run`` and the terminal UI follow a real capture process that
commits every batch of 4 (``--commit-every 0``) of 1,000 short prompts, as fast as it can.

The reader must never fail while the writer appends (an h5py error here is a reader bug), the
committed count must only grow, and every prompt read while the run was written must equal the
finished file's. The tests also check that the reader really overlapped the writer (it read at
several counts short of the end), so a capture that finished before the reader looked fails them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import workbench
from workbench.store.reader import writer_alive
from workbench.tui import make_app

N = 1000
BATCH = 4


def _write_prompts(path: Path) -> list[tuple[str, str]]:
    """1,000 prompts of 1..12 characters (2..13 tokens with tiny-llama's byte tokenizer and BOS),
    each with its own id; returns (id, text) pairs."""
    rng = random.Random(27)
    alphabet = "abcdefghijklmnopqrstuvwxyz    ,.;!?XYZ019"
    prompts = [(f"live-{i}", "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).strip() or "x")
               for i in range(N)]
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": pid, "prompt": text}) + "\n" for pid, text in prompts)
    return prompts


def _start_capture(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, list[tuple[str, str]]]:
    """A real capture process: tiny-llama, the residual stream, a commit after every batch."""
    prompts_file = tmp_path / "prompts.jsonl"
    prompts = _write_prompts(prompts_file)
    out = tmp_path / "run.h5"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "workbench.cli", "capture", "-m", "tiny-llama", "--prompts",
           str(prompts_file), "-o", str(out), "--batch-size", str(BATCH), "--commit-every", "0",
           "--hooks", "residual"]
    with open(tmp_path / "capture.err", "wb") as err:  # a file: a full pipe would stall the writer
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    return proc, out, prompts


def _wait_until_writing(out: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> Path:
    """The partial file, once the capture holds the run's lock and has created it."""
    partial = out.with_name(out.name + ".partial")
    deadline = time.monotonic() + timeout
    while not (partial.exists() and writer_alive(out)):
        assert proc.poll() is None, f"the capture ended (exit {proc.returncode}) before it was followed"
        assert time.monotonic() < deadline, "the capture did not start writing"
        time.sleep(0.01)
    return partial


def _finish(proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, (tmp_path / "capture.err").read_text()


def test_open_run_follows_a_fast_capture(tmp_path):
    proc, out, prompts = _start_capture(tmp_path)
    try:
        _wait_until_writing(out, proc)
        run = workbench.open_run(out)  # finds run.h5.partial
        assert run.is_partial
        hooks = sorted(run.hooks)  # every stored tensor (aliases name the same data)
        assert hooks and set(hooks) <= set(run.hook_names)
        counts: list[int] = []
        statuses: set[str] = set()
        read_at: list[int] = []  # the committed count at each look that found new prompts
        seen: dict[int, tuple[str, str, np.ndarray, dict[str, np.ndarray]]] = {}
        deadline = time.monotonic() + 120
        while True:
            finished = proc.poll() is not None  # looked at before the refresh: the last one sees all
            n = run.refresh()
            assert n == len(run)
            counts.append(n)
            statuses.add(run.status)
            if n > len(seen):
                read_at.append(n)
            for i in range(len(seen), n):
                seen[i] = (run.prompt(i), run.prompt_id(i), run.tokens(i).copy(),
                           {h: run.activation(h, i).copy() for h in hooks})
            if finished:
                break
            assert time.monotonic() < deadline, f"the capture has not finished: {len(run)} committed"
            time.sleep(0.003)
        # The run object that followed the capture tells its end (not "interrupted"), and still
        # describes itself although its file now has its final name.
        final_status, summary = run.status, run.summary(n_prompts=1)
        run.close()
    finally:
        _finish(proc, tmp_path)

    assert counts == sorted(counts), "the committed count went down"
    assert counts[-1] == N and len(seen) == N
    during = sorted({c for c in read_at if c < N})
    assert len(during) >= 3, f"the reader barely overlapped the writer: read at {read_at}"
    assert all(c % BATCH == 0 for c in counts), "a commit covers whole batches"
    assert statuses <= {"in progress", "complete"}, statuses
    assert final_status == summary["status"] == "complete" and summary["prompts"] == N
    assert summary["bytes"] == out.stat().st_size
    assert not out.with_name("run.h5.partial").exists()

    with workbench.open_run(out) as final:
        assert final.status == "complete" and len(final) == N
        for i, (text, pid, tokens, acts) in seen.items():
            assert (pid, text) == (final.prompt_id(i), final.prompt(i)) == prompts[i], i
            assert np.array_equal(tokens, final.tokens(i)), i
            for h, values in acts.items():
                assert values.dtype == np.float32 and values.shape[0] == len(tokens)
                assert np.array_equal(values, final.activation(h, i)), (h, i)
    print(f"\nfollowed: {len(counts)} looks, read at {len(during)} counts below {N}")


def _drive(app, steps):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            return await steps(pilot)

    return asyncio.run(main())


def test_the_ui_follows_a_fast_capture(tmp_path):
    proc, out, prompts = _start_capture(tmp_path)
    try:
        partial = _wait_until_writing(out, proc)
        app = make_app([str(partial)], view="residual", poll=0.1)
        notes: list[tuple[str, str]] = []
        notify = app.notify

        def recording(message, *args, **kwargs):  # type: ignore[no-untyped-def]
            notes.append((str(kwargs.get("severity", "information")), str(message)))
            return notify(message, *args, **kwargs)

        app.notify = recording  # type: ignore[method-assign]

        async def steps(pilot):  # type: ignore[no-untyped-def]
            from textual.widgets import OptionList

            counts, statuses = [], []
            end = time.monotonic() + 120
            while time.monotonic() < end:
                await pilot.pause(0.1)
                if app.return_code is not None:
                    break  # the app failed: run_test raises its error
                run = app.active_run
                counts.append(app._listed)
                statuses.append(run.status)
                if len(run):  # the newest committed prompt in focus: the views read it
                    app.select_prompt(len(run) - 1)
                if app.sub_title == f"{N}/{N} prompts" and not run.is_partial:
                    break  # the header says complete, and the run was reopened as run.h5
            listing = app.query_one("#prompts", OptionList)
            labels = [listing.get_option_at_index(k).prompt.plain for k in range(listing.option_count)]
            return counts, statuses, app.sub_title, labels, app.focus_state.prompt, app.active_run.path

        counts, statuses, sub, labels, focused, shown = _drive(app, steps)
    finally:
        _finish(proc, tmp_path)

    assert counts == sorted(counts), "the committed count went down"
    assert len({c for c in counts if 0 < c < N}) >= 3, f"the UI barely overlapped the writer: {counts}"
    assert counts[-1] == N and statuses[-1] == "complete" and sub == f"{N}/{N} prompts"
    assert set(statuses) <= {"in progress", "complete"}, set(statuses)
    assert not [n for n in notes if n[0] == "error"], notes
    assert focused == N - 1 and shown == out
    # Every prompt listed while the run was written, once each, as the finished file has it.
    with workbench.open_run(out) as final:
        assert [t for _, t in prompts] == final.prompts
        assert labels == [f"{i:>3} {t}" for i, t in enumerate(final.prompts)]
    print(f"\nthe UI saw {len(set(counts))} counts")


def test_a_run_opened_again_under_its_final_name_sees_every_prompt(tmp_path):
    """A program that still holds the run it followed as ``NAME.h5.partial`` and opens ``NAME.h5``
    once the capture renamed it gets the whole run: HDF5 shares the one open file between the two
    handles, with the first one's cached extents, which the second refreshes."""
    out = tmp_path / "live.h5"
    writer = subprocess.Popen([sys.executable, "-m", "workbench.store.synthetic", str(out),
                               "--prompts", "10", "--delay", "0.3"])
    partial = out.with_name("live.h5.partial")
    deadline = time.monotonic() + 60
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with workbench.open_run(partial) as followed:
        assert writer.wait(timeout=60) == 0
        assert len(followed) < 10  # opened before the end, not refreshed since
        with workbench.open_run(out) as final:
            assert len(final) == 10
            texts = [final.prompt(i) for i in range(10)]
        assert followed.refresh() == 10 and followed.prompts == texts  # the first handle still reads
    with workbench.open_run(out) as alone:
        assert texts == alone.prompts
