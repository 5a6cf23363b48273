"""GGUF files and the converted-weights cache, on a real (tiny) GGUF written in llama.cpp's layout.

The oracle is the original Hugging Face model the GGUF was written from: after the GGUF round trip,
and after the cache round trip, logits must be bit-identical to it.
"""

from __future__ import annotations

import json
import os
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
