"""Live prompts in the terminal UI: type a prompt, the app (holding the model, loaded once in a
background thread) captures it and shows it in every view; sampling is stepped token by token.

Checked against the model itself: the live run's tokens are the model's tokenization of the typed
text, its stored top-k equals the model's own softmax, and a greedy step appends the argmax.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

import workbench
from workbench.store import open_run
from workbench.tui import make_app

SIZE = (80, 24)


async def _wait(app, pilot, timeout=120.0):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    while app.last_live_seconds is None:
        assert time.perf_counter() - started < timeout, "the live prompt did not finish"
        await pilot.pause(0.05)
    seconds, app.last_live_seconds = app.last_live_seconds, None
    return seconds


def test_live_prompt_and_token_by_token_sampling(tmp_path, tiny_models):
    model = tiny_models["tiny-llama"]
    base = tmp_path / "base.h5"
    workbench.capture(model, ["hello"], hooks=["attention", "residual"], out=base, progress=False)
    app = make_app([str(base)], live_dir=tmp_path / "live")
    text = "the cat sat"

    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("e")
            await pilot.pause()
            await pilot.press(*text, "enter")
            first = await _wait(app, pilot)
            run = app.active_run
            shown = {"path": run.final_path, "tokens": run.tokens(0).tolist(), "runs": len(app.runs),
                     "attention": app.view_widget("attention").readout()}
            await pilot.press("3")
            await pilot.pause()
            shown["topk"] = app.view_widget("topk").readout()
            for _ in range(3):  # 1.0 -> 1.5 -> 2.0 -> 0 (greedy)
                await pilot.press("t")
                await _wait(app, pilot)
            await pilot.press("greater_than_sign")
            await _wait(app, pilot)
            shown["greedy"] = app.active_run.tokens(0).tolist()
            shown["n_input"] = app.active_run.n_input_tokens(0)
            shown["state"] = app.live.describe()
            shown["runs_after"] = len(app.runs)
            return first, shown

    first, shown = asyncio.run(main())
    assert shown["path"].parent == tmp_path / "live" and shown["runs"] == 2
    ids = model.tokenize(text)
    assert shown["tokens"] == ids
    assert "query" in shown["attention"]
    # the stored top-k probabilities are the model's own softmax at the last prompt position
    with torch.no_grad():
        logits = model.bridge(torch.tensor([ids]))[0, -1].double()
    probs = torch.softmax(logits, -1).numpy()
    top = int(np.argmax(probs))
    assert f"{probs[top]:.4f}" in shown["topk"]
    # greedy step: the prompt plus the argmax, in the same live run (replaced, not added)
    assert shown["greedy"] == [*ids, top] and shown["n_input"] == len(ids)
    assert shown["state"].startswith("live · +1 sampled (greedy)") and shown["runs_after"] == 2
    with open_run(shown["path"]) as run:
        assert run.has_generation
    assert first < 60


def test_live_prompt_needs_text_first(tmp_path, tiny_models):
    base = tmp_path / "base.h5"
    workbench.capture(tiny_models["tiny-gpt2"], ["hello"], hooks=["residual"], out=base, progress=False)
    app = make_app([str(base)], live_dir=tmp_path / "live")

    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("greater_than_sign")
            await pilot.pause()
            return [n.message for n in app._notifications]

    assert any("type a prompt first" in m for m in asyncio.run(main()))
