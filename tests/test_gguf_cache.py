"""GGUF files and the converted-weights cache, on a real (tiny) GGUF written in llama.cpp's layout.

The oracle is the original Hugging Face model the GGUF was written from: after the GGUF round trip,
and after the cache round trip, logits must be bit-identical to it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import workbench
from tests.gguf_fixture import write_tiny_llama_gguf
from workbench.models import gguf_cache


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(cache))
    return cache


@pytest.fixture()
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    hf, tok = write_tiny_llama_gguf(path)
    return path, hf, tok


def _logits(model, text="Héllo 🙂 world, tokens!"):
    ids = torch.tensor([model.tokenize(text, bos="none")])
    with torch.no_grad():
        return model.forward(ids)


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "converted").iterdir() if not p.name.startswith(".")]
    return entry


def test_gguf_file_loads_and_matches_the_original_weights(isolated_cache, tiny_gguf):
    path, hf, tok = tiny_gguf
    model = workbench.load_model(str(path), device="cpu", progress=False)
    ids = torch.tensor([tok("Héllo 🙂 world, tokens!")["input_ids"]])
    with torch.no_grad():
        expected = hf(ids).logits
    assert torch.equal(model.forward(ids), expected)
    info = model.info
    assert info.provenance.source == "gguf"
    assert info.provenance.sha256 and len(info.provenance.sha256) == 64
    assert info.provenance.quantization.startswith("GGUF ALL_F32")
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model) == (2, 4, 2, 64)
    # The GGUF declares add_bos_token = false, and the tokenizer policy follows it.
    assert info.bos.policy == "tokenizer" and info.bos.prefix == ()


def test_a_conversion_parses_the_gguf_once(isolated_cache, tiny_gguf, monkeypatch):
    """transformers reads the file three times (tokenizer, config, weights) and the quantisation
    label once more: the four share one parsed reader, and the model still equals the original."""
    import gguf

    path, hf, tok = tiny_gguf
    parsed = []
    real = gguf.GGUFReader

    def counting(*args, **kwargs):
        parsed.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    model = workbench.load_model(str(path), device="cpu", progress=False)
    assert [os.path.realpath(p) for p in parsed] == [os.path.realpath(path)]
    assert gguf.GGUFReader is counting  # put back afterwards
    ids = torch.tensor([tok("Héllo 🙂 world, tokens!")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.forward(ids), hf(ids).logits)


def test_cached_load_is_bit_identical_to_fresh_conversion(isolated_cache, tiny_gguf):
    path, _, _ = tiny_gguf
    fresh = workbench.load_model(str(path), device="cpu", progress=False)
    entry = _entry(isolated_cache)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    cached = workbench.load_model(str(path), device="cpu", progress=False)
    assert torch.equal(_logits(fresh), _logits(cached))
    assert cached.info.provenance == fresh.info.provenance
    assert not [p for p in (isolated_cache / "converted").iterdir() if p.name.startswith(".")]


def _damage_truncate(entry: Path) -> None:
    f = entry / "model.safetensors"
    with open(f, "r+b") as h:
        h.truncate(f.stat().st_size // 2)


def _damage_flip_byte(entry: Path) -> None:
    f = entry / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as h:
        h.seek(size - 100)
        b = h.read(1)
        h.seek(size - 100)
        h.write(bytes([b[0] ^ 0xFF]))


def _damage_manifest(entry: Path) -> None:
    (entry / "manifest.json").write_text("{not json")


def _damage_remove_tokenizer(entry: Path) -> None:
    os.remove(entry / "tokenizer.json")


@pytest.mark.parametrize(
    "damage", [_damage_truncate, _damage_flip_byte, _damage_manifest, _damage_remove_tokenizer]
)
def test_damaged_entry_is_detected_and_rebuilt(isolated_cache, tiny_gguf, damage, capsys):
    path, _, _ = tiny_gguf
    fresh = workbench.load_model(str(path), device="cpu", progress=False)
    expected = _logits(fresh)
    damage(_entry(isolated_cache))
    capsys.readouterr()
    rebuilt = workbench.load_model(str(path), device="cpu", progress=False)
    assert "is damaged" in capsys.readouterr().err
    assert torch.equal(_logits(rebuilt), expected)
    # And the rebuilt entry is sound again.
    assert [e["status"] for e in gguf_cache.list_entries()] == ["ok"]


def test_interrupted_conversion_leaves_no_entry(isolated_cache, tiny_gguf, monkeypatch):
    path, _, _ = tiny_gguf

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_model", fail)
    with pytest.raises(KeyboardInterrupt):
        workbench.load_model(str(path), device="cpu", progress=False)
    root = isolated_cache / "converted"
    assert not root.exists() or not list(root.iterdir())


def test_first_conversion_reports_progress(isolated_cache, tiny_gguf, capsys):
    path, _, _ = tiny_gguf
    workbench.load_model(str(path), device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "converting tiny-llama.gguf from GGUF to float32 (first load only" in err
    assert "converted in" in err
    workbench.load_model(str(path), device="cpu", progress=True)
    assert "converting" not in capsys.readouterr().err


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    from workbench.paths import cache_dir

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("WORKBENCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "workbench"


# --- real processes: conversions killed with SIGKILL, and two conversions at once -------------------

_TEXT = "Héllo 🙂 world, tokens!"

# A conversion server, started once for this module: it imports everything and loads a GGUF once
# into its own scratch cache, so that each conversion it forks afterwards takes a fraction of a
# second instead of the ~8 s of imports a fresh interpreter needs on two cores. Each JSON line
# ["convert", MOMENT, GGUF, CACHE, OUT, ARG] on stdin forks a process that loads GGUF with
# workbench.load_model into CACHE (it prints "started PID"; with OUT it saves its logits there).
# MOMENT arranges where the conversion stops to print "ready PID" and wait for its SIGKILL
# ("unarranged": nowhere; "race": it waits in save_model until two pids are in the folder ARG).
# ["reap", PID] reaps it and prints "exit PID CODE"; until then a killed process stays a zombie,
# so its pid cannot be reused and the test never signals a stranger.
_SERVER = r"""
import json, os, sys, time, traceback
from pathlib import Path
import safetensors.torch
import torch
import workbench
from workbench.models import gguf_cache

warm_up_gguf, text = sys.argv[1:3]
workbench.load_model(warm_up_gguf, device="cpu", progress=False)

def wait_for_sigkill():
    print(f"ready {os.getpid()}", flush=True)
    while True:
        time.sleep(60)

def arrange(moment, arg):
    real_save = safetensors.torch.save_model
    if moment == "mid_write":  # half of model.safetensors is on disk
        def save_model(model, filename, *args, **kwargs):
            real_save(model, filename, *args, **kwargs)
            os.truncate(filename, os.path.getsize(filename) // 2)
            wait_for_sigkill()
        safetensors.torch.save_model = save_model
    elif moment == "before_rename":  # every file written, fsynced, checksummed; not yet renamed
        real_rename = os.rename
        def rename(src, dst, *args, **kwargs):
            if ".tmp-" in os.fspath(src):
                wait_for_sigkill()
            return real_rename(src, dst, *args, **kwargs)
        os.rename = rename
    elif moment == "after_rename":  # renamed into place, the folder not yet fsynced
        real_fsync_dir = gguf_cache.fsync_dir
        def fsync_dir(path):
            if Path(path) == gguf_cache.converted_root():
                wait_for_sigkill()
            return real_fsync_dir(path)
        gguf_cache.fsync_dir = fsync_dir
    elif moment == "race":
        def save_model(model, filename, *args, **kwargs):
            Path(arg, str(os.getpid())).touch()
            deadline = time.monotonic() + 30
            while len(os.listdir(arg)) < 2 and time.monotonic() < deadline:
                time.sleep(0.002)
            return real_save(model, filename, *args, **kwargs)
        safetensors.torch.save_model = save_model
    else:
        assert moment == "unarranged", moment

def convert(moment, gguf, cache, out, arg):
    os.environ["WORKBENCH_CACHE_DIR"] = cache
    arrange(moment, arg)
    print(f"started {os.getpid()}", flush=True)
    model = workbench.load_model(gguf, device="cpu", progress=False)
    if out:
        with torch.no_grad():
            torch.save(model.forward(torch.tensor([model.tokenize(text, bos="none")])), out)

for line in sys.stdin:
    command, *args = json.loads(line)
    if command == "reap":
        _, status = os.waitpid(args[0], 0)
        print(f"exit {args[0]} {os.waitstatus_to_exitcode(status)}", flush=True)
        continue
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        code = 1
        try:
            convert(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
"""


def _child_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WORKBENCH_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


class _Server:
    def __init__(self, folder: Path) -> None:
        gguf = folder / "warm-up.gguf"
        write_tiny_llama_gguf(gguf)
        self.stderr = open(folder / "server.err", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(gguf), _TEXT], env=_child_env(folder / "cache"),
            cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout],
                         daemon=True).start()

    def send(self, *command: object) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float = 40) -> list[str]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {word!r} from the server; its stderr: {self.err()}") from None
        assert line.split()[0] == word, f"expected {word!r}, got {line!r}; stderr: {self.err()}"
        return line.split()[1:]

    def start(self, moment: str, gguf: Path, cache: Path, out: Path | None = None,
              arg: str = "") -> int:
        self.send("convert", moment, str(gguf), str(cache), str(out or ""), arg)
        return int(self.expect("started")[0])

    def reap(self, pid: int) -> int:
        """The exit code of the conversion ``pid``: 0, or -9 when SIGKILL ended it."""
        self.send("reap", pid)
        got, code = self.expect("exit")
        assert int(got) == pid
        return int(code)

    def err(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = _Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


def _hidden(cache: Path) -> list[str]:
    """The hidden names (temporary and discarded folders) in the cache's ``converted/``."""
    root = cache / "converted"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def _kill_at(server: _Server, moment: str, gguf: Path, cache: Path) -> int:
    """Start a conversion into ``cache`` and SIGKILL it at ``moment``; its exit code (-9: killed
    by the signal, 0: it finished first, which only an unarranged kill can let happen)."""
    pid = server.start(moment, gguf, cache)
    if moment == "unarranged":
        # Real timing: kill it the instant its temporary folder shows up (or once it has finished).
        deadline = time.monotonic() + 40
        root = cache / "converted"
        while time.monotonic() < deadline:
            names = os.listdir(root) if root.is_dir() else []
            if any(f".tmp-{pid}-" in n or not n.startswith(".") for n in names):
                break
            time.sleep(0.0005)
    else:
        assert int(server.expect("ready")[0]) == pid
    os.kill(pid, signal.SIGKILL)  # not reaped yet: this pid is still the conversion's
    return server.reap(pid)


def _fresh_logits(path: Path, cache: Path, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(cache))
    return _logits(workbench.load_model(str(path), device="cpu", progress=False))


def test_conversion_killed_mid_write_leaves_no_trusted_entry(server, isolated_cache, tiny_gguf,
                                                             tmp_path, monkeypatch):
    """A conversion SIGKILLed at any point never leaves an entry that is trusted but wrong, and
    the temporary folders killed conversions leave behind are removed by the next conversion.

    The kill moments are arranged, so they are deterministic: a real conversion process (forked
    by the server above, imports warm) stops (1) with half of ``model.safetensors`` written,
    (2) with every file of the entry written and checksummed but not yet renamed into place,
    (3) just after that rename, before the folder is fsynced; the test then sends it a real
    SIGKILL. One more conversion is killed by real timing, the instant its temporary folder
    appears: that kill may land anywhere, or the conversion may finish first; the checks after
    it hold either way."""
    path, _, _ = tiny_gguf
    expected = _fresh_logits(path, tmp_path / "fresh", monkeypatch)
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(isolated_cache))
    for moment in ("mid_write", "before_rename"):
        assert _kill_at(server, moment, path, isolated_cache) == -9, server.err()
        assert gguf_cache.list_entries() == [], moment  # nothing under the final name
        # The kill was real: the dead conversion's temporary folder is still there.
        assert [n for n in _hidden(isolated_cache) if ".tmp-" in n], moment
    _kill_at(server, "unarranged", path, isolated_cache)
    assert all(e["status"] == "ok" for e in gguf_cache.list_entries())  # absent, or sound
    reloaded = workbench.load_model(str(path), device="cpu", progress=False)
    assert torch.equal(_logits(reloaded), expected)
    assert [e["status"] for e in gguf_cache.list_entries()] == ["ok"]
    assert _hidden(isolated_cache) == []  # the killed conversions' leftovers were swept

    # Killed just after the rename: the entry is complete, trusted, and right.
    other = tmp_path / "cache-b"
    assert _kill_at(server, "after_rename", path, other) == -9, server.err()
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(other))
    assert [e["status"] for e in gguf_cache.list_entries()] == ["ok"]
    inode = _entry(other).stat().st_ino
    cached = workbench.load_model(str(path), device="cpu", progress=False)
    assert torch.equal(_logits(cached), expected)
    assert _entry(other).stat().st_ino == inode  # used as it was, not rebuilt


def test_two_processes_converting_at_once_both_get_a_valid_cache(server, isolated_cache,
                                                                  tiny_gguf, tmp_path,
                                                                  monkeypatch):
    """Two real processes, started together, convert the same GGUF into an empty cache. A
    barrier in save_model (arranged) holds each until both have found no entry and converted, so
    both write an entry and both rename it: the second rename fails on the first's folder. Both
    succeed with the logits of a fresh conversion, and the cache ends with exactly one sound
    entry, nothing torn and nothing left over."""
    path, _, _ = tiny_gguf
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    outs = [tmp_path / "logits-0.pt", tmp_path / "logits-1.pt"]
    pids = [server.start("race", path, isolated_cache, out, str(barrier)) for out in outs]
    expected = _fresh_logits(path, tmp_path / "fresh", monkeypatch)  # meanwhile, here
    assert [server.reap(pid) for pid in pids] == [0, 0], server.err()
    assert sorted(os.listdir(barrier)) == sorted(map(str, pids))  # both converted
    for out in outs:
        assert torch.equal(torch.load(out), expected)
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(isolated_cache))
    assert [e["status"] for e in gguf_cache.list_entries()] == ["ok"]
    assert _hidden(isolated_cache) == []
    cached = workbench.load_model(str(path), device="cpu", progress=False)
    assert torch.equal(_logits(cached), expected)


@pytest.mark.parametrize("planted", ["sound", "damaged"])
def test_losing_the_rename_race_verifies_the_winners_entry(isolated_cache, tiny_gguf, tmp_path,
                                                           monkeypatch, capsys, planted):
    """The loser of a rename race keeps the winner's entry only if it passes its checksums; a
    damaged one (same sizes, one byte flipped) is replaced by the loser's copy. The winner is
    simulated: its entry appears under the final name while this process writes its own."""
    import shutil

    import safetensors.torch

    from workbench.paths import fingerprint

    path, _, _ = tiny_gguf
    expected = _fresh_logits(path, tmp_path / "fresh", monkeypatch)
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(isolated_cache))
    final = gguf_cache.entry_path(path.stem, fingerprint(path))
    real_save = safetensors.torch.save_model
    winner: list[int] = []

    def winner_first(model, filename, *args, **kwargs):
        if not winner:
            shutil.copytree(_entry(tmp_path / "fresh"), final)
            if planted == "damaged":
                _damage_flip_byte(final)
            winner.append(final.stat().st_ino)
        return real_save(model, filename, *args, **kwargs)

    monkeypatch.setattr("safetensors.torch.save_model", winner_first)
    loaded = workbench.load_model(str(path), device="cpu", progress=False)
    assert winner  # the loser's rename did collide
    assert torch.equal(_logits(loaded), expected)
    assert [e["status"] for e in gguf_cache.list_entries()] == ["ok"]
    assert _hidden(isolated_cache) == []
    assert (final.stat().st_ino == winner[0]) == (planted == "sound")  # kept, or replaced
    capsys.readouterr()
    cached = workbench.load_model(str(path), device="cpu", progress=False)
    assert "is damaged" not in capsys.readouterr().err  # what was left in place is sound
    assert torch.equal(_logits(cached), expected)


def test_sweep_removes_only_folders_no_live_conversion_holds(isolated_cache):
    """``sweep_stale`` removes temporary folders whose flock nobody holds and discarded entries;
    a folder a live conversion holds (here: a lock taken by this process) and entries stay."""
    import fcntl

    root = isolated_cache / "converted"
    root.mkdir(parents=True)
    names = {
        "dead": ".m-0123.tmp-999999-deadbeef",
        "trash": ".m-0123.trash-999999-cafef00d",
        "live": ".m-0123.tmp-1-abcdef12",
        "entry": "m-0123",
    }
    for name in names.values():
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"x" * 10)
    fd = os.open(root / names["live"], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert gguf_cache.sweep_stale() == 2
        assert sorted(os.listdir(root)) == sorted([names["live"], names["entry"]])
    finally:
        os.close(fd)
    assert gguf_cache.sweep_stale() == 1  # its holder is gone now
    assert os.listdir(root) == [names["entry"]]
