"""Sharded capture on a local, loopback-only Ray runtime (issue 24): units, the virtual-dataset
index and its checks, equality with a single-process capture, a worker killed with SIGKILL, a
unit that fails twice, the driver killed and resumed, the listening sockets."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from workbench.capturing.sharded import RAY_ENV, ray_runtime
from workbench.errors import UserError
from workbench.store import open_run
from workbench.store import schema as S
from workbench.store.files import partial_path
from workbench.store.shards import shards_dir, split_units, unit_file

pytest.importorskip("ray")

MODEL = "tiny-gpt2"
HOOKS = ["residual", "blocks.*.attn.hook_pattern"]
PROMPTS = [f"Prompt number {i} says something {'rather ' * (i % 7)}different each time." for i in range(24)]


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a run file except the JSON documents, read with plain h5py (through the
    virtual datasets for an index)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) and not n.startswith("meta/") else None)
    return out


def assert_bit_equal(a: Path, b: Path) -> None:
    da, db = datasets(a), datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].dtype == db[name].dtype, name
        assert da[name].shape == db[name].shape, name
        assert da[name].tobytes() == db[name].tobytes(), name  # bit for bit, NaNs included


# --- units (no Ray) ----------------------------------------------------------------------------------


def test_units_are_whole_batches_balanced_by_tokens() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 200, size=203).tolist()
    units = split_units(counts, batch_size=4, n_units=8)
    assert len(units) == 8
    assert units[0].start == 0 and units[-1].stop == 203
    for a, b in itertools.pairwise(units):
        assert a.stop == b.start  # contiguous, in prompt order
    assert all(u.start % 4 == 0 for u in units)  # whole batches: the single-process batches
    assert sum(u.tokens for u in units) == sum(counts)
    ideal = sum(counts) / 8
    assert max(abs(u.tokens - ideal) for u in units) < 4 * 200  # within one batch of the ideal
    # more units asked than batches: one batch each
    assert [(u.start, u.stop) for u in split_units([1] * 5, 2, 10)] == [(0, 2), (2, 4), (4, 5)]


def _copy(sharded: Path, to: Path) -> Path:
    to.mkdir()
    shutil.copy(sharded, to / sharded.name)
    shutil.copytree(shards_dir(sharded), shards_dir(to / sharded.name))
    return to / sharded.name


# --- a local Ray runtime shared by the module ---------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    with ray_runtime(None, num_cpus=2, num_gpus=0) as ray:
        yield ray


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """The same prompts captured in one process and on 2 workers (8 units of 3 prompts)."""
    import workbench

    folder = tmp_path_factory.mktemp("sharded")
    one = folder / "one.h5"
    workbench.capture(MODEL, PROMPTS, hooks=HOOKS, out=one, batch_size=3, progress=False)
    sharded = folder / "sharded.h5"
    result = workbench.capture(MODEL, PROMPTS, hooks=HOOKS, out=sharded, batch_size=3, workers=2,
                               progress=False)
    assert result.n_prompts == len(PROMPTS)
    return one, sharded


def _listening_sockets_of(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket the processes ``pids`` hold, from /proc."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = parts[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if width == 8:
                ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[::-1])
            else:
                ip = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                ip = ip.ipv4_mapped or ip
            found.append((str(ip), int(port_hex, 16)))
    return found


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def test_local_ray_listens_on_loopback_only(ray_local) -> None:
    for key, value in RAY_ENV.items():
        assert os.environ[key] == value
    pids = _descendants(os.getpid())
    sockets = _listening_sockets_of(pids | {os.getpid()})
    assert len(sockets) >= 3, sockets  # GCS, raylet, object manager, workers...
    assert [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback] == []


def test_sharded_run_reads_as_one_bit_for_bit(runs) -> None:
    one, sharded = runs
    assert len(list(shards_dir(sharded).glob("unit-*.h5"))) == 8
    with h5py.File(sharded, "r") as f:
        assert f[f"{S.ACTS}/blocks.0.hook_resid_post"].is_virtual
    assert_bit_equal(one, sharded)
    with open_run(one) as a, open_run(sharded) as b:
        assert len(b.shards) == 8 and b.status == "complete"
        assert a.prompt_ids == b.prompt_ids and a.prompts == b.prompts
        for i in (0, 11, 23):
            for hook in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"):
                assert np.array_equal(a.activation(hook, i), b.activation(hook, i))
            assert a.str_tokens(i) == b.str_tokens(i)
        hook = "blocks.1.hook_resid_post"
        assert np.array_equal(a.rows(hook), b.rows(hook))  # every row, across all 8 units
        assert np.array_equal(b.rows(hook, 2, 20),
                              np.concatenate([a.activation(hook, i) for i in range(2, 20)]))
        assert b.size_bytes() > sum(p.stat().st_size for p in shards_dir(sharded).glob("unit-*.h5"))


def test_analyses_and_the_transformerlens_cache_read_a_sharded_run_as_one(runs, tmp_path) -> None:
    import workbench
    from workbench.registries import analyze, build_analyses

    one, sharded = runs
    roles = build_analyses().get("head-roles")
    outcomes = []
    for path in (one, sharded):
        run = _copy(path, tmp_path / path.stem) if path == sharded else path
        with open_run(run) as r:
            (outcome,) = analyze(r, [roles], {"head-roles": {"induction": False}})
            assert outcome.ok, outcome.stored.meta
            outcomes.append(json.dumps(outcome.stored.data, sort_keys=True,
                                       default=lambda o: np.asarray(o).tolist()))
            cache = workbench.activation_cache(r, 7)
            outcomes.append({k: cache[k].numpy().tobytes() for k in ("blocks.1.hook_resid_post",
                                                                       "blocks.0.attn.hook_pattern")})
    assert outcomes[0] == outcomes[2] and outcomes[1] == outcomes[3]


@pytest.mark.parametrize(("model", "extra"), [
    ("tiny-t5", {}),  # two token streams, cross-attention, targets
    ("tiny-bert", {}),  # an encoder: attention mask, masked-LM outputs
    ("tiny-gpt2", {"generate": 4, "seed": 11}),  # each prompt's seed follows its capture-wide index
])
def test_every_family_and_generation_shard_bit_for_bit(ray_local, tmp_path, model, extra) -> None:
    import workbench

    items = [{"id": f"q{i}", "prompt": p, "target": f"answer {i}"} for i, p in enumerate(PROMPTS[:10])]
    hooks = ["residual", "attention"]
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    workbench.capture(model, items, hooks=hooks, out=one, batch_size=2, progress=False, **extra)
    workbench.capture(model, items, hooks=hooks, out=two, batch_size=2, workers=2, units=3,
                      progress=False, **extra)
    assert_bit_equal(one, two)
    with open_run(one) as a, open_run(two) as b:
        assert a.streams == b.streams and len(b.shards) == 3
        for i in range(10):
            for stream in a.streams:
                assert a.str_tokens(i, stream) == b.str_tokens(i, stream)


def test_sharded_run_moves_with_its_folder(runs, tmp_path) -> None:
    _, sharded = runs
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(sharded, moved / sharded.name)
    shutil.copytree(shards_dir(sharded), shards_dir(moved / sharded.name))
    with open_run(moved / sharded.name) as run:
        assert np.array_equal(run.activation("blocks.1.hook_resid_post", 20),
                              open_run(sharded).activation("blocks.1.hook_resid_post", 20))


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian's hdf5-tools) is not installed")
def test_h5dump_reads_the_index(runs) -> None:
    _, sharded = runs
    head = subprocess.run(["h5dump", "-H", str(sharded)], capture_output=True, text=True, check=False, cwd=sharded.parent)
    assert head.returncode == 0, head.stderr
    assert "blocks.1.hook_resid_post" in head.stdout
    data = subprocess.run(["h5dump", "-d", "/tokens/ids", str(sharded)], capture_output=True, text=True, check=False,
                          cwd="/")
    assert data.returncode == 0, data.stderr
    with open_run(sharded) as run:
        last = int(run.tokens(23)[-1])
    assert f"{last}\n" in data.stdout.replace(" ", "").replace(",", "\n") or str(last) in data.stdout




@pytest.mark.parametrize("damage", ["missing", "truncated", "short", "swapped", "foreign"])
def test_a_bad_shard_is_refused_with_one_line(runs, tmp_path, damage) -> None:
    one, sharded = runs
    run = _copy(sharded, tmp_path / "copy")
    target = unit_file(run, 3)
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        with open(target, "rb+") as fh:
            fh.truncate(target.stat().st_size // 2)
    elif damage == "short":
        # an ordinary run of the unit's first prompt only, claiming to be unit 3 of this run
        with h5py.File(target, "r") as f:
            attrs = dict(f.attrs)
        import workbench

        workbench.capture(MODEL, PROMPTS[9:10], hooks=HOOKS, out=tmp_path / "short.h5", progress=False)
        with h5py.File(tmp_path / "short.h5", "r+") as f:
            for k in ("shard_run_id", "shard_unit"):
                f.attrs[k] = attrs[k]
        shutil.copy(tmp_path / "short.h5", target)
    elif damage == "swapped":
        other = unit_file(run, 4)
        tmp = target.with_suffix(".tmp")
        target.rename(tmp)
        other.rename(target)
        tmp.rename(other)
    else:  # a unit of another capture of the same prompts, at the same place
        shutil.copy(one, target)
    with pytest.raises(UserError) as err:
        open_run(run)
    message = str(err.value)
    assert "\n" not in message and "unit-00003.h5" in message
    expected = {"missing": "is missing", "truncated": "truncated", "short": "is short",
                "swapped": "is foreign", "foreign": "foreign"}[damage]
    assert expected in message, message


def test_different_batches_agree_within_the_batching_tolerance(ray_local, runs, tmp_path) -> None:
    import workbench

    one, _ = runs
    other = tmp_path / "b4.h5"
    workbench.capture(MODEL, PROMPTS, hooks=HOOKS, out=other, batch_size=4, workers=2, units=3,
                      progress=False)
    with open_run(one) as a, open_run(other) as b:
        assert len(b.shards) == 3
        assert a.prompt_ids == b.prompt_ids
        for i in range(len(PROMPTS)):
            for hook in ("blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"):
                x, y = a.activation(hook, i), b.activation(hook, i)
                assert x.shape == y.shape
                assert np.max(np.abs(x - y)) <= 5e-5 * max(1.0, float(np.max(np.abs(x))))


def _kill_first_worker_mid_unit(run: Path, n_units: int, unit_prompts: int, stop: threading.Event) -> dict:
    """Poll the unit files; SIGKILL the process writing the first partial unit that has
    committed some but not all of its prompts. Returns what was killed."""
    while not stop.is_set():
        for u in range(n_units):
            partial = partial_path(unit_file(run, u))
            lock = unit_file(run, u).with_name(unit_file(run, u).name + ".lock")
            try:
                with h5py.File(partial, "r", swmr=True) as f:
                    committed = int(f[S.TOKEN_OFFSETS].shape[0]) - 1
                pid = int(lock.read_text().strip())
            except (OSError, ValueError, KeyError):
                continue
            if 0 < committed < unit_prompts:
                os.kill(pid, signal.SIGKILL)
                return {"unit": u, "committed": committed, "pid": pid}
        time.sleep(0.005)
    return {}


def test_a_worker_killed_mid_unit_loses_and_duplicates_nothing(ray_local, runs, tmp_path) -> None:
    import workbench

    one, _ = runs
    out = tmp_path / "killed.h5"
    prompts = PROMPTS * 4  # 96 prompts, 2 units of 48: long enough to be caught mid-unit
    ids = [f"q{i}" for i in range(len(prompts))]
    items = [{"id": i, "prompt": p} for i, p in zip(ids, prompts, strict=True)]
    stop = threading.Event()
    killed: dict = {}

    def killer() -> None:
        killed.update(_kill_first_worker_mid_unit(out, 2, 48, stop))

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        workbench.capture(MODEL, items, hooks=HOOKS, out=out, batch_size=3, workers=2, units=2,
                          commit_seconds=0, progress=False)
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was caught mid-unit"
    with open_run(out) as run:
        assert run.prompt_ids == ids  # every prompt once, in order
        unit = unit_file(out, killed["unit"])
        with h5py.File(unit, "r") as f:
            resumed = json.loads(f[S.META_SETTINGS][()].decode())["resumed"]
        assert resumed and resumed[0]["at_prompt"] >= killed["committed"]
        with open_run(one) as ref:
            for i in (0, 30, 47, 48, 95):
                j = i % len(PROMPTS)
                assert np.array_equal(run.activation("blocks.1.hook_resid_post", i),
                                      ref.activation("blocks.1.hook_resid_post", j))


POISON = "#"  # a character no other prompt has (tiny-gpt2 tokenizes characters)


def poisoned_tiny_gpt2():  # pragma: no cover - runs in the Ray workers
    """tiny-gpt2 whose forward pass fails on any sequence holding the poison word's first token."""
    from workbench.registries import load_model

    model = load_model(MODEL)
    bad = model.tokenizer(POISON, add_special_tokens=False)["input_ids"][0]

    def check(module, args, kwargs):
        tokens = args[0] if args else kwargs.get("input")
        if hasattr(tokens, "eq") and bool(tokens.eq(bad).any()):
            raise ValueError("poisoned input")

    model.bridge.register_forward_pre_hook(check, with_kwargs=True)
    return model


def test_a_unit_failing_twice_stops_the_capture_naming_the_prompt(ray_local, tmp_path) -> None:
    from ray import cloudpickle

    import workbench

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    items = [{"id": f"ok{i}", "prompt": p} for i, p in enumerate(PROMPTS[:8])]
    items[5] = {"id": "bad-one", "prompt": f"A{POISON}here"}

    with pytest.raises(UserError) as err:
        workbench.capture(_DriverClean(poisoned_tiny_gpt2), items, hooks=["residual"],
                          out=tmp_path / "bad.h5", batch_size=2, workers=2, units=2, progress=False)
    assert "'bad-one'" in str(err.value) and "failed 2 times" in str(err.value)
    assert "poisoned input" in str(err.value)


class _DriverClean:
    """A loader that the driver calls in this process (a clean model) and the workers call after
    unpickling (the poisoned one)."""

    def __init__(self, worker_loader) -> None:
        self.worker_loader = worker_loader
        self.in_driver = os.getpid()

    def __call__(self):
        if os.getpid() == self.in_driver:
            from workbench.registries import load_model

            return load_model(MODEL)
        return self.worker_loader()


def perturbed_tiny_gpt2():  # pragma: no cover - runs in the Ray workers
    """tiny-gpt2 with one weight changed: other weights than the driver's."""
    import torch

    from workbench.registries import load_model

    model = load_model(MODEL)
    with torch.no_grad():
        next(model.bridge.original_model.parameters()).view(-1)[0] += 1.0
    return model


def test_workers_with_other_weights_than_the_driver_stop_the_capture(ray_local, tmp_path) -> None:
    from ray import cloudpickle

    import workbench

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "w.h5"
    with pytest.raises(UserError, match="loaded different weights than the driver"):
        workbench.capture(_DriverClean(perturbed_tiny_gpt2), PROMPTS[:4], out=out, workers=2,
                          progress=False)
    assert not out.exists() and not shards_dir(out).exists()  # nothing to resume: nothing left


def _cli_capture(tmp_path: Path, out: Path, prompts: list[str], units: int) -> list[str]:
    """The arguments of a 2-worker command-line capture of ``prompts`` (ids p0, p1, ...) to ``out``."""
    prompts_file = tmp_path / f"{out.stem}.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                                    for i, p in enumerate(prompts)))
    return ["capture", "-m", MODEL, "--prompts", str(prompts_file), "--batch-size", "3", "-o",
            str(out), "--workers", "2", "--units", str(units), "--commit-every", "0",
            *[x for h in HOOKS for x in ("--hooks", h)]]


def _wait_for_units(proc: subprocess.Popen, out: Path, pattern: str) -> None:
    """Wait (at most 4 minutes) until a unit file matching ``pattern`` exists; the capture must
    still be running then."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(shards_dir(out).glob(pattern)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def test_driver_killed_then_resume_from_the_command_line(runs, tmp_path) -> None:
    one, _ = runs
    out = tmp_path / "cli.h5"
    args = _cli_capture(tmp_path, out, PROMPTS, units=8)
    proc = _cli(*args)
    _wait_for_units(proc, out, "unit-*.h5")  # a complete unit
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray runtime it started
    proc.wait()
    assert not out.exists()
    status = subprocess.run([sys.executable, "-m", "workbench.cli", "inspect", str(out)],
                            capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stderr
    assert "interrupted" in status.stdout and "complete" in status.stdout
    again = _cli(*args)  # without --resume: refused
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and "--resume" in err.strip().splitlines()[-1]
    resumed = _cli(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming the sharded capture" in err
    assert_bit_equal(one, out)


@pytest.mark.integration
def test_smollm2_on_two_workers_equals_one_process(ray_local, tmp_path) -> None:
    import workbench

    prompts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
               "One, two, three, four,", "The quick brown fox jumps over the lazy dog.",
               "In 1969 the first people walked on the", "def add(a, b):\n    return"]
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    workbench.capture("smollm2-135m", prompts, hooks=["residual"], out=one, batch_size=2, progress=False)
    workbench.capture("smollm2-135m", prompts, hooks=["residual"], out=two, batch_size=2, workers=2,
                      progress=False)
    assert_bit_equal(one, two)
    with open_run(two) as run:
        assert len(run.shards) == 3 and run.model_name == "smollm2-135m"


def test_a_sharded_capture_in_progress_reads_as_its_committed_prefix(runs, tmp_path) -> None:
    """While the workers write (a capture on the command line, as a user's terminal UI would
    watch it from another process), open_run(RUN.h5) shows every complete unit and the committed
    prompts of the first unfinished one, in prompt order, each equal to the single-process
    capture's; refresh() only adds prompts; the TUI lists the run; shard_progress reports units."""
    from workbench.store.shards import shard_progress
    from workbench.tui.state import find_runs

    one, _ = runs
    out = tmp_path / "live.h5"
    prompts = PROMPTS * 3
    proc = _cli(*_cli_capture(tmp_path, out, prompts, units=6))
    seen: list[int] = []
    states: set[str] = set()
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline and not seen:
            if out.exists() or not any(shards_dir(out).glob("unit-*.h5*")):
                time.sleep(0.01)
                continue
            try:
                run = open_run(out)
            except UserError:
                continue  # no prompt committed yet
            with run, open_run(one) as ref:
                assert run.status == "in progress" and run.planned_prompts == len(prompts)
                assert out in find_runs(tmp_path)
                while proc.poll() is None and len(seen) < 200:
                    n = run.refresh()
                    assert not seen or n >= seen[-1]
                    seen.append(n)
                    progress = shard_progress(out)
                    if progress is not None:
                        states |= {u["state"] for u in progress["units"]}
                    if n:
                        i = n - 1
                        assert run.prompt(i) == prompts[i]
                        for hook in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"):
                            assert np.array_equal(run.activation(hook, i),
                                                  ref.activation(hook, i % len(PROMPTS))), (hook, i)
                        assert run.str_tokens(i) == ref.str_tokens(i % len(PROMPTS))
                    time.sleep(0.02)
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert seen and max(seen) > 0, seen
    assert len(set(seen)) > 1, seen  # it grew while we watched
    assert states & {"complete", "partial"}, states
    with open_run(out) as run:
        assert len(run) == len(prompts) and len(run.shards) == 6


def test_ctrl_c_commits_and_stops_every_worker_then_resume(runs, tmp_path) -> None:
    one, _ = runs
    out = tmp_path / "int.h5"
    args = _cli_capture(tmp_path, out, PROMPTS, units=8)
    proc = _cli(*args)
    _wait_for_units(proc, out, "unit-*.h5*")  # any unit started
    os.kill(proc.pid, signal.SIGINT)  # the driver only
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "--resume" in err.strip().splitlines()[-1]
    assert not out.exists()
    for partial in shards_dir(out).glob("unit-*.h5.partial"):  # no worker still writing
        with open_run(partial) as run:
            assert run.status == "interrupted"
    resumed = _cli(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    with open_run(out) as a, open_run(one) as b:
        assert a.prompt_ids == b.prompt_ids
    assert_bit_equal(one, out)


def test_one_worker_captures_in_process_without_importing_ray(tmp_path) -> None:
    code = ("import sys, workbench; "
            f"workbench.capture({MODEL!r}, ['a b c'], out={str(tmp_path / 'a.h5')!r}, progress=False, "
            "workers=1); import workbench.cli; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert not shards_dir(tmp_path / "a.h5").exists()


def test_sharded_capture_refuses_bad_requests(tmp_path) -> None:
    import workbench

    out = tmp_path / "x.h5"
    with pytest.raises(UserError, match="not a loaded model"):
        workbench.capture(workbench.load_model(MODEL), ["a"], out=out, workers=2)
    shards_dir(out).mkdir()
    with pytest.raises(UserError, match="exists without its index"):
        workbench.capture(MODEL, ["a"], out=out, workers=2)
    (shards_dir(out) / "units.json").write_text('{"units": []}')
    with pytest.raises(UserError, match="--resume continues it"):
        workbench.capture(MODEL, ["a"], out=out, workers=2)
    with pytest.raises(UserError, match="continue it with --workers N --resume"):
        workbench.capture(MODEL, ["a"], out=out, resume=True)  # in one process
    with pytest.raises(UserError, match="does not replace a sharded run"):
        workbench.capture(MODEL, ["a"], out=out, workers=2, overwrite=True)
    partial = tmp_path / "z.h5.partial"
    partial.write_bytes(b"")
    with pytest.raises(UserError, match="without --workers"):
        workbench.capture(MODEL, ["a"], out=tmp_path / "z.h5", workers=2, resume=True)
    with pytest.raises(UserError, match="--worker-cpus"):
        workbench.capture(MODEL, ["a"], out=tmp_path / "y.h5", workers=2, worker_cpus=0)
