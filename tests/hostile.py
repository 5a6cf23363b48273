"""Hostile and damaged run files: mutations of real runs, and a checker that runs every reader on
one file in a forked child under a time and memory limit.

The promise (docs/store.md, "Hostile and damaged files"): ``open_run`` and everything it returns,
``workbench inspect``, ``workbench analyze`` and the terminal UI's loader either read a file
correctly or fail with one ``workbench: error:`` line (a :class:`~workbench.errors.UserError`),
within :data:`TIME_LIMIT` seconds and under :data:`MEMORY_LIMIT` bytes of extra memory, and never
crash the process.

The checker is a long-lived worker process (``python -m tests.hostile``) that imports the
workbench once and forks a child per file: a crash (a signal), a hang or a runaway allocation
kills only the child, and ``wait4`` reports the child's peak memory. Requests and answers are
JSON lines on stdin/stdout. ``tests/test_hostile.py`` drives it with Hypothesis; the same
mutations written to files are the regression corpus in ``tests/data/hostile/``.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIME_LIMIT = 10.0
MEMORY_LIMIT = 1 << 30
HUGE = 1 << 40  # a length no real run has: 1 T elements


# --- mutations ---------------------------------------------------------------------------------


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of raw dataset values (chunks or contiguous storage) in an HDF5 file; every
    other byte is metadata (superblock, object headers, B-trees, heaps)."""
    import h5py

    out: list[tuple[int, int]] = []
    with h5py.File(path, "r") as f:
        def visit(_name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset) or obj.shape == ():
                return
            if obj.chunks is None:
                off = obj.id.get_offset()
                if off is not None:
                    out.append((off, off + obj.id.get_storage_size()))
                return
            for k in range(obj.id.get_num_chunks()):
                info = obj.id.get_chunk_info(k)
                out.append((info.byte_offset, info.byte_offset + info.size))

        f.visititems(visit)
    return sorted(out)


def metadata_offsets(path: Path) -> list[int]:
    size = path.stat().st_size
    ranges = data_ranges(path)
    offsets, pos = [], 0
    for a, b in ranges:
        offsets.extend(range(pos, min(a, size)))
        pos = max(pos, b)
    offsets.extend(range(pos, size))
    return offsets


def dataset_names(path: Path) -> list[str]:
    import h5py

    names: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return sorted(names)


@dataclass(frozen=True)
class Mutation:
    """One damage applied to a copy of a seed run. ``kind`` picks the damage; ``target`` (a
    dataset or attribute name, or a file name in the results folder) and the integers ``a``,
    ``b`` parametrise it."""

    seed: str
    kind: str
    target: str = ""
    a: int = 0
    b: int = 0

    def describe(self) -> str:
        return f"{self.seed}:{self.kind}:{self.target}:{self.a}:{self.b}"


BYTE_KINDS = ("truncate", "flip", "flip_meta", "zero_meta")
STRUCT_KINDS = ("offsets_decrease", "offsets_past_end", "offsets_huge", "delete", "wrong_dtype",
                "huge_shape", "attr_huge_shape", "attr_garbage", "json_garbage", "version_future")
RESULT_KINDS = ("result_truncated", "result_foreign", "result_random", "result_meta_garbage",
                "result_dir")
LINK_KINDS = ("symlink_self", "symlink_loop", "symlink_dangling")
KINDS = BYTE_KINDS + STRUCT_KINDS + RESULT_KINDS + LINK_KINDS


def apply(m: Mutation, seed_path: Path, folder: Path) -> Path:
    """Write the damaged run ``m`` describes into ``folder`` (created) and return its path."""
    import h5py
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "run.h5"
    if m.kind in LINK_KINDS:
        if m.kind == "symlink_self":
            out.symlink_to(out.name)
        elif m.kind == "symlink_loop":
            out.symlink_to("other.h5")
            (folder / "other.h5").symlink_to(out.name)
        else:
            out.symlink_to("missing.h5")
        return out
    shutil.copyfile(seed_path, out)
    results = seed_path.with_name(seed_path.name + ".results")
    if m.kind in RESULT_KINDS and results.is_dir():
        shutil.copytree(results, folder / "run.h5.results")
    rng = random.Random(m.a * 1_000_003 + m.b)
    size = out.stat().st_size
    if m.kind == "truncate":
        with open(out, "r+b") as fh:
            fh.truncate(m.a % size)
    elif m.kind in ("flip", "flip_meta", "zero_meta"):
        where = metadata_offsets(seed_path) if m.kind != "flip" else range(size)
        with open(out, "r+b") as fh:
            for _ in range(1 + m.b % 8):
                pos = where[rng.randrange(len(where))]
                fh.seek(pos)
                old = fh.read(1)
                fh.seek(pos)
                fh.write(b"\0" if m.kind == "zero_meta" else bytes([old[0] ^ (1 << rng.randrange(8))]))
    elif m.kind in STRUCT_KINDS:
        with h5py.File(out, "r+") as f:
            _structural(f, m, rng, np)
    elif m.kind in RESULT_KINDS:
        _damage_results(folder / "run.h5.results", m, rng)
    return out


def _structural(f: Any, m: Mutation, rng: random.Random, np: Any) -> None:
    import h5py

    name = m.target
    if m.kind in ("offsets_decrease", "offsets_past_end", "offsets_huge"):
        ds = f[name]
        v = ds[...]
        if v.size == 0:
            return
        i = m.a % v.size
        if m.kind == "offsets_decrease":
            v[i:] = v[i:][::-1]
            v[i] = v[i] - 1 - m.b % 5
        elif m.kind == "offsets_past_end":
            v[i:] += 1 + m.b % 1000
        else:
            v[i:] = HUGE + m.b
        ds[...] = v
    elif m.kind == "delete":
        del f[name]
    elif m.kind == "wrong_dtype":
        old = f[name][...]
        del f[name]
        kinds = [np.float64, np.int8, np.uint64, h5py.string_dtype(), np.complex64]
        dt = kinds[m.a % len(kinds)]
        if dt is kinds[3]:
            f.create_dataset(name, data=np.array(["x"] * max(1, old.size), dtype=object), dtype=dt)
        else:
            try:
                values = np.asarray(old).astype(np.float64).astype(dt)
            except (TypeError, ValueError):  # text (a JSON document) as numbers
                values = np.arange(max(1, np.size(old))).astype(dt)
            f.create_dataset(name, data=values)
    elif m.kind == "huge_shape":
        ds = f[name]
        shape, dtype, attrs = ds.shape, ds.dtype, dict(ds.attrs)
        del f[name]
        big = (HUGE + m.b, *shape[1:]) if shape else (HUGE,)
        new = f.create_dataset(name, shape=big, dtype=dtype, chunks=True, maxshape=(None, *big[1:]))
        for k, v in attrs.items():
            new.attrs[k] = v
    elif m.kind in ("attr_huge_shape", "json_garbage", "attr_garbage"):
        meta_name = "meta/hooks" if m.kind == "attr_huge_shape" else name
        meta = f[meta_name]
        if m.kind == "attr_huge_shape":
            doc = json.loads(meta[()])
            for spec in (doc.values() if isinstance(doc, dict) else doc):
                if isinstance(spec, dict) and "feature_shape" in spec:
                    spec["feature_shape"] = [HUGE] * max(1, len(spec["feature_shape"]))
            text = json.dumps(doc)
        elif m.kind == "json_garbage":
            garbage = ['[]', '{"a":', 'null', '"x"', '{"n_layers": -1}', '1e999', '{}',
                       json.dumps({"x": [HUGE] * 4}), '\udcff']
            text = garbage[m.a % len(garbage)]
        else:
            text = None
        if text is not None:
            del f[meta_name]
            f.create_dataset(meta_name, data=text.encode("utf-8", "surrogatepass"))
        else:
            # an attribute of a group or dataset set to something of the wrong type
            obj = f[name]
            keys = list(obj.attrs) or ["axes"]
            key = keys[m.a % len(keys)]
            values = [HUGE, -1, "", "x" * 1000, np.zeros(3), "head,q,k,extra,axes"]
            obj.attrs[key] = values[m.b % len(values)]
    elif m.kind == "version_future":
        values = [HUGE, -5, "x", 99]
        f.attrs["schema_version"] = values[m.a % len(values)]


def _damage_results(folder: Path, m: Mutation, rng: random.Random) -> None:
    import h5py

    folder.mkdir(exist_ok=True)
    files = sorted(folder.glob("*.h5"))
    victim = files[m.a % len(files)] if files else folder / "x--1--0000.h5"
    if m.kind == "result_truncated" and files:
        with open(victim, "r+b") as fh:
            fh.truncate(m.b % max(1, victim.stat().st_size))
    elif m.kind == "result_foreign":
        with h5py.File(folder / "foreign--1--abcd.h5", "w") as f:
            f["x"] = [1, 2, 3]
    elif m.kind == "result_random":
        (folder / "random--1--abcd.h5").write_bytes(rng.randbytes(1 + m.b % 4096))
    elif m.kind == "result_meta_garbage" and files:
        with h5py.File(victim, "r+") as f:
            del f["meta"]
            garbage = ['[]', '{"analysis": 3, "params": []}', 'null', '{"params": {"x": 1}}']
            f["meta"] = garbage[m.b % len(garbage)].encode()
    elif m.kind == "result_dir":
        (folder / "dir--1--abcd.h5").mkdir()


def targets_for(kind: str, names: list[str]) -> list[str]:
    """The datasets (or other targets) a structural mutation of ``kind`` may pick."""
    if kind.startswith("offsets_"):
        return [n for n in names if n.endswith("offsets") or n.startswith("acts_offsets/")]
    if kind in ("json_garbage",):
        return [n for n in names if n.startswith("meta/")]
    if kind in ("delete", "wrong_dtype", "attr_garbage"):
        return names
    if kind == "huge_shape":
        return [n for n in names if not n.startswith("meta/")]
    return [""]


# --- the checker -------------------------------------------------------------------------------


def read_everything(path: str) -> str:
    """What a user of the Python API does with a run: open it and read every part of it. Returns a
    digest of everything the run's own data read back as (numbers as float64, so a dtype that
    holds the same values reads the same), which a damaged file that reads "ok" must match."""
    import hashlib

    import numpy as np

    from workbench.store import open_run
    from workbench.store.results import list_results

    h = hashlib.sha256()

    def add(*values: Any) -> None:
        for v in values:
            if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
                h.update(np.ascontiguousarray(v, dtype=np.float64).tobytes())
            else:
                h.update(repr(v).encode("utf-8", "surrogatepass"))

    with open_run(path) as run:
        run.summary(n_prompts=len(run))
        square = [k for k, s in run.hooks.items() if s.layout == "square"]
        for i in range(len(run)):
            add(run.prompt(i), run.prompt_id(i), run.metadata(i))
            for s in run.streams:
                add(run.tokens(i, s), run.str_tokens(i, s), run.display_tokens(i, s))
            for k in run.hooks:
                add(run.activation(k, i), run.axis_tokens(k, i))
            for k in square:
                if run.n_tokens(i, run.hooks[k].square_streams()[0]):
                    add(run.attention_row(k, i, 0))
            if run.has_lm_outputs:
                add(run.loss(i), *run.top_k(i))
            if run.has_generation:
                add(*run.generation(i).values())
        for k, spec in run.hooks.items():
            if spec.layout != "square":
                add(run.rows(k))
        for r in list_results(run):
            r.result(), r.arrays, r.record(run)
    return h.hexdigest()


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``workbench ARGV`` in this process: exit status and stderr."""
    from tests.clitools import run_cli as in_process

    done = in_process(*argv)
    return done.returncode, done.stderr


def open_in_tui(path: str) -> None:
    """The terminal UI's loader, and its first screen drawn headless."""
    import asyncio

    from workbench.errors import UserError
    from workbench.tui import make_app

    app = make_app([path])

    async def main() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            await pilot.press("down")
            await pilot.pause()

    try:
        asyncio.run(main())
    except UserError as exc:  # the app must show a damaged part, not end on it
        raise RuntimeError(f"the app ended on {exc!r}") from None
    if app.return_code not in (0, None) or getattr(app, "_exception", None) is not None:
        raise RuntimeError(f"the app failed: {app._exception!r}")


def _misbehave(how: str) -> None:
    if how == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif how == "hang":
        time.sleep(3600)
    raise RuntimeError("a bug")


def check_one(path: str, tui: bool) -> dict[str, Any]:
    """Every reader on ``path`` in this process: for each, 'ok', 'user: MESSAGE' or 'bug:
    TRACEBACK'."""
    from workbench.errors import UserError

    steps: dict[str, Any] = {}

    def step(name: str, fn: Any) -> None:
        try:
            fn()
            steps[name] = "ok"
        except UserError as exc:
            msg = str(exc)
            steps[name] = "user: " + msg if "\n" not in msg else "bug: multi-line user error: " + msg
        except BaseException:  # noqa: BLE001 - every failure is an outcome to report
            steps[name] = "bug: " + traceback.format_exc(limit=-8)

    def cli(*argv: str) -> Any:
        def go() -> None:
            code, err = run_cli(list(argv))
            errors = [ln for ln in err.splitlines() if ln.startswith("workbench: error: ")]
            if code == 0 and "Traceback" not in err:
                return
            if code == 2 and len(errors) == 1 and "Traceback" not in err:
                raise UserError(errors[0].removeprefix("workbench: error: "))
            raise RuntimeError(f"exit {code}, stderr:\n{err}")
        return go

    if Path(path).name.startswith("selftest-"):  # the checker's own test: misbehave on purpose
        step("selftest", lambda: _misbehave(Path(path).name.removeprefix("selftest-")))
        return steps
    step("open_run", lambda: steps.__setitem__("digest", read_everything(path)))
    step("inspect", cli("inspect", path, "-n", "50"))
    step("inspect_json", cli("inspect", path, "--json"))
    step("analyze", cli("analyze", path, "attends-to", "next-token"))
    if tui:
        step("tui", lambda: open_in_tui(path))
    return steps


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _vm_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def check_forked(path: str, tui: bool) -> dict[str, Any]:
    """:func:`check_one` in a forked child limited to :data:`TIME_LIMIT` seconds and
    :data:`MEMORY_LIMIT` more address space: the steps' outcomes, ``seconds``, ``extra_mb`` (the
    child's peak resident memory above this process's) and ``died`` (a signal, a timeout)."""
    fd, answer_file = tempfile.mkstemp(prefix="hostile-answer-")  # a file: a pipe could fill and block
    os.close(fd)
    base_kb = _rss_kb()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        start_kb = _rss_kb()
        try:
            limit = _vm_bytes() + MEMORY_LIMIT
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            out = check_one(path, tui)
        except BaseException:  # noqa: BLE001 - every failure is an outcome to report
            out = {"worker": "bug: " + traceback.format_exc()}
        digest = out.pop("digest", None)
        with open(answer_file, "w") as fh:
            fh.write(json.dumps({"steps": out, "digest": digest, "start_kb": start_kb}))
        os._exit(0)
    died = None
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > TIME_LIMIT:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            died = f"timeout after {TIME_LIMIT:.0f} s"
            break
        time.sleep(0.005)
    seconds = time.monotonic() - start
    with open(answer_file) as fh:
        text = fh.read()
    os.unlink(answer_file)
    if died is None and os.WIFSIGNALED(status):
        died = f"killed by signal {os.WTERMSIG(status)}"
    answer = json.loads(text) if text else {"steps": {}, "digest": None, "start_kb": base_kb}
    return {"steps": answer["steps"], "digest": answer["digest"], "seconds": round(seconds, 3), "died": died,
            "extra_mb": round(max(0, usage.ru_maxrss - answer["start_kb"]) / 1024, 1)}


def serve() -> None:
    """Answer JSON requests ``{"path": ..., "tui": bool}`` on stdin, one per line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Import what the checks use once, so that each fork starts warm.
    import h5py  # noqa: F401

    import workbench.cli
    import workbench.tui  # noqa: F401
    from workbench import registries

    registries.build_analyses()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(check_forked(req["path"], bool(req.get("tui")))), flush=True)


class Checker:
    """The worker process, from the test's side."""

    def __init__(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.hostile"], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the hostile-file checker did not start")

    def check(self, path: Path, tui: bool = False) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"path": str(path), "tui": tui}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


VALUE_KINDS = ("flip",)
"""Damage to raw values, which HDF5 does not checksum: such a file may read "ok" with other values
(docs/store.md says so). Every other kind must read the seed's values exactly, or fail."""


def failures(outcome: dict[str, Any], seed_digest: str | None = None, kind: str = "") -> list[str]:
    """What broke the promise in one checker answer (empty: kept). With ``seed_digest``, a file
    whose ``open_run`` read everything without error must have read the seed run's values."""
    out = []
    if (seed_digest and kind not in VALUE_KINDS and outcome["steps"].get("open_run") == "ok"
            and outcome["digest"] != seed_digest):
        out.append("read other values than the undamaged run, without an error")
    if outcome["died"]:
        out.append(outcome["died"])
    if outcome["seconds"] > TIME_LIMIT:
        out.append(f"took {outcome['seconds']} s")
    if outcome["extra_mb"] > MEMORY_LIMIT / 2**20:
        out.append(f"used {outcome['extra_mb']} MB more")
    out += [f"{k}: {v}" for k, v in outcome["steps"].items() if v.startswith("bug")]
    return out


if __name__ == "__main__":
    serve()
