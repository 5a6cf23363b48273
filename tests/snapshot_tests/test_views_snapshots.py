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
