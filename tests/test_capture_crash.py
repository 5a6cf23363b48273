"""Nothing lost: a real capture process is killed with SIGKILL at random moments and resumed,
and a reader follows a capture while it is being written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import workbench
from tests.test_capture import random_prompts
from workbench.errors import UserError
from workbench.store.reader import writer_alive

HOOKS = ["residual", "attention", "mlp"]
BATCH = 4


def _write_prompts(path: Path, n: int, seed: int) -> list[str]:
    prompts = random_prompts(n, seed=seed, lo=2, hi=120)
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"q{i}", "prompt": p, "answer": " a"}) + "\n"
                     for i, p in enumerate(prompts))
    return prompts


def _capture_cmd(prompts_file: Path, out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "workbench.cli", "capture", "-m", "tiny-llama", "--prompts",
           str(prompts_file), "-o", str(out), "--batch-size", str(BATCH)]
    for h in HOOKS:
        cmd += ["--hooks", h]
    return [*cmd, *extra]


def _capture_process(prompts_file: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_capture_cmd(prompts_file, out, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    """Wait until ``proc`` is writing the run ``path`` names (it holds the run's lock and the
    partial file exists); False if it finished first."""
    final = path.with_name(path.name.removesuffix(".partial"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and writer_alive(final):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError(path)


def assert_prompts_equal(run, ref, indices) -> None:
    for i in indices:
        assert run.prompt_id(i) == ref.prompt_id(i) and run.prompt(i) == ref.prompt(i)
        assert run.metadata(i) == ref.metadata(i)
        np.testing.assert_array_equal(run.tokens(i), ref.tokens(i))
        assert run.str_tokens(i) == ref.str_tokens(i)
        np.testing.assert_array_equal(run.loss(i), ref.loss(i))
        for a, b in zip(run.top_k(i), ref.top_k(i)):
            np.testing.assert_array_equal(a, b)
        for name in ref.hooks:
            np.testing.assert_array_equal(run.activation(name, i), ref.activation(name, i),
                                          err_msg=f"{name}[{i}]")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("crash")
    prompts_file = folder / "prompts.jsonl"
    _write_prompts(prompts_file, 240, seed=11)
    out = folder / "reference.h5"
    workbench.capture(tiny_models["tiny-llama"], prompts_file, hooks=HOOKS, out=out,
                      batch_size=BATCH, progress=False)
    return prompts_file, workbench.open_run(out)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    prompts_file, ref = reference
    out = tmp_path / "run.h5"
    partial = tmp_path / "run.h5.partial"
    rng = random.Random(1234)
    kills, committed_seen = 0, []
    proc = _capture_process(prompts_file, out)
    for attempt in range(6):
        if attempt:
            proc = _capture_process(prompts_file, out, "--resume")
        if not _wait_for(partial, proc):
            break  # finished before we could kill it
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        assert not out.exists()
        # Every prompt committed before the kill is readable, with exact values.
        with workbench.open_run(out) as run:  # finds run.h5.partial
            assert run.status == "interrupted"
            n = len(run)
            assert n % BATCH == 0  # whole batches are committed
            assert_prompts_equal(run, ref, range(n))
            committed_seen.append(n)
    else:
        proc = _capture_process(prompts_file, out, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert kills >= 3, f"only {kills} kills landed mid-capture"
    assert not partial.exists() and not (tmp_path / "run.h5.lock").exists()
    with workbench.open_run(out) as run:
        assert run.status == "complete"
        assert len(run) == len(ref)
        assert run.prompt_ids == ref.prompt_ids  # no duplicates, no reordering
        assert_prompts_equal(run, ref, range(len(ref)))
        resumed = [r["at_prompt"] for r in run.settings["resumed"]]
        # Which resumes left a record depends on timing: a resume killed before its copy of the
        # committed prompts replaced the killed file leaves none. What holds regardless: each
        # record is where some kill left the run, in order, and the resume that finished the run
        # started where the last kill left it.
        assert resumed == sorted(resumed) and set(resumed) <= set(committed_seen)
        assert resumed and resumed[-1] == committed_seen[-1]
    assert committed_seen == sorted(committed_seen)


def test_resume_refuses_different_settings_or_prompts(tmp_path, reference, tiny_models):
    prompts_file, ref = reference
    out = tmp_path / "run.h5"
    proc = _capture_process(prompts_file, out)
    assert _wait_for(tmp_path / "run.h5.partial", proc)
    while len(workbench.open_run(out)) < BATCH and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    llama = tiny_models["tiny-llama"]
    with pytest.raises(UserError, match="setting 'batch_size' differs"):
        workbench.capture(llama, prompts_file, hooks=HOOKS, out=out, batch_size=BATCH + 1,
                          resume=True, progress=False)
    with pytest.raises(UserError, match="setting 'hooks' differs"):
        workbench.capture(llama, prompts_file, hooks=["residual"], out=out, batch_size=BATCH,
                          resume=True, progress=False)
    shuffled = tmp_path / "other.jsonl"
    lines = prompts_file.read_text().splitlines()
    shuffled.write_text("\n".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(UserError, match="prompt 0 .* is not the one already captured"):
        workbench.capture(llama, shuffled, hooks=HOOKS, out=out, batch_size=BATCH, resume=True,
                          progress=False)
    # the interrupted run is still intact and resumable
    result = workbench.capture(llama, prompts_file, hooks=HOOKS, out=out, batch_size=BATCH,
                               resume=True, progress=False)
    assert result.resumed_from >= BATCH
    assert_prompts_equal(workbench.open_run(out), ref, range(len(ref)))


def test_a_reader_follows_a_capture_in_progress(tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts = _write_prompts(prompts_file, 600, seed=5)
    out = tmp_path / "live.h5"
    proc = _capture_process(prompts_file, out, "--commit-every", "0")  # every batch
    assert _wait_for(tmp_path / "live.h5.partial", proc)
    run = workbench.open_run(tmp_path / "live.h5.partial")
    counts, statuses = [], set()
    while proc.poll() is None:
        counts.append(run.refresh())
        statuses.add(run.status)
        if counts[-1]:
            i = counts[-1] - 1  # the newest committed prompt is complete and readable
            assert run.prompt(i) == prompts[i]
            assert run.activation("blocks.1.hook_resid_post", i).shape == (run.n_tokens(i), 64)
        time.sleep(0.05)
    assert proc.returncode == 0
    run.close()
    assert counts == sorted(counts)
    middle = {c for c in counts if 0 < c < len(prompts)}
    assert len(middle) >= 3, f"saw only {sorted(set(counts))}"
    assert "in progress" in statuses
    with workbench.open_run(out) as final:
        assert final.status == "complete" and len(final) == len(prompts)


def test_two_writers_never_share_a_run(tmp_path, reference):
    prompts_file, _ = reference
    out = tmp_path / "run.h5"
    first = _capture_process(prompts_file, out)
    assert _wait_for(tmp_path / "run.h5.partial", first)
    second = subprocess.run(_capture_cmd(prompts_file, out, "--resume"), capture_output=True,
                            text=True, check=False)
    finished_first = first.poll() is not None
    first.wait(timeout=300)
    if not finished_first:
        assert second.returncode == 2
        assert f"another capture (pid {first.pid}) is writing" in second.stderr
    assert first.returncode == 0


def test_a_killed_captures_lock_is_taken_over_with_a_message(tmp_path, reference):
    prompts_file, ref = reference
    out = tmp_path / "run.h5"
    first = _capture_process(prompts_file, out)
    assert _wait_for(tmp_path / "run.h5.partial", first)
    first.kill()
    first.wait()
    assert (tmp_path / "run.h5.lock").read_text().strip() == str(first.pid)  # left behind
    second = subprocess.run(_capture_cmd(prompts_file, out, "--resume"), capture_output=True, text=True,
                            check=False, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"(pid {first.pid}) is gone; taking its lock over" in second.stderr
    with workbench.open_run(out) as run:
        assert run.status == "complete" and len(run) == len(ref)


def test_two_analyses_of_the_same_result_at_once_leave_one_whole_file(tmp_path):
    from workbench.store.synthetic import write_synthetic_run

    path = write_synthetic_run(tmp_path / "r.h5", n_prompts=40, n_layers=2)
    cmd = [sys.executable, "-m", "workbench.cli", "analyze", str(path), "next-token", "attends-to", "--force"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    from workbench.store.results import list_results

    with workbench.open_run(path) as run:
        files = sorted(p.name for p in (tmp_path / "r.h5.results").iterdir())
        assert not [f for f in files if f.startswith(".")]  # no temporary left
        done = list_results(run)
        assert sorted(r.analysis for r in done) == ["attends-to", "next-token"] and all(r.ok for r in done)
        assert all(r.result().data is not None for r in done)  # each file whole


def test_ctrl_c_commits_every_finished_batch_and_resume_completes_the_run(tmp_path, reference,
                                                                         monkeypatch, tiny_models):
    """Batches are committed together (here: the first at once, then not for an hour); Ctrl-C
    during the sixth batch still commits the five finished ones, with exact values, and --resume
    continues from there."""
    from workbench.capturing import entry as runner

    prompts_file, ref = reference
    out = tmp_path / "run.h5"
    real_run_batch = runner.run_batch
    calls = []

    def interrupted(plan, indices, on_act=None):
        calls.append(indices[0])
        if len(calls) == 6:
            # part of the batch's activations are handed to the writer, then Ctrl-C
            on_act(plan.hooks.specs[0].name, np.zeros((3, *plan.hooks.specs[0].feature_shape), np.float32))
            raise KeyboardInterrupt
        return real_run_batch(plan, indices, on_act=on_act)

    monkeypatch.setattr(runner, "run_batch", interrupted)
    llama = tiny_models["tiny-llama"]
    with pytest.raises(runner.CaptureInterrupted, match="20 prompts are committed"):
        workbench.capture(llama, prompts_file, hooks=HOOKS, out=out, batch_size=BATCH,
                          commit_seconds=3600, progress=False)
    with workbench.open_run(out) as run:
        assert run.status == "interrupted" and len(run) == 5 * BATCH
        assert_prompts_equal(run, ref, range(len(run)))
    monkeypatch.setattr(runner, "run_batch", real_run_batch)
    result = workbench.capture(llama, prompts_file, hooks=HOOKS, out=out, batch_size=BATCH,
                               resume=True, commit_seconds=3600, progress=False)
    assert result.resumed_from == 5 * BATCH
    with workbench.open_run(out) as run:
        assert run.status == "complete" and len(run) == len(ref)
        assert_prompts_equal(run, ref, range(len(ref)))


def test_a_full_disk_mid_capture_is_one_line_and_resume_completes_the_run(tmp_path, reference,
                                                                          monkeypatch, tiny_models):
    """Fault injection (a real full filesystem needs a mount): the writer's 31st activation write
    fails with ENOSPC as h5py reports it. The capture ends with one UserError line naming the
    committed prompts, which read back exactly; --resume after 'freeing space' equals an
    uninterrupted capture."""
    import errno

    from workbench.store.writer import RunWriter

    prompts_file, ref = reference
    out = tmp_path / "run.h5"
    real_write = RunWriter.write_act
    calls = []

    def filling(self, name, values):
        calls.append(name)
        if len(calls) == 31:
            raise OSError(errno.ENOSPC, "[Errno 28] Can't write unprocessed chunk data")
        return real_write(self, name, values)

    monkeypatch.setattr(RunWriter, "write_act", filling)
    _fill_then_resume(tiny_models["tiny-llama"], prompts_file, ref, out,
                      free_space=lambda: monkeypatch.setattr(RunWriter, "write_act", real_write))
    assert not (tmp_path / "run.h5.lock").exists()


def _fill_then_resume(llama, prompts_file, ref, out, free_space) -> None:  # type: ignore[no-untyped-def]
    """Capture until the disk is full: one line naming the committed prompts, which read back
    exactly; then ``free_space()`` and ``--resume``: equal to an uninterrupted capture."""
    with pytest.raises(UserError, match=r"no space left on .*: \d+ prompts committed in run.h5.partial; "
                                        "resume with --resume after freeing space") as info:
        workbench.capture(llama, prompts_file, hooks=HOOKS, out=out, batch_size=BATCH, commit_seconds=0,
                          progress=False)
    assert "\n" not in str(info.value)
    with workbench.open_run(out) as run:
        n = len(run)
        assert run.status == "interrupted" and 0 < n < len(ref) and f" {n} prompts" in str(info.value)
        assert_prompts_equal(run, ref, range(n))
    free_space()
    result = workbench.capture(llama, prompts_file, hooks=HOOKS, out=out, batch_size=BATCH,
                               resume=True, progress=False)
    assert result.resumed_from == n
    with workbench.open_run(out) as run:
        assert run.status == "complete" and len(run) == len(ref)
        assert_prompts_equal(run, ref, range(len(ref)))


def _mount_tmpfs(folder: Path, size: int) -> bool:
    """Mount a tmpfs of ``size`` bytes on ``folder`` (root only, where mounts are allowed)."""
    if os.geteuid() != 0 or not Path("/proc/mounts").exists():
        return False
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_a_really_full_filesystem_mid_capture_then_resume(tmp_path, reference, tiny_models):
    """The same on a real full filesystem: a tmpfs half the run's size, mounted by the test (as
    root; skipped where mounts are not allowed), grown after the failure as a user frees space."""
    prompts_file, ref = reference
    small = tmp_path / "small"
    if not _mount_tmpfs(small, ref.size_bytes() // 2):
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        _fill_then_resume(tiny_models["tiny-llama"], prompts_file, ref, small / "run.h5", free_space=lambda: (
            subprocess.run(["mount", "-o", f"remount,size={4 * ref.size_bytes()}", str(small)], check=True)))
        assert sorted(p.name for p in small.iterdir()) == ["run.h5"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_capture_as_ctrl_c_does(tmp_path, reference, tiny_models, sig):
    """A hang-up (SSH closing) or a polite kill: the finished batches are committed, the command
    says how to continue and exits 130, and --resume completes the run equal to an uninterrupted
    one."""
    prompts_file, ref = reference
    out = tmp_path / "run.h5"
    proc = _capture_process(prompts_file, out, "--commit-every", "0")
    assert _wait_for(tmp_path / "run.h5.partial", proc)
    with workbench.open_run(out) as run:  # wait for a first commit, so something is kept
        deadline = time.monotonic() + 60
        while run.refresh() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"prompts are committed" in err and b"--resume" in err and b"Traceback" not in err
    with workbench.open_run(out) as run:
        n = len(run)
        assert run.status == "interrupted" and 0 < n < len(ref)
        assert_prompts_equal(run, ref, range(n))
    workbench.capture(tiny_models["tiny-llama"], prompts_file, hooks=HOOKS, out=out, batch_size=BATCH,
                      resume=True, progress=False)
    with workbench.open_run(out) as run:
        assert run.status == "complete" and len(run) == len(ref)
        assert_prompts_equal(run, ref, range(len(ref)))


def test_an_unopenable_partial_is_kept_aside_and_the_capture_starts_again(tmp_path, reference, tiny_models):
    prompts_file, ref = reference
    out = tmp_path / "run.h5"
    (tmp_path / "run.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a torn header
    workbench.capture(tiny_models["tiny-llama"], prompts_file, hooks=HOOKS, out=out, batch_size=BATCH,
                      resume=True, progress=False)
    [aside] = [p for p in tmp_path.iterdir() if ".unreadable-" in p.name]
    assert aside.read_bytes().startswith(b"\x89HDF")
    with workbench.open_run(out) as run:
        assert run.status == "complete" and len(run) == len(ref)
        assert_prompts_equal(run, ref, range(len(ref)))
