"""The installable example plugin (examples/plugin-example), and the acceptance scenario: it,
a plugin that raises on import and a plugin with a misspelt hook, all installed together."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin-example"


def _fake_installed(site: Path, dist: str, module: str, source: str) -> None:
    """What pip leaves for a distribution with one module and a ``workbench`` entry point."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[workbench]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(source)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with the example plugin pip-installed into it, plus two broken plugins."""
    site = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source") / "plugin-example"  # pip builds in the source tree
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(source)], check=True,
                   capture_output=True, cwd=source)
    _fake_installed(site, "raises_on_import", "raises_on_import",
                    "raise RuntimeError('this plugin is broken')\n")
    _fake_installed(site, "misspelt_hook", "misspelt_hook",
                    "from workbench import hookimpl\n\n@hookimpl\ndef register_analysis(register):\n    pass\n")
    return site


def _cli(site, *args, env=None):
    full = {**os.environ, "PYTHONPATH": str(site), **(env or {})}
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                          env=full, cwd=site, check=False)


def test_plugins_json_shows_all_three_truthfully(site):
    proc = _cli(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    example = plugins["activation_stats"]
    assert example["loaded"] and example["source"] == "entry point" and example["version"] == "0.1.0"
    assert example["location"] == "workbench-activation-stats==0.1.0: workbench_activation_stats"
    assert example["hooks"] == ["register_analyses", "register_commands", "register_views"]
    assert example["analyses"] == ["activation-stats"] and example["views"] == ["activation-stats-table"]
    assert example["commands"] == ["norms"] and example["errors"] == []
    broken = plugins["raises_on_import"]
    assert not broken["loaded"] and broken["errors"] == ["failed to load (RuntimeError: this plugin is broken)"]
    misspelt = plugins["misspelt_hook"]
    assert not misspelt["loaded"]
    assert misspelt["errors"] == [("implements unknown hook 'register_analysis' (did you mean "
                                   "register_analyses?); plugin not loaded")]
    assert proc.stderr.count("workbench: warning:") == 2


def test_analyze_stores_every_other_result_and_strict_mode_fails(site, tmp_path):
    run = tmp_path / "r.h5"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The cat sat on the", "answer": " mat", "wrong": " dog"}) + "\n"
                       + json.dumps({"prompt": "one two three"}) + "\n")
    proc = _cli(site, "capture", "-m", "tiny-gpt2", "--prompts", str(prompts), "--for", "activation-stats",
                "-o", str(run))
    assert proc.returncode == 0, proc.stderr
    proc = _cli(site, "analyze", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    records = {r["analysis"]: r for r in json.loads(proc.stdout)}
    # every analysis the run can feed: the residual stream that activation-stats asked for also
    # feeds the logit lens, which reads nothing else (issue 23)
    assert set(records) == {"activation-stats", "next-token", "answer", "distribution", "embeddings",
                            "logit-lens", "matrices"}
    assert all(r["status"] == "ok" for r in records.values())
    stored = sorted(p.name.split("--")[0] for p in (tmp_path / "r.h5.results").glob("*.h5"))
    assert stored == ["activation-stats", "answer", "distribution", "embeddings", "logit-lens", "matrices",
                      "next-token"]
    # the example's statistics against TransformerLens' own cache of the same tokens
    import torch

    import workbench

    model = workbench.load_model("tiny-gpt2", device="cpu", progress=False)
    stored_run = workbench.open_run(run)
    acts = []
    for i in range(len(stored_run)):
        _, cache = model.bridge.run_with_cache(torch.as_tensor(stored_run.tokens(i), dtype=torch.long)[None])
        acts.append(cache["blocks.1.hook_resid_post"][0].double().numpy())
    acts = np.concatenate(acts)
    row = {r["hook"]: r for r in records["activation-stats"]["result"]["data"]["hooks"]}["blocks.1.hook_resid_post"]
    assert row["n_tokens"] == acts.shape[0]
    assert row["mean"] == pytest.approx(acts.mean(), abs=1e-7)
    assert row["std"] == pytest.approx(acts.std(), rel=1e-5)
    assert row["mean_norm"] == pytest.approx(np.linalg.norm(acts, axis=1).mean(), rel=1e-5)
    assert row["max_abs"] == pytest.approx(np.abs(acts).max(), rel=1e-5)
    # its command and its view
    proc = _cli(site, "norms", str(run))
    assert proc.returncode == 0 and "blocks.1.hook_resid_post" in proc.stdout
    strict = _cli(site, "analyze", str(run), env={"WORKBENCH_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0 and "this plugin is broken" in strict.stderr


def test_the_example_plugins_own_tests_pass_with_our_pytest_fixtures(site):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(EXAMPLE / "tests")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, cwd=site, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_the_example_view_builds_a_textual_widget(site, workbench_run, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    import importlib

    plugin = importlib.import_module("workbench_activation_stats")
    from textual.widgets import DataTable

    from workbench.analysis import analyze

    [o] = analyze(workbench_run, [plugin.ANALYSIS])
    import asyncio

    from textual.app import App

    class Host(App):
        def compose(self):
            yield plugin.make_view(o.stored, workbench_run)

    async def show():
        app = Host()
        async with app.run_test(size=(100, 20)):
            table = app.query_one(DataTable)
            return table.row_count, table.get_row_at(1)[0]

    assert asyncio.run(show()) == (2, "blocks.1.hook_resid_post")
