"""A pytest plugin for people writing workbench plugins (loaded through the ``pytest11`` entry
point whenever workbench is installed).

Fixtures:

``workbench_tiny_model``
    A tiny randomly initialised GPT-2 style decoder (2 layers, d_model 64, byte tokenizer),
    loaded once per test session on the CPU. Nothing is downloaded.
``workbench_make_run``
    A function ``make(prompts=..., hooks=("residual", "attention"), model=None, **capture_kwargs)``
    that captures a run into the test's temporary folder and returns it opened
    (``workbench.Run``). Prompts may be strings or dicts with ``prompt``, ``answer``, ``wrong``...
``workbench_run``
    A run made by ``workbench_make_run()`` with its defaults: three short prompts (two with an
    ``answer`` and a ``wrong``), residual stream and attention patterns.
``workbench_register_plugin``
    A function ``register(plugin, name=None)`` that registers a plugin object (or module) in
    every plugin manager built during this test, so ``workbench.registries.build_analyses()``, the
    command line (through ``workbench.cli.main``) and ``analyze`` see it. Undone after the test.

Importing this module imports neither torch nor TransformerLens; the fixtures do when used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

DEFAULT_PROMPTS: tuple[dict[str, str], ...] = (
    {"id": "france", "prompt": "The capital of France is", "answer": " Paris", "wrong": " London"},
    {"id": "ioi", "prompt": "When Mary and John went to the store, John gave a drink to",
     "answer": " Mary", "wrong": " John"},
    {"id": "count", "prompt": "one two three four"},
)


@pytest.fixture(scope="session")
def workbench_tiny_model() -> Any:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from workbench.registries import load_model

    return load_model("tiny-gpt2", device="cpu", progress=False)


@pytest.fixture
def workbench_make_run(tmp_path: Any, workbench_tiny_model: Any) -> Callable[..., Any]:
    from workbench.capturing.prompts import Prompt
    from workbench.registries import capture
    from workbench.store import open_run
    from workbench.store.schema import default_prompt_id

    counter = [0]

    def make(prompts: Any = DEFAULT_PROMPTS, hooks: Any = ("residual", "attention"),
             model: Any = None, **kwargs: Any) -> Any:
        items = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                items.append(Prompt(text=p, id=default_prompt_id(i)))
            else:
                meta = {k: v for k, v in p.items() if k not in ("prompt", "id")}
                items.append(Prompt(text=p["prompt"], id=p.get("id", default_prompt_id(i)), metadata=meta))
        counter[0] += 1
        out = tmp_path / f"run{counter[0]}.h5"
        kwargs.setdefault("progress", False)
        capture(model or workbench_tiny_model, items, hooks=list(hooks), out=out, **kwargs)
        return open_run(out)

    return make


@pytest.fixture
def workbench_run(workbench_make_run: Callable[..., Any]) -> Iterator[Any]:
    run = workbench_make_run()
    yield run
    run.close()


@pytest.fixture
def workbench_register_plugin() -> Iterator[Callable[..., None]]:
    from workbench.plugins import extra_plugins

    with contextlib.ExitStack() as stack:

        def register(plugin: object, name: str | None = None) -> None:
            label = name or getattr(plugin, "__name__", None) or f"test-plugin-{id(plugin):x}"
            stack.enter_context(extra_plugins((label, plugin)))

        yield register
