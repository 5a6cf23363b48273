"""The examples in examples/ run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_quickstart_on_tiny_model():
    out = _run("quickstart.py", "tiny-gpt2")
    assert "tiny-gpt2: decoder GPT2LMHeadModel, 2 layers" in out
    assert "residual-stream norm" in out


@pytest.mark.integration
def test_quickstart_on_default_model():
    out = _run("quickstart.py")
    assert "smollm2-135m: decoder LlamaForCausalLM, 30 layers, 9 query / 3 KV heads" in out
    assert "bos=tokenizer tokens=['The', ' capital', ' of', ' France', ' is'] -> ' Paris'" in out
    assert "bos=prepend   tokens=['<|im_start|>', 'The'" in out


def test_capture_dataset_example_on_tiny_model(tmp_path):
    out = _run("capture_dataset.py", "tiny-gpt2", str(tmp_path))
    assert "3 prompts" in out and "status complete" in out
    assert "[france]" in out and "'answer': ' Paris'" in out and "'topic': 'food'" in out
    assert (tmp_path / "dataset.h5").exists()


@pytest.mark.integration
def test_capture_dataset_example_on_default_model(tmp_path):
    out = _run("capture_dataset.py", "smollm2-135m", str(tmp_path))
    assert "[france]" in out and "top next-token id 7042" in out  # " Paris"


def test_docs_corpus_builds_english_prompts(tmp_path):
    import json

    out = _run("build_docs_corpus.py", "--out", str(tmp_path / "c.jsonl"), "--max-prompts", "12")
    assert "12 prompts (of " in out
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all({"id", "prompt", "source"} <= set(r) for r in rows)
    for r in rows:  # prose: sentences of words, no doctest or code lines
        text = r["prompt"]
        assert ">>>" not in text and "def " not in text[:4] and text.rstrip()[-1] in ".!?\")'"
        words = text.split()
        assert len(words) >= 8 and sum(w.strip(".,;:()\"'").isalpha() for w in words) / len(words) > 0.6
