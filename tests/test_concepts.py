"""Concepts made visible: Q·K·V step by step, vectors through the residual stream, residual norms
on a log scale with the attention sink off the scale, and plots that draw scores as scores.

The Q·K·V numbers are checked against what the model itself computed and stored (scores, pattern,
z), for every head and query position of every family: rotary and grouped-query (tiny Llama),
learned positions (tiny GPT-2), cross-attention and T5's position bias (tiny T5), a bidirectional
encoder whose bridge aliases the scores to the pattern (tiny BERT).
"""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

import workbench
from tests import widgets
from workbench.cli import cli
from workbench.errors import UserError
from workbench.store import open_run
from workbench.store.attention_steps import attention_blocks, is_scores_aliased, score_scale, steps
from workbench.store.depth import sink_position
from workbench.tui import make_app

SIZE = (80, 24)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("concepts")
    out = {}
    for name in ("tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-bert"):
        path = folder / f"{name}.h5"
        workbench.capture(tiny_models[name], ["the cat sat on the mat", "a b"], hooks=["attention-full", "residual"],
                          out=path, progress=False)
        out[name] = path
    return out


def _n_query(run, prefix):  # type: ignore[no-untyped-def]
    return run.n_tokens(0, run.resolve(f"{prefix}.hook_q").stream_of_rows())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-bert"])
def test_every_step_equals_the_stored_hooks(runs, name):
    with open_run(runs[name]) as run:
        blocks = attention_blocks(run)
        assert blocks
        checked = 0
        for prefix in blocks:
            n_heads = run.resolve(f"{prefix}.hook_q").feature_shape[0]
            pattern = run.activation(f"{prefix}.hook_pattern", 0)
            z = run.activation(f"{prefix}.hook_z", 0)
            for head in range(n_heads):
                for pos in range(_n_query(run, prefix)):
                    s = steps(run, 0, prefix, head, pos)
                    # against the stored tensors, read here independently of steps()
                    np.testing.assert_allclose(s.weights, pattern[head, pos], atol=1e-5)
                    np.testing.assert_allclose(s.z, z[pos, head], atol=1e-5)
                    assert s.weights.sum() == pytest.approx(1.0, abs=1e-6)
                    assert all(v <= 1e-5 for v in s.errors.values()), s.errors
                    if not is_scores_aliased(run, prefix):
                        scores = run.activation(f"{prefix}.hook_attn_scores", 0)[head, pos]
                        keep = ~s.masked
                        np.testing.assert_allclose(s.scores[keep], scores[keep], atol=1e-5)
                    checked += 1
        assert checked > 20


def test_rotary_needs_the_rotated_queries_and_gqa_reads_the_shared_head(runs):
    with open_run(runs["tiny-llama"]) as run:
        prefix = "blocks.1.attn"
        s = steps(run, 0, prefix, 3, 5)
        assert s.q_hook.endswith("hook_rot_q") and s.kv_head == 1 and s.n_kv_heads == 2
        assert any("RoPE" in n for n in s.notes)
        # the plain hook_q / hook_k (before the rotation) do not give the stored scores
        q = run.activation(f"{prefix}.hook_q", 0)[5, 3].astype(np.float64)
        k = run.activation(f"{prefix}.hook_k", 0)[:6, 1].astype(np.float64)
        stored = run.activation(f"{prefix}.hook_attn_scores", 0)[3, 5, :6]
        assert np.abs(k @ q / math.sqrt(16) - stored).max() > 1e-3
        # by hand from the rotated ones: q·k / sqrt(d_head), masked beyond the query
        q = run.activation(f"{prefix}.hook_rot_q", 0)[5, 3].astype(np.float64)
        k = run.activation(f"{prefix}.hook_rot_k", 0)[:, 1].astype(np.float64)
        np.testing.assert_allclose((k @ q / 4.0)[:6], stored, atol=1e-5)
        assert s.masked.tolist() == [False] * 6 + [True] * (len(s.masked) - 6)
        assert np.isneginf(s.scores[6:]).all()


def test_t5_has_no_scaling_and_a_position_bias_cross_attention_no_mask(runs):
    with open_run(runs["tiny-t5"]) as run:
        assert score_scale(run)[0] == 1.0
        enc = steps(run, 0, "encoder_blocks.0.attn", 0, 2)
        assert enc.bias is not None and not enc.masked.any()
        cross = steps(run, 0, "decoder_blocks.0.cross_attn", 1, 0)
        assert not cross.masked.any() and len(cross.key_tokens) == run.n_tokens(0)
        dec = steps(run, 0, "decoder_blocks.0.self_attn", 0, 0)
        assert dec.masked[1:].all()


def test_aliased_scores_are_said_and_missing_hooks_refused(runs, tmp_path, tiny_models):
    with open_run(runs["tiny-bert"]) as run:
        assert is_scores_aliased(run, "blocks.0.attn")
        s = steps(run, 0, "blocks.0.attn", 0, 0)
        assert "scores" not in s.errors and any("alias" in n for n in s.notes)
    path = tmp_path / "plain.h5"
    workbench.capture(tiny_models["tiny-llama"], ["a b c"], hooks=["blocks.*.attn.hook_q", "blocks.*.attn.hook_k",
                      "blocks.*.attn.hook_v"], out=path, progress=False)
    with open_run(path) as run, pytest.raises(UserError, match="rotates queries and keys"):
        steps(run, 0, "blocks.0.attn", 0, 0)


def _view_text(app, name):  # type: ignore[no-untyped-def]
    w = app.view_widget(name)
    return widgets.plain(w, width=w.content_size.width)


def test_qkv_and_vectors_views_at_80x24(runs):
    app = make_app([str(runs["tiny-llama"])])

    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("6", "right", "right", "right", "right_square_bracket", "full_stop", "shift+right")
            await pilot.pause()
            qkv = (_view_text(app, "qkv"), app.view_widget("qkv").readout())
            await pilot.press("7", "shift+right", "shift+right")
            await pilot.pause()
            vec = (_view_text(app, "vectors"), app.view_widget("vectors").readout())
            return qkv, vec

    (qkv_text, qkv_readout), (vec_text, vec_readout) = asyncio.run(main())
    with open_run(runs["tiny-llama"]) as run:
        s = steps(run, 0, "blocks.1.attn", 1, 3)
        resid = run.activation("hook_embed", 0)[3]
    assert "blocks.1.attn" in qkv_text and "head 1/3" in qkv_text and "✓ equal within 1e-5" in qkv_text
    assert "÷ √d_head" in qkv_text and "−∞" in qkv_text
    assert f"q·k {s.dots[1]:+.4f}" in qkv_readout and f"weight {s.weights[1]:.4f}" in qkv_readout
    assert "row" in vec_text and "of W_E" in vec_text
    assert f"dim 3 = {resid[3]:+.5g}" in vec_readout  # the key cursor (1) moved on by 2


def test_residual_view_log_scale_and_sink_toggle(runs):
    app = make_app([str(runs["tiny-llama"])])

    async def main():  # type: ignore[no-untyped-def]
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("2")
            await pilot.pause()
            first = _view_text(app, "residual")
            await pilot.press("l", "x")
            await pilot.pause()
            return first, _view_text(app, "residual")

    first, second = asyncio.run(main())
    assert "log scale" in first and "sink" not in first  # random weights: no sink
    assert "linear scale" in second and "sink 0 off scale" in second


def test_sink_detection():
    decoder = SimpleNamespace(family="decoder")
    norms = np.full((5, 8), 250.0)
    norms[0] = 1.0  # the embedding
    norms[1:, 0] = 22_600.0
    assert sink_position(decoder, norms)
    norms[1:, 0] = 400.0
    assert not sink_position(decoder, norms)
    norms[1:, 0] = 22_600.0
    assert not sink_position(SimpleNamespace(family="encoder"), norms)


def test_plot_draws_scores_as_scores_and_says_when_they_are_the_pattern(runs, tmp_path, monkeypatch):
    import workbench.plot as P

    figures = []
    monkeypatch.setattr(P, "_save", lambda fig, out: figures.append(fig))
    with open_run(runs["tiny-gpt2"]) as run:
        notes = P.plot_attention(run, 0, str(tmp_path / "a.png"), hook="blocks.0.attn.hook_attn_scores")
        image = figures[-1].axes[0].images[0]
        assert not notes and image.norm.vmin < 0 and "score" in figures[-1].axes[1].get_ylabel()
        stored = run.activation("blocks.0.attn.hook_attn_scores", 0)[0]
        assert image.norm.vmax == pytest.approx(float(stored[stored > -1e30].max()))
    with open_run(runs["tiny-bert"]) as run:
        notes = P.plot_attention(run, 0, str(tmp_path / "b.png"), hook="blocks.0.attn.hook_attn_scores")
        assert "aliases" in notes[0] and figures[-1].axes[1].get_ylabel() == "attention weight"
    r = CliRunner().invoke(cli, ["plot", str(runs["tiny-llama"]), "--kind", "residual", "--sink", "skip",
                                 "-o", str(tmp_path / "r.png")])
    assert r.exit_code == 0 and "position 0 left out of the colour scale" in r.output
    assert "(log scale)" in figures[-1].axes[1].get_ylabel()
