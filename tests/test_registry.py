"""Model names: registration through plugins, resolution, and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench import hookimpl
from workbench.errors import ModelNotFound, ModelUnavailable, UserError
from workbench.models import ModelSource
from workbench.models.sources import resolve
from workbench.registries import build_registry, load_model
from workbench.models.registry import LoadedParts, Provenance
from workbench.plugins import make_plugin_manager


def _dummy_source(name: str, **kw) -> ModelSource:
    def load(request):
        raise AssertionError("not loaded in this test")

    return ModelSource(name=name, description="test", family="decoder", load=load, **kw)


def test_builtin_and_entry_point_sources_are_registered():
    registry = build_registry()
    by_name = {s.name: s for s in registry}
    for name in ("smollm2-135m", "gemma3-270m", "minilm-l6"):
        assert by_name[name].plugin == "workbench.builtin_models"
    # Our tiny models come through the entry-point group, like any third-party plugin.
    for name in ("tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"):
        assert by_name[name].plugin == "tiny_models"
    assert not by_name["minilm-l6"].has_lm_head


def test_aliases_resolve():
    registry = build_registry()
    assert resolve("smollm2", registry).name == "smollm2-135m"
    assert resolve("default", registry).name == "smollm2-135m"


def test_unknown_name_suggests_close_matches():
    registry = build_registry()
    with pytest.raises(ModelNotFound, match="did you mean smollm2-135m"):
        resolve("smollm2-135", registry)
    with pytest.raises(ModelNotFound, match="unknown model 'qwerty'"):
        resolve("qwerty", registry)


def test_paths_resolve_to_file_and_folder_sources(tmp_path: Path):
    registry = build_registry()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf), registry).origin == "local GGUF file"
    assert resolve(str(tmp_path), registry).origin == "local folder"
    with pytest.raises(UserError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"), registry)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(UserError, match="is not a model"):
        resolve(str(other), registry)
    assert resolve("some-org/some-model", registry).origin.startswith("Hugging Face")
    assert resolve("hf:gpt2", registry).name == "gpt2"


def test_folder_without_config_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set.*local folder"):
        load_model("workbench-test/does-not-exist", device="cpu")


class _Plugin:
    def __init__(self, *sources: ModelSource) -> None:
        self.sources = sources

    @hookimpl
    def register_models(self, register):
        for s in self.sources:
            register(s)


def test_duplicate_names_are_rejected_naming_both_plugins():
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(_Plugin(_dummy_source("smollm2-135m")), name="copycat")
    with pytest.raises(UserError, match="workbench.builtin_models.*copycat|copycat.*workbench.builtin_models"):
        build_registry(pm)


def test_a_plugin_may_take_fewer_arguments():
    class NoArgs:
        @hookimpl
        def register_models(self):
            pass

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(NoArgs(), name="noargs")
    assert len(build_registry(pm)) == 3


def test_a_failing_plugin_is_reported_and_the_rest_still_register(capsys, monkeypatch):
    monkeypatch.delenv("WORKBENCH_STRICT_PLUGINS", raising=False)

    class Broken:
        @hookimpl
        def register_models(self, register):
            raise RuntimeError("boom")

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(Broken(), name="broken")
    registry = build_registry(pm)
    assert registry.get("smollm2-135m") is not None
    assert "plugin 'broken': failed in register_models (RuntimeError: boom)" in capsys.readouterr().err
    monkeypatch.setenv("WORKBENCH_STRICT_PLUGINS", "1")
    with pytest.raises(RuntimeError, match="boom"):
        build_registry(pm)


def test_unavailable_source_says_why_and_how_to_fix():
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(
        _Plugin(_dummy_source("needs-pkg", check=lambda: "package foo is not installed (pip install foo)")),
        name="needs",
    )
    with pytest.raises(ModelUnavailable, match="needs-pkg is not available here: package foo .*pip install foo"):
        load_model("needs-pkg", registry=build_registry(pm), device="cpu")


def test_a_third_party_source_loads_through_the_same_api():
    from workbench_plugins.tiny_models import build_hf_model

    def load(request):
        hf, tok, folder = build_hf_model("gpt2")
        return LoadedParts(provenance=Provenance(source="test", location="here"),
                           hf_model=hf, tokenizer=tok, tokenizer_path=str(folder))

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(_Plugin(ModelSource(name="my-model", description="mine", family="decoder",
                                    load=load, default_bos="none")), name="mine")
    model = load_model("my-model", registry=build_registry(pm), device="cpu", progress=False)
    assert model.info.provenance.location == "here"
    assert model.info.bos.policy == "none" and model.info.bos.prefix == ()
    assert model.predict("abc", k=1).top
