"""The one-way architecture (docs/architecture.md), enforced.

- import-linter's contracts in pyproject.toml: the layers (function-level imports included), the
  public modules first-party plugins may use, private modules;
- no module imports a private name (``_x``) from another module of ours: plugins build only on
  what the core and other plugins make public;
- no module is over ~500 lines unless its docstring says why it must be one piece.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("workbench", "workbench_plugins")
MAX_LINES = 520  # "about 500"
ONE_PIECE = "one piece"  # what a longer module's docstring says, with the reason


def _sources() -> list[Path]:
    return sorted([*(ROOT / "workbench").rglob("*.py"), *(ROOT / "plugins").rglob("*.py"),
                   *(ROOT / "examples" / "plugin-example").rglob("*.py")])


def test_import_contracts_hold() -> None:
    """``lint-imports`` from the repository root: a back-edge (a lower layer importing a higher
    one, even inside a function) or a plugin importing a non-public core module fails here."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (it is in the 'test' extra)"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout[proc.stdout.find("Contracts"):] if "Contracts" in proc.stdout else proc.stdout
    assert proc.returncode == 0, tail + proc.stderr
    assert "0 broken" in proc.stdout


def test_contracts_cover_every_package_of_the_core() -> None:
    """Every module directly under workbench/ belongs to a layer (a new one must be placed)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    placed = {m.strip() for layer in layers for m in layer.split("|")}
    found = {f"workbench.{p.stem}" for p in (ROOT / "workbench").glob("*.py") if p.stem != "__init__"}
    found |= {f"workbench.{p.name}" for p in (ROOT / "workbench").iterdir()
              if p.is_dir() and (p / "__init__.py").exists()}
    assert found - placed == set(), "modules in no layer of pyproject.toml's contract"


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.split(".")[0] in (*OURS, "workbench_activation_stats"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}")
    return bad


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [line for path in _sources() for line in _private_imports(path)]
    assert bad == []


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from workbench_plugins.lens_view import PromptView, _bar\n"
                      "from workbench.plugins import __doc__\nfrom numpy import _core\n")
    assert _private_imports(sample, tmp_path) == ["x.py:1: workbench_plugins.lens_view._bar"]


def test_modules_are_small_or_say_why() -> None:
    long = []
    for path in _sources():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if ONE_PIECE not in doc:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert long == [], "split these, or say in the docstring why each must be one piece"


@pytest.mark.parametrize("edge", [
    ("workbench/store/probe_back_edge.py", "def f():\n    from workbench.analysis import Analysis\n"),
    ("workbench/models/probe_back_edge.py", "def f():\n    import workbench.plugins\n"),
])
def test_a_lazy_back_edge_breaks_the_contract(edge: tuple[str, str]) -> None:
    """The check is real: a function-level import from a lower layer to a higher one fails it."""
    path = ROOT / edge[0]
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe
    try:
        path.write_text(edge[1])
        proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    finally:
        path.unlink()
    assert proc.returncode != 0
    assert "probe_back_edge" in proc.stdout
