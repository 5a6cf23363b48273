"""``workbench capture`` and ``workbench inspect`` from the command line: bad input is one line,
exit status 2, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="workbench")


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workbench: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def capture(tmp_path: Path, *args: str):
    return run("capture", "-m", "tiny-gpt2", *args)


@pytest.mark.parametrize("content, fragments", [
    ('{"prompt": "ok"}\n{"prompt": "broken\n', ["bad.jsonl line 2: invalid JSON"]),
    ('{"prompt": ""}\n', ["bad.jsonl line 1: empty prompt"]),
    ('{"text": "x"}\n', ["bad.jsonl line 1: no 'prompt' field"]),
    ('["x"]\n', ["bad.jsonl line 1: expected a JSON object"]),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', ["duplicate prompt id 'x'"]),
    ('{"prompt": "a", "answer": 3}\n', ["field 'answer' must be a string"]),
    ("\n\n", ["holds no prompts"]),
])
def test_bad_prompts_files(tmp_path, content, fragments):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "run.h5"
    one_line_error(capture(tmp_path, "--prompts", str(bad), "-o", str(out)), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_missing_prompts_file_and_empty_prompt(tmp_path):
    one_line_error(capture(tmp_path, "--prompts", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "r.h5")),
                   "prompts file not found")
    one_line_error(capture(tmp_path, "-p", "", "-o", str(tmp_path / "r.h5")), "prompt 1 (--prompt) is empty")
    one_line_error(capture(tmp_path, "-o", str(tmp_path / "r.h5")), "no prompts")
    one_line_error(capture(tmp_path, "-p", "x"), "--out RUN.h5 is required")
    assert list(tmp_path.iterdir()) == []


def test_unknown_hook_and_layer_out_of_range(tmp_path):
    one_line_error(capture(tmp_path, "-p", "x", "--hooks", "blocks.*.hook_nope", "-o", str(tmp_path / "r.h5")),
                   "matches no hook of tiny-gpt2")
    one_line_error(capture(tmp_path, "-p", "x", "--hooks", "blocks.2.hook_resid_post", "-o", str(tmp_path / "r.h5")),
                   "layer 2", "out of range", "layers 0-1")
    assert list(tmp_path.iterdir()) == []


def test_too_long_prompt_needs_truncate(tmp_path):
    out = tmp_path / "r.h5"
    one_line_error(capture(tmp_path, "-p", "y" * 700, "-o", str(out)), "takes at most 512", "--truncate")
    result = capture(tmp_path, "-p", "y" * 700, "-o", str(out), "--truncate")
    assert result.exit_code == 0, result.output
    assert "truncated to 512 tokens" in result.stderr


def test_existing_output_needs_overwrite_and_is_untouched(tmp_path):
    out = tmp_path / "r.h5"
    out.write_bytes(b"keep me")
    before = out.stat().st_mtime_ns
    one_line_error(capture(tmp_path, "-p", "x", "-o", str(out)), "exists; --overwrite")
    assert out.read_bytes() == b"keep me" and out.stat().st_mtime_ns == before
    one_line_error(capture(tmp_path, "-p", "x", "-o", str(out), "--overwrite", "--resume"), "exclude each other")
    partial = tmp_path / "s.h5.partial"
    partial.write_bytes(b"old")
    one_line_error(capture(tmp_path, "-p", "x", "-o", str(tmp_path / "s.h5")), "interrupted capture exists")
    assert partial.read_bytes() == b"old"


def test_output_folder_must_exist(tmp_path):
    one_line_error(capture(tmp_path, "-p", "x", "-o", str(tmp_path / "missing" / "r.h5")), "does not exist")


def test_dry_run_prints_hooks_and_estimate(tmp_path):
    result = capture(tmp_path, "-p", "hello", "--hooks", "residual", "--hooks", "attention", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "estimated size:" in result.output
    assert "blocks.0.hook_resid_post" in result.output and "(heads, query_pos, key_pos)" in result.output
    assert "= blocks.0.hook_out" in result.output  # aliases shown
    assert list(tmp_path.iterdir()) == []


def test_list_presets():
    result = run("capture", "--list-presets")
    assert result.exit_code == 0
    for preset in ("residual", "attention", "attention-full", "mlp", "lens", "all"):
        assert preset in result.output


def test_capture_then_inspect(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "answer": " x"}) for p in ("ab", "cde")))
    out = tmp_path / "r.h5"
    result = capture(tmp_path, "--prompts", str(prompts), "-p", "first", "-o", str(out),
                     "--dtype", "bfloat16", "--compression", "gzip")
    assert result.exit_code == 0, result.output
    info = json.loads(run("inspect", str(out), "--json").output)
    assert info["status"] == "complete" and info["prompts"] == 3 and info["storage_dtype"] == "bfloat16"
    assert [p["id"] for p in info["first_prompts"]] == ["p0", "p1", "p2"]
    assert info["first_prompts"][1]["metadata"] == {"answer": " x"}
    assert info["settings"]["compression"] == "gzip"
    text = run("inspect", str(out)).output
    assert "[complete]" in text and "3 of 3 committed" in text and "bfloat16" in text


def test_inspect_bad_files(tmp_path):
    one_line_error(run("inspect", str(tmp_path / "none.h5")), "no such run")
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("hello")
    one_line_error(run("inspect", str(not_hdf5)), "not a workbench run (not an HDF5 file)")
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    one_line_error(run("inspect", str(other)), "HDF5 file but not a workbench run")
    one_line_error(run("inspect", str(tmp_path)), "is a folder")


def test_inspect_damaged_run(tmp_path):
    out = tmp_path / "r.h5"
    assert capture(tmp_path, "-p", "hello world", "-o", str(out)).exit_code == 0
    data = out.read_bytes()
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(data[: len(data) // 3])
    one_line_error(run("inspect", str(damaged)), "damaged.h5")


def test_inspect_is_fast_and_imports_no_torch(tmp_path):
    out = tmp_path / "r.h5"
    assert capture(tmp_path, "-p", "hello", "-o", str(out)).exit_code == 0
    code = (
        "import sys\nfrom workbench.cli import cli\n"
        f"try:\n    cli.main(['inspect', {str(out)!r}], prog_name='workbench')\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY:' + ','.join(m for m in ('torch', 'transformer_lens') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ})
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY:"


def test_demo_captures_and_reads_back(tmp_path):
    out = tmp_path / "demo.h5"
    result = run("demo", "-m", "tiny-gpt2", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "next token at position" in result.output and "4 prompts" in result.output
    info = json.loads(run("inspect", str(out), "--json").output)
    assert info["prompts"] == 4 and info["first_prompts"][0]["metadata"]["answer"] == " Paris"
