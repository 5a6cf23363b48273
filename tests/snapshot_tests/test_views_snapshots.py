"""Snapshots of each view at 80x24 (pytest-textual-snapshot). The run is synthetic and seeded
(:mod:`workbench.store.synthetic`), so the pictures depend on no model's numerics; the cursor
does not blink in Textual's test mode. After an intended change of the UI, review and refresh:

    .venv/bin/python -m pytest tests/snapshot_tests --snapshot-update
"""

from __future__ import annotations

import pytest

from workbench.store.synthetic import write_synthetic_run
from workbench.tui import make_app


@pytest.fixture
def run_path(tmp_path):
    path = write_synthetic_run(tmp_path / "syn.h5", n_prompts=6, n_layers=3, n_heads=4,
                               lengths=(6, 24), seed=7)
    return path


@pytest.mark.parametrize("view, keys", [
    ("attention", ["right", "right", "right", "shift+right", "right_square_bracket", "full_stop"]),
    ("residual", ["right", "right", "right_square_bracket"]),
    ("topk", ["right", "right", "right", "right"]),
    ("info", []),
    ("vectors", ["right", "right", "shift+right", "right_square_bracket"]),
])
def test_view(snap_compare, run_path, view, keys):
    assert snap_compare(make_app([str(run_path)], view=view), press=keys, terminal_size=(80, 24))


def test_token_ids_and_second_prompt(snap_compare, run_path):
    assert snap_compare(make_app([str(run_path)]), press=["down", "i", "right"], terminal_size=(80, 24))


def test_results_generic_view(snap_compare, run_path):
    import workbench
    from workbench.registries import analyze, build_analyses

    with workbench.open_run(run_path) as run:
        analyze(run, [build_analyses().get("next-token")])
    assert snap_compare(make_app([str(run_path)], view="results"), terminal_size=(80, 24))


def test_help_screen(snap_compare, run_path):
    assert snap_compare(make_app([str(run_path)]), press=["question_mark"], terminal_size=(80, 24))


def test_large_terminal(snap_compare, run_path):
    assert snap_compare(make_app([str(run_path)]), press=["G"], terminal_size=(140, 40))


def test_feature_dashboard(snap_compare, tmp_path, monkeypatch):
    """The SAE feature dashboard (plugins/features_view.py) of a synthetic run whose activations
    are sparse sums of known directions, encoded by an SAE built from those directions (a SAELens
    folder written here: no training, so no numerics of an optimiser in the picture)."""
    import numpy as np
    from workbench_plugins.features_view import FeaturesView
    from workbench_plugins.sae_format import SAE

    import workbench
    from workbench.registries import analyze, build_analyses
    from workbench.store.synthetic import PlantedDictionary, random_directions

    hook = "blocks.0.hook_resid_post"
    d = random_directions(64, 32, 1)
    path = write_synthetic_run(tmp_path / "syn.h5", n_prompts=40, n_layers=1, n_heads=1, d_model=32,
                               lengths=(8, 12), seed=7, planted=PlantedDictionary(d, hook=hook), batch_size=20)
    SAE("topk", W_enc=d.T.copy(), b_enc=np.zeros(64, np.float32), W_dec=d.copy(), b_dec=np.zeros(32, np.float32),
        k=3, hook_name=hook).save(tmp_path / "planted-sae")
    monkeypatch.chdir(tmp_path)  # the result's parameters name ./planted-sae, the same in every run
    with workbench.open_run(path) as run:
        [out] = analyze(run, [build_analyses().get("features")], {"features": {"sae": "./planted-sae"}})
        assert out.ok, out.stored.error

    async def focus_view(pilot):  # the focused token moves, then the view takes the keys
        for key in ("right", "right", "right"):
            await pilot.press(key)
        await pilot.pause()
        pilot.app.query_one(FeaturesView).focus()

    assert snap_compare(make_app([str(path)], view="results"), press=["down", "enter"], run_before=focus_view,
                        terminal_size=(80, 24))
