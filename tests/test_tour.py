"""``workbench tour``: every step walked at 80x24 on runs prepared with the tiny models (the real
tour uses SmolLM2, MiniLM and toy-reversal; the steps and the app are the same), each step showing
its view with numbers from the run."""

from __future__ import annotations

import asyncio
import re

import pytest
from click.testing import CliRunner

from workbench.cli import cli
from workbench.tui.results import ResultsPanel
from workbench.tui.tour import STEPS, make_tour_app, prepare

SIZE = (80, 24)


@pytest.fixture(scope="module")
def tour_runs(tmp_path_factory, tiny_models):
    return prepare(tmp_path_factory.mktemp("tour"), decoder="tiny-llama", encoder="tiny-bert",
                   seq2seq="tiny-t5")


def test_every_step_shows_its_view_with_numbers(tour_runs):
    app = make_tour_app(tour_runs)

    async def main():  # type: ignore[no-untyped-def]
        seen = []
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.3)
            for k in range(len(STEPS)):
                await pilot.pause(0.2)
                caption = str(app.query_one("#tour").render())
                view = app.active_view()
                if view == "results":
                    panel = app.query_one(ResultsPanel)
                    shown = [type(w).__name__ for w in panel.query(".result-view")]
                    selected = panel.entries[panel.shown][0].analysis if panel.shown is not None else None
                    seen.append((k, caption, view, app.active_run.final_path.name, selected, shown))
                else:
                    seen.append((k, caption, view, app.active_run.final_path.name,
                                 app.view_widget().readout(), None))
                await pilot.press("space")
            await pilot.press("backspace")
            await pilot.pause(0.2)
            seen.append(app.step)
        return seen

    seen = asyncio.run(main())
    assert seen.pop() == len(STEPS) - 2
    for (k, caption, view, run, readout, shown), step in zip(seen, STEPS):
        assert step.title in caption and f"({k + 1}/{len(STEPS)})" in caption
        assert view == step.view
        assert run == f"tour-{step.run}.h5"
        if view == "results":
            assert readout == step.result and shown, (k, readout, shown)
        elif view != "info":
            assert re.search(r"\d\.\d{3}", readout), (k, readout)
    # the encoder step is bidirectional attention; the last step is cross-attention
    assert any("tour-encoder" in s[3] for s in seen)


def test_tour_command_opens_on_a_step(tour_runs, monkeypatch):
    import workbench.tui.tour as T

    opened = {}
    monkeypatch.setattr(T.TourApp, "run", lambda self: opened.setdefault("step", self.step))
    r = CliRunner().invoke(cli, ["tour", "--dir", str(tour_runs.folder), "--step", "4"])
    assert r.exit_code == 0, r.output
    assert opened["step"] == 3
    r = CliRunner().invoke(cli, ["tour", "--dir", str(tour_runs.folder), "--step", "0"])
    assert r.exit_code == 2
