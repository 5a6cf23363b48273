"""The embedding and unembedding matrices themselves (plugins/matrices.py and its view).

Ground truth: the Hugging Face module's own weight matrices (``get_input_embeddings().weight``,
``get_output_embeddings().weight`` and its bias) and the bridge's ``W_E`` / ``W_U``, read here
independently of the analysis; dot products and cosines recomputed with numpy in float64; tied
or not from the weights themselves (tiny-gpt2 ties its embeddings, tiny-llama does not).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from workbench_plugins import matrices as M

import workbench
from tests.widgets import plain
from workbench.capturing.prompts import Prompt
from workbench.errors import UserError
from workbench.registries import analyze, build_analyses

PROMPTS = ["abba cab", "zzy"]


def _capture(model, path, prompts=PROMPTS):
    items = [Prompt(text=t, id=f"p{i}") for i, t in enumerate(prompts)]
    workbench.capture(model, items, hooks=["blocks.0.hook_resid_pre"], out=path, progress=False)
    return workbench.open_run(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """{name: (run, model)} for an untied (tiny-llama) and a tied (tiny-gpt2) model."""
    out = {}
    for name in ("tiny-llama", "tiny-gpt2"):
        model = tiny_models[name]
        out[name] = (_capture(model, tmp_path_factory.mktemp(name) / "run.h5"), model)
    yield out
    for run, _ in out.values():
        run.close()


def _matrices(run, model, **params):
    [out] = analyze(run, [build_analyses().get("matrices")], {"matrices": params}, model=model, force=True)
    assert out.ok, out.stored.error
    return out.stored


def _hf(model):
    hf = model.bridge.original_model
    return (hf.get_input_embeddings().weight.detach().double().numpy(),
            hf.get_output_embeddings().weight.detach().double().numpy())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_rows_and_columns_equal_the_models_own_matrices(runs, name):
    run, model = runs[name]
    stored = _matrices(run, model)
    d, a = stored.data, stored.arrays
    want = list(dict.fromkeys(int(t) for t in run.tokens(0)))  # distinct, first seen first, BOS included
    assert [t["id"] for t in d["tokens"]] == want and d["source"] == "prompt 0"
    assert want[0] == 1 and d["tokens"][0]["token"] == "<bos>"
    assert [t["token"] for t in d["tokens"]] == list(dict.fromkeys(run.str_tokens(0)))
    np.testing.assert_array_equal(a["ids"], want)
    w_e, w_u = _hf(model)  # (d_vocab, d_model) each: the HF lm_head weight is W_U transposed
    np.testing.assert_allclose(a["embed"], w_e[want], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["unembed"], w_u[want], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["embed"], model.bridge.W_E.detach().double().numpy()[want], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["unembed"], model.bridge.W_U.detach().double().numpy()[:, want].T, rtol=0, atol=1e-6)
    assert d["shapes"] == {"W_E": [w_e.shape[0], w_e.shape[1]], "W_U": [w_u.shape[1], w_u.shape[0]]}
    assert d["tied"] == (name == "tiny-gpt2") == bool(np.array_equal(w_e, w_u))
    assert d["tied"] == model.info.tied_embeddings
    assert not d["has_bias"] and "unembed_bias" not in a  # neither has a bias on its LM head
    for m, w in (("embed", w_e), ("unembed", w_u)):
        x = w[want]
        np.testing.assert_allclose(a[f"{m}_norm"], np.sqrt((x * x).sum(1)), rtol=1e-6)
        np.testing.assert_allclose(a[f"{m}_dot"], x @ x.T, rtol=1e-6, atol=1e-9)
        n = np.linalg.norm(x, axis=1)
        np.testing.assert_allclose(a[f"{m}_cosine"], (x @ x.T) / np.outer(n, n), rtol=0, atol=1e-6)
    if not d["tied"]:
        assert not np.allclose(a["embed_cosine"], a["unembed_cosine"])
    text = build_analyses().get("matrices").text(stored.result())
    assert f"W_E {w_e.shape[0]} x {w_e.shape[1]} (d_vocab x d_model)" in text
    assert ("tied: yes" if d["tied"] else "tied: no, two matrices") in text
    k = [t["id"] for t in d["tokens"]].index(model.tokenizer("a", add_special_tokens=False)["input_ids"][0])
    assert "  ".join(["'a'", " ".join(f"{v:+.4f}" for v in a["embed"][k][:8])]) in text
    assert "cosine between the tokens' W_E rows" in text and f"{a['embed_cosine'][0, 1]:+8.2f}" in text
    assert ("cosine between the tokens' W_U columns" in text) == (not d["tied"])


def test_named_words_prompt_choice_and_the_cap(runs):
    run, model = runs["tiny-llama"]
    d = _matrices(run, model, tokens="z, a, z , b", space=False).data
    ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "zab"]
    assert [t["id"] for t in d["tokens"]] == ids and d["source"] == "tokens"
    assert [t["word"] for t in d["tokens"]] == ["z", "a", "b"]
    stored = _matrices(run, model, prompt=1, max_tokens=2)
    assert [t["id"] for t in stored.data["tokens"]] == [int(t) for t in run.tokens(1)[:2]]
    assert stored.arrays["embed"].shape == (2, 64) and stored.arrays["embed_cosine"].shape == (2, 2)
    assert any("the first 2 of 3 distinct tokens" in n for n in stored.data["notes"])


def test_user_errors(runs, tmp_path):
    run, model = runs["tiny-llama"]
    mats = build_analyses().get("matrices")
    with pytest.raises(UserError, match=r"^matrices: 'abc' is 3 tokens \('a', 'b', 'c'\), not one"):
        analyze(run, [mats], {"matrices": {"tokens": "a, abc", "space": False}}, model=model)
    with pytest.raises(UserError, match=r"prompt 7 is not in the run \(it has 2 prompts\)"):
        analyze(run, [mats], {"matrices": {"prompt": 7}}, model=model)
    # a word-level vocabulary: a word it lacks is one clear line on the command line, exit 2
    toy = workbench.load_model("toy-induction", device="cpu", progress=False)
    toy_run = _capture(toy, tmp_path / "toy.h5", ["a b c a b c"])
    with pytest.raises(UserError, match="'zebra' is not in the vocabulary"):
        analyze(toy_run, [mats], {"matrices": {"tokens": "a, zebra"}}, model=toy)
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "analyze", str(toy_run.final_path), "matrices",
                        "--param", "matrices.tokens=a,zebra"], capture_output=True, text=True, check=False,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    toy_run.close()
    errors = [line for line in r.stderr.splitlines() if not line.startswith("workbench: reloading")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    want = ("workbench: error: matrices: 'zebra' is not in the vocabulary (the tokenizer maps it to '<pad>'); "
            "give words of one token each: --param matrices.tokens=...")
    assert errors == [want], r.stderr


def test_a_trained_unembedding_bias_is_stored(tmp_path):
    """tiny-bert's MLM head has a bias (zero at initialisation: made non-zero here, before the
    capture, so the run records these weights)."""
    model = workbench.load_model("tiny-bert", device="cpu", progress=False)
    bias = model.bridge.original_model.get_output_embeddings().bias
    with torch.no_grad():
        bias.copy_(torch.linspace(-1, 1, bias.shape[0]))
    run = _capture(model, tmp_path / "bert.h5", ["ab"])
    stored = _matrices(run, model)
    d, a = stored.data, stored.arrays
    ids = [int(t) for t in run.tokens(0)]  # [CLS] a b [SEP]
    assert d["has_bias"] and [t["id"] for t in d["tokens"]] == ids
    np.testing.assert_allclose(a["unembed_bias"], bias.detach().double().numpy()[ids], rtol=0, atol=1e-7)
    assert "unembedding bias: yes" in build_analyses().get("matrices").text(stored.result())
    run.close()


def test_an_encoder_without_a_trained_head_stores_w_e_only(tmp_path):
    model = workbench.load_model("minilm-l6", device="cpu", progress=False)
    run = _capture(model, tmp_path / "minilm.h5", ["Paris is nice"])
    stored = _matrices(run, model)
    d, a = stored.data, stored.arrays
    assert d["matrices"] == ["embed"] and d["shapes"]["W_U"] is None and not d["tied"]
    assert "unembed" not in a and "unembed_cosine" not in a
    assert any("no trained unembedding" in n and "random" in n for n in d["notes"])
    w_e = model.bridge.original_model.get_input_embeddings().weight.detach().double().numpy()
    np.testing.assert_allclose(a["embed"], w_e[[t["id"] for t in d["tokens"]]], rtol=0, atol=1e-6)
    text = build_analyses().get("matrices").text(stored.result())
    assert "no W_U (no trained unembedding)" in text and "W_U columns" not in text
    run.close()


def _app_view(run, keys=(), tokens=None):
    """The matrix-slice view in the app at 80 x 24: what it shows after ``keys`` (pressed with the
    view focused), and its width."""
    from workbench_plugins.matrices_view import MatrixSliceView

    from workbench.tui import make_app

    app = make_app([str(run.final_path)], view="results")

    async def main():
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(3):
                await pilot.pause()
            view = app.query_one(MatrixSliceView)
            shots = {"start": plain(view, width=view.size.width)}
            if tokens is not None:  # move the app's focus token first (the view follows it)
                app.query_one("#prompts").focus()
                for _ in range(tokens):
                    await pilot.press("right")
                await pilot.pause()
                shots["followed"] = plain(view, width=view.size.width)
            view.focus()
            for k in keys:
                await pilot.press(k)
            await pilot.pause()
            shots["end"] = plain(view, width=view.size.width)
            return shots, view.size.width, view.parent.content_region.height, view.row, view.dim

    return asyncio.run(main())


def test_view_at_80x24_reads_out_the_cursor_cell_and_follows_the_focus(runs):
    run, model = runs["tiny-llama"]
    for stale in run.final_path.parent.glob("run.h5.results/*"):  # only this result beside the run
        stale.unlink()
    stored = _matrices(run, model)
    a, toks = stored.arrays, stored.data["tokens"]
    keys = ("down", "right", "right", "right", "left", "right", "right", "up", "down")  # row 1, dim 4
    shots, width, height, row, dim = _app_view(run, keys, tokens=3)
    assert 24 <= width <= 60 and height <= 17, (width, height)  # the results panel's body
    start = shots["start"]
    assert f"W_E[1 '<bos>', dim 0] = {a['embed'][0, 0]:+.4f}" in start
    assert "W_E rows · 263×64 · untied" in start and "cosine of the W_E rows" in start
    assert f"norm {a['embed_norm'][0]:.4g}" in start
    # the app's focus moved to position 3 (the second 'b' of <bos> a b b a): the cursor followed
    focused = int(run.tokens(0)[3])
    k = [t["id"] for t in toks].index(focused)
    assert f"W_E[{focused} '{toks[k]['token']}', dim 0] = {a['embed'][k, 0]:+.4f}" in shots["followed"]
    r = (k + 1) % len(toks)
    assert (row, dim) == (r, 4)
    t = toks[r]
    assert f"W_E[{t['id']} '{t['token']}', dim 4] = {a['embed'][r, 4]:+.4f}" in shots["end"]
    for text in shots.values():
        lines = text.rstrip("\n").splitlines()
        assert len(lines) <= height and all(len(line.rstrip()) <= width for line in lines), text
    assert f"{a['embed_cosine'][0, 1]:+.2f}" in start
    # m: the unembedding, read out as W_U[dim, token]
    shots, *_ = _app_view(run, ("m",))
    assert f"W_U[dim 0, 1 '<bos>'] = {a['unembed'][0, 0]:+.4f}" in shots["end"]
    assert "cosine of the W_U columns" in shots["end"]


def test_view_of_a_tied_model_shows_one_matrix(runs):
    from workbench_plugins.matrices_view import MatrixSliceView

    run, model = runs["tiny-gpt2"]
    stored = _matrices(run, model)
    view = MatrixSliceView(stored, run)
    assert view.shown_matrices() == ["embed"]
    view.action_matrix()
    assert view.matrix == "embed"
    text = plain(type("W", (), {"content": view.draw()})(), width=55)
    assert "tied: W_U = W_Eᵀ, one matrix" in text
    assert f"W_E[1 '<bos>', dim 0] = {stored.arrays['embed'][0, 0]:+.4f}" in text
    assert M.MATRICES_ANALYSIS.needs_model
