"""Attention analyses (plugins/attention.py): head roles, where a token looks, mechanics checks.

Checked against hand calculations, TransformerLens' own head detector, and two trained toy models
whose mechanism is known: an induction circuit (the top induction head's removal must break
in-context repetition) and a sequence reverser (its cross-attention must follow the reversal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from workbench_plugins import attention as A

from tests.clitools import run_cli as _cli
from tests.widgets import plain
from workbench.registries import analyze, build_analyses

# --- hand calculations --------------------------------------------------------------------------


def test_scores_of_hand_made_patterns():
    tokens = np.array([1, 7, 8, 7])
    prev = np.zeros((4, 4))
    prev[0, 0] = 1
    for q in range(1, 4):
        prev[q, q - 1] = 1
    uniform = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    pattern = np.stack([prev, uniform])
    s = A.pattern_scores(pattern, tokens, tokens, causal=True, cross=False)
    assert s["previous_token"] == pytest.approx([1.0, (1 / 2 + 1 / 3 + 1 / 4) / 3])
    assert s["previous_token_tl"] == pytest.approx([3 / 4, (1 / 2 + 1 / 3 + 1 / 4) / 4])
    # token 7 at position 3 repeats position 1: only row 3 has a duplicate
    assert s["duplicate_token"] == pytest.approx([0.0, 1 / 4])
    assert s["duplicate_token_tl"] == pytest.approx([0.0, 1 / 16])
    assert s["first_token"] == pytest.approx([1 / 3, (1 / 2 + 1 / 3 + 1 / 4) / 3])
    assert s["mean_distance"] == pytest.approx([3 / 4, (0 + 0.5 + 1 + 1.5) / 4])
    assert s["entropy"] == pytest.approx([0.0, np.mean([np.log(k) for k in range(1, 5)])])
    assert np.isnan(s["next_token"]).all()
    # the token after the earlier 7 (position 2) is the induction target of row 3
    assert A.induction_mask(tokens).nonzero() == (np.array([3]), np.array([2]))


def test_bidirectional_and_cross_attention_scores():
    tokens = np.array([5, 6, 5])
    nxt = np.zeros((1, 3, 3))
    nxt[0, 0, 1] = nxt[0, 1, 2] = nxt[0, 2, 0] = 1
    s = A.pattern_scores(nxt, tokens, tokens, causal=False, cross=False)
    assert s["next_token"] == pytest.approx([1.0])
    assert s["previous_token"] == pytest.approx([0.0])
    assert s["duplicate_token"] == pytest.approx([0.5])  # rows 0 and 2 have a duplicate; row 2 hits it
    assert np.isnan(s["previous_token_tl"]).all() and np.isnan(s["duplicate_token_tl"]).all()
    cross = np.full((1, 2, 3), 1 / 3)
    s = A.pattern_scores(cross, np.array([6, 9]), tokens, causal=False, cross=True)
    assert s["duplicate_token"] == pytest.approx([1 / 3])  # only query 0 (token 6) occurs in the keys
    assert np.isnan(s["previous_token"]).all() and np.isnan(s["mean_distance"]).all()


def test_mechanics_checks_report_what_they_find():
    good = np.tril(np.ones((2, 3, 3))) / np.arange(1, 4)[None, :, None]
    assert A.check_pattern(good, causal=True) == pytest.approx(
        {"max_row_sum_error": 0.0, "max_above_diagonal": 0.0, "nonzero_above_diagonal": 0})
    bad = good.copy()
    bad[1, 0, 2] = 0.25  # leaks the future and breaks its row's sum
    c = A.check_pattern(bad, causal=True)
    assert c["nonzero_above_diagonal"] == 1 and c["max_above_diagonal"] == 0.25
    assert c["max_row_sum_error"] == pytest.approx(0.25)
    assert "nonzero_above_diagonal" not in A.check_pattern(good, causal=False)


# --- against TransformerLens' head detector -----------------------------------------------------

PROMPTS = ["the cat sat on the mat and the cat slept", "one two one two one two", "a b c d a b c d"]


def test_scores_agree_with_transformer_lens_head_detector(workbench_make_run, workbench_tiny_model):
    from transformer_lens.head_detector import (
        compute_head_attention_similarity_score,
        detect_head,
        get_induction_head_detection_pattern,
    )


    model = workbench_tiny_model
    run = workbench_make_run(PROMPTS, hooks=["attention"])
    bridge = model.bridge
    for i, text in enumerate(PROMPTS):  # the detector tokenizes the text itself: same tokens
        assert bridge.to_tokens(text)[0].tolist() == run.tokens(i).tolist()
    [out] = analyze(run, [build_analyses().get("head-roles")],
                              {"head-roles": {"seqs": 3, "length": 12}}, model=model)
    heads = out.stored.result().data["heads"]
    assert len(heads) == model.info.n_layers * model.info.n_heads
    for detector, field in (("previous_token_head", "previous_token_tl"),
                            ("duplicate_token_head", "duplicate_token_tl")):
        expected = detect_head(bridge, PROMPTS, detector).numpy()  # mean over the prompts
        got = np.array([[r[field] for r in heads if r["layer"] == layer] for layer in range(model.info.n_layers)])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # induction: the same detection pattern and "mul" score, on the analysis's own sequences
    tokens = out.stored.arrays["induction_tokens"]
    import torch

    scores = np.zeros((model.info.n_layers, model.info.n_heads))
    for seq in tokens:
        t = torch.as_tensor(seq[None])
        _, cache = bridge.run_with_cache(t)
        det = get_induction_head_detection_pattern(t.cpu())
        for layer in range(model.info.n_layers):
            for h in range(model.info.n_heads):
                scores[layer, h] += compute_head_attention_similarity_score(
                    cache["pattern", layer][0, h], det, exclude_bos=False, exclude_current_token=False,
                    error_measure="mul") / len(tokens)
    got = np.array([[r["induction_tl"] for r in heads if r["layer"] == layer] for layer in range(model.info.n_layers)])
    np.testing.assert_allclose(got, scores, atol=1e-5, rtol=0)
    checks = out.stored.result().data["checks"]
    assert all(c["ok"] and c["causal"] and c["nonzero_above_diagonal"] == 0 for c in checks)


def test_grouped_query_heads_name_their_kv_head_and_encoders_score_both_directions(workbench_make_run,
                                                                                      tiny_models):

    llama = tiny_models["tiny-llama"]
    run = workbench_make_run(PROMPTS[:2], hooks=["attention"], model=llama)
    [out] = analyze(run, [build_analyses().get("head-roles")],
                              {"head-roles": {"induction": False}}, model=llama)
    data = out.stored.result().data
    assert data["kv_groups"] == 2
    assert [r["kv_head"] for r in data["heads"] if r["layer"] == 0] == [0, 0, 1, 1]
    assert all(r["induction"] is None for r in data["heads"]) and data["induction"] is None

    bert = tiny_models["tiny-bert"]
    run = workbench_make_run(PROMPTS[:2], hooks=["attention"], model=bert)
    [out] = analyze(run, [build_analyses().get("head-roles")], model=bert)
    data = out.stored.result().data
    assert data["induction"] is None  # decoders only
    r = data["heads"][0]
    assert r["next_token"] is not None and r["previous_token"] is not None and r["previous_token_tl"] is None
    assert all(not c["causal"] and c["rows_sum_to_one"] for c in data["checks"])
    # an independent look at one score: the next-token weight averaged by hand
    p = [run.activation("blocks.0.attn.hook_pattern", i) for i in range(2)]
    expected = np.mean([np.mean([x[0, q, q + 1] for q in range(x.shape[1] - 1)]) for x in p])
    assert r["next_token"] == pytest.approx(expected, abs=1e-6)


# --- toy models with known mechanisms -----------------------------------------------------------


@pytest.fixture(scope="module")
def toy_induction():
    import workbench

    return workbench.load_model("toy-induction", device="cpu", progress=False)


@pytest.fixture(scope="module")
def toy_reversal():
    import workbench

    return workbench.load_model("toy-reversal", device="cpu", progress=False)


def _repeat_loss(model, tokens, length, ablate=None):
    """Mean loss on the second copy of ``<bos> r r``; ``ablate=(layer, head)`` zeroes that head's
    output (its z, before the output projection)."""
    import torch

    hooks = []
    if ablate is not None:
        layer, head = ablate

        def zero(z, hook):
            z = z.clone()
            z[:, :, head] = 0
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", zero))
    t = torch.as_tensor(tokens)
    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(t, fwd_hooks=hooks)
    logp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, t[:, 1:, None])[..., 0]
    return float(-logp[:, length:].mean())


def test_toy_induction_model_top_heads_are_the_circuit(workbench_make_run, toy_induction):
    from workbench_plugins.toy_models import FIRST_LETTER, VOCAB

    model = toy_induction
    letters = ["q", "w", "e", "r", "t", "y", "u", "i", "o", "p", "a", "s", "d", "f", "g", "h", "j", "k", "l", "z", "x", "c", "v", "b", "n", "m"]
    prompts = [" ".join(letters[k : k + 8] * 2) for k in range(0, 16, 4)] + ["the cat sat on the mat".replace("the", "t")]
    run = workbench_make_run(prompts, hooks=["attention"], model=model)
    [out] = analyze(run, [build_analyses().get("head-roles")], model=model)
    data = out.stored.result().data
    assert data["checks_ok"]
    ind = data["induction"]
    assert ind["loss_first_half"] > 3.0 and ind["loss_second_half"] < 0.5  # it learned to repeat
    heads = data["heads"]
    top_ind = max(heads, key=lambda r: r["induction"])
    top_prev = max(heads, key=lambda r: r["previous_token"])
    assert top_ind["layer"] == 1 and top_prev["layer"] == 0  # the previous-token head feeds it

    # ground truth: removing the top induction head breaks in-context repetition (> 1 nat) on
    # fresh sequences (not the analysis's own); a head the analysis ranks last barely matters
    rng = np.random.default_rng(123)
    length = 16
    r = rng.integers(FIRST_LETTER, len(VOCAB), (64, length))
    tokens = np.concatenate([np.full((64, 1), VOCAB["<bos>"]), r, r], axis=1)
    base = _repeat_loss(model, tokens, length)
    assert _repeat_loss(model, tokens, length, (top_ind["layer"], top_ind["head"])) - base > 1.0
    assert _repeat_loss(model, tokens, length, (top_prev["layer"], top_prev["head"])) - base > 1.0
    unrelated = min((h for h in heads if h["layer"] == 0), key=lambda r: r["previous_token"])
    assert _repeat_loss(model, tokens, length, (unrelated["layer"], unrelated["head"])) - base < 1.0


def test_toy_reversal_cross_attention_follows_the_reversal(workbench_make_run, toy_reversal):
    from workbench_plugins.toy_models import LETTERS

    rng = np.random.default_rng(7)
    rows = []
    for _ in range(24):
        n = int(rng.integers(4, 12))
        x = [LETTERS[i] for i in rng.integers(0, len(LETTERS), n)]
        rows.append({"prompt": " ".join(x), "target": " ".join(reversed(x))})
    run = workbench_make_run(rows, hooks=["attention"], model=toy_reversal)
    cross = [h for h in A.pattern_hooks(run) if h.cross]
    assert cross and all(h.stack == "cross" for h in cross)
    hits: dict[tuple[str, int], int] = {}
    total = 0
    for i, row in enumerate(rows):
        n = len(row["prompt"].split())
        for j in range(n):  # decoder position j writes output token j = input token n-1-j
            total += 1
            look = A.lookup(run, i, j, top=1, hooks=cross)
            assert look["query"]["stream"] != "tokens"  # queries are decoder tokens
            for layer in look["layers"]:
                for h in layer["heads"]:
                    if h["keys"][0]["position"] == n - 1 - j:
                        hits[layer["hook"], h["head"]] = hits.get((layer["hook"], h["head"]), 0) + 1
    best, count = max(hits.items(), key=lambda kv: kv[1])
    assert count / total >= 0.95, (best, count, total)
    # the model does reverse: its stored top-1 predictions are the reversed input
    correct = sum(int(run.top_k(i)[0][:, 0].tolist() == run.targets(i).tolist()) for i in range(len(rows)))
    assert correct / len(rows) >= 0.9


# --- command line and terminal view -------------------------------------------------------------


def test_cli_text_json_and_errors(workbench_make_run):
    run = workbench_make_run(PROMPTS, hooks=["attention"])
    path = str(run.final_path)
    proc = _cli("analyze", path, "head-roles", "--param", "head-roles.seqs=2")
    assert proc.returncode == 0, proc.stderr
    assert "top induction heads" in proc.stdout and "mechanics checks (2 patterns" in proc.stdout
    assert "causal patterns exactly zero above the diagonal" in proc.stdout
    [rec] = json.loads(_cli("analyze", path, "head-roles", "--param", "head-roles.seqs=2", "--json").stdout)
    data = rec["result"]
    assert {"heads", "checks", "induction", "top"} <= set(data)
    assert set(data["heads"][0]) >= {"hook", "layer", "head", "kv_head", *A.SCORES, *A.TL_SCORES}
    proc = _cli("analyze", path, "attends-to", "--param", "attends-to.prompt=1", "--param",
                "attends-to.position=-1", "--param", "attends-to.top=2", "--json")
    [rec] = json.loads(proc.stdout)
    look = rec["result"]
    assert look["query"]["token"] == run.str_tokens(1)[-1] and len(look["layers"]) == 2
    pattern = run.activation("blocks.1.attn.hook_pattern", 1)[3, -1]
    keys = look["layers"][1]["heads"][3]["keys"]
    assert [k["position"] for k in keys] == list(np.argsort(-pattern, kind="stable")[:2])
    assert keys[0]["weight"] == pytest.approx(float(pattern.max()))
    for q in (0, 3):  # the one-row read equals the whole pattern's row
        np.testing.assert_array_equal(run.attention_row("blocks.0.attn.hook_pattern", 2, q),
                                      run.activation("blocks.0.attn.hook_pattern", 2)[:, q])
    assert "prompt 1, query position" in _cli("analyze", path, "attends-to", "--param", "attends-to.prompt=1").stdout
    proc = _cli("analyze", path, "attends-to", "--param", "attends-to.prompt=9")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "prompt 9 is out of range" in proc.stderr
    bare = workbench_make_run(PROMPTS[:1], hooks=["residual"])
    proc = _cli("analyze", str(bare.final_path), "head-roles")
    assert proc.returncode == 2 and "capture with --for head-roles" in proc.stderr


def test_terminal_view_sorts_jumps_to_the_heatmap_and_follows_the_token(workbench_make_run, tiny_models):
    import asyncio

    from textual.widgets import DataTable
    from workbench_plugins.attention_view import HeadRolesView, LookPanel

    from workbench.tui import make_app

    model = tiny_models["tiny-llama"]
    run = workbench_make_run(PROMPTS, hooks=["attention"], model=model)
    analyze(run, [build_analyses().get("head-roles")],
                      {"head-roles": {"seqs": 2}}, model=model)
    app = make_app([str(run.final_path)], view="results")

    async def main():
        async with app.run_test(size=(120, 50)) as pilot:
            await pilot.pause()
            await pilot.pause()
            view = app.query_one(HeadRolesView)
            table = view.query_one(DataTable)
            assert view.sort_by == "induction" and table.row_count == 2 * 4
            first = view.ordered("induction")[0]
            assert view.selected() == (first["hook"], first["head"])
            assert all(view.ordered("induction")[k]["induction"] >= view.ordered("induction")[k + 1]["induction"]
                       for k in range(7))
            table.focus()
            await pilot.press("o")  # next score (first-token after induction)
            assert view.sort_by == "first_token"
            panel = view.query_one(LookPanel)
            assert panel.shown == (0, 0)
            app.query_one("#prompts").focus()
            await pilot.press("right", "right")
            await pilot.pause()
            assert panel.shown == (0, 2)
            expected = A.lookup(run, 0, 2, top=3)
            text = plain(panel)
            assert f"where does {expected['query']['token']!r}" in text
            top = expected["layers"][1]["heads"][3]["keys"][0]
            assert f"{top['token']!r}@{top['position']} {top['weight']:.2f}" in text
            assert "kv1" in text  # grouped-query: 4 query heads share 2 KV heads
            table.focus()
            await pilot.press("down", "enter")
            await pilot.pause()
            hook, head = view.ordered("first_token")[1]["hook"], view.ordered("first_token")[1]["head"]
            assert app.active_view() == "attention"
            from workbench.tui import render as R

            assert R.pattern_hooks(run)[app.focus_state.pattern] == hook and app.focus_state.head == head

    asyncio.run(main())



def test_training_scripts_write_loadable_toys(tmp_path, monkeypatch):
    """The seeded training scripts (a few steps here) write what the toy_models plugin loads."""
    from workbench_plugins import toy_models

    from workbench.models import LoadRequest

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt = ["--checkpoints", "0,3", "--checkpoint-dir", str(tmp_path / "ckpt"), "--eval-every", "1"]
    for name, steps, extra in (("induction", 3, ckpt), ("reversal", 3, [])):
        proc = subprocess.run([sys.executable, os.path.join(repo, "examples", f"train_toy_{name}.py"),
                               "--steps", str(steps), "--out", str(tmp_path / name), *extra],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / name / "training.json").read_text())["steps"] == steps
    meta = json.loads((tmp_path / "ckpt" / "checkpoints.json").read_text())
    assert sorted(meta["checkpoints"]) == ["0", "3"] and [c["step"] for c in meta["curve"]] == [0, 1, 2, 3]
    from safetensors.numpy import load_file

    last, final = load_file(tmp_path / "ckpt" / "step-00003.safetensors"), load_file(tmp_path / "induction" / "model.safetensors")
    assert last.keys() == final.keys() and all(np.array_equal(last[k], final[k]) for k in last)
    monkeypatch.setattr(toy_models, "TOYS", tmp_path)
    parts = toy_models.load_induction(LoadRequest(name="toy-induction"))
    shipped = os.path.join(repo, "plugins", "toys", "induction", "model.safetensors")
    assert parts.provenance.sha256 != toy_models._sha256(toy_models.Path(shipped))
    assert parts.bridge.cfg.attn_only and parts.bridge.cfg.n_layers == 2
    parts = toy_models.load_reversal(LoadRequest(name="toy-reversal"))
    assert parts.hf_model.config.num_layers == 2
