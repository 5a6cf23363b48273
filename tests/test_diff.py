"""Run diffs (plugins/diff.py): a run against itself is exactly zero; a planted change is found
where it was planted with the value numpy computes from the stored activations; JS and KL equal
hand formulas; the top-k KL is a lower bound of the true KL; refusals are one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
from workbench_plugins import diff_math as M

import workbench
from tests.clitools import run_cli
from workbench.errors import UserError
from workbench.registries import analyze, build_analyses
from workbench.store.synthetic import write_synthetic_run

PLANT_HOOK, PLANT_PROMPT, PLANT_POS = "blocks.1.hook_resid_post", 2, 3


def _diff(path_a, path_b, **params):  # type: ignore[no-untyped-def]
    with workbench.open_run(path_a) as run:
        [o] = analyze(run, [build_analyses().get("diff")],
                      {"diff": {"other": str(path_b), "lens": "off", **params}})
    assert o.ok, o.stored.meta.get("traceback")
    return o.stored.result()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("diff")
    delta = np.linspace(1.0, 2.0, 16).astype(np.float32)

    def edit(i, hook, acts):  # type: ignore[no-untyped-def]
        if i == PLANT_PROMPT and hook == PLANT_HOOK:
            acts = acts.copy()
            acts[PLANT_POS] += delta
        return acts

    a = write_synthetic_run(folder / "a.h5", n_prompts=5, seed=7, lengths=(5, 9))
    b = write_synthetic_run(folder / "b.h5", n_prompts=5, seed=7, lengths=(5, 9), edit=edit)
    return a, b


def test_a_run_against_itself_is_exactly_zero(tiny_models, tmp_path):
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(["the cat sat on the mat", "a b c a b c", "hello"])]
    out = tmp_path / "r.h5"
    workbench.capture(tiny_models["tiny-gpt2"], prompts, hooks=["residual", "attention"], out=out, progress=False)
    with workbench.open_run(out) as run:
        [o] = analyze(run, [build_analyses().get("diff")], {"diff": {"other": str(out), "lens": "on"}},
                      model=tiny_models["tiny-gpt2"])
    assert o.ok, o.stored.meta.get("traceback")
    r = o.stored.result()
    names = [k for k in r.arrays if k.split(".")[0] in ("rel_l2", "js", "kl_topk", "dloss", "lens_kl")]
    assert {n.split(".")[0] for n in names} == {"rel_l2", "js", "kl_topk", "dloss", "lens_kl"}
    for name in names:
        values = r.arrays[name]
        if name == "dloss":  # no loss at a prompt's last token (nothing follows it)
            ends = r.arrays["offsets.tokens"][1:] - 1
            assert np.isnan(values[ends]).all()
            values = np.delete(values, ends)
        assert np.all(values == 0), name
    for k in range(len(r.data["token_hooks"])):
        assert np.all(r.arrays[f"cos.{k}"] == 1)
    assert len(r.data["pairs"]) == 3 and r.data["left_out"] == [] and r.data["lm"]["moved"] == []


def test_a_planted_change_is_found_with_numpys_values(planted):
    a, b = planted
    r = _diff(a, b)
    d = r.data
    with workbench.open_run(a) as ra, workbench.open_run(b) as rb:
        k = [h["hook"] for h in d["token_hooks"]].index(PLANT_HOOK)
        off = r.arrays["offsets.tokens"]
        for n, p in enumerate(d["pairs"]):
            x = ra.activation(PLANT_HOOK, p["a"]).astype(np.float64)
            y = rb.activation(PLANT_HOOK, p["b"]).astype(np.float64)
            want = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            np.testing.assert_allclose(r.arrays[f"rel_l2.{k}"][off[n]: off[n + 1]], want, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(r.arrays[f"cos.{k}"][off[n]: off[n + 1]], cos, rtol=1e-6, atol=1e-6)
        changed = np.flatnonzero(r.arrays[f"rel_l2.{k}"])
        assert changed.tolist() == [off[PLANT_PROMPT] + PLANT_POS]
    for j, row in enumerate(d["token_hooks"]):
        if row["hook"] != PLANT_HOOK:
            assert not r.arrays[f"rel_l2.{j}"].any(), row["hook"]
    ranked = d["ranked"]
    assert ranked["hooks"][0]["hook"] == PLANT_HOOK and ranked["hooks"][1]["mean_rel_l2"] == 0
    assert ranked["positions"][0]["pair"] == PLANT_PROMPT and ranked["positions"][0]["position"] == PLANT_POS
    assert ranked["prompts"][0]["pair"] == PLANT_PROMPT
    assert all(not r.arrays[f"js.{j}"].any() for j in range(len(d["square_hooks"])))  # patterns untouched
    assert d["lens"]["skipped"] == "lens=off"


def test_js_and_kl_equal_hand_formulas():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])
    assert M.js(p, q) == pytest.approx(0.5 * math.log(2))  # m = (.25, .5, .25): each KL is ln2 / 2
    assert M.js(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.log(2))
    assert M.kl(np.array([0.25, 0.75]), np.array([0.5, 0.5])) == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # top-2 of A: ids 1, 2 at .6, .3; of B: ids 1, 3 at .5, .4; shared: id 1; rest pooled
    got = M.kl_topk(np.array([[1, 2]]), np.log(np.array([[0.6, 0.3]])), np.array([[1, 3]]), np.log(np.array([[0.5, 0.4]])))
    assert got[0] == pytest.approx(0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5))
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    y = np.array([[3.0, 5.0], [0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(M.rel_l2(x, y), [0.2, 0.0, math.sqrt(2)])
    np.testing.assert_allclose(M.cosine(x, y), [29 / (5 * math.sqrt(34)), 1.0, 0.0])


def test_the_top_k_kl_never_exceeds_the_true_kl():
    rng = np.random.default_rng(0)
    for _ in range(200):
        la = np.log(rng.dirichlet(np.full(50, 0.3), size=4))
        lb = np.log(rng.dirichlet(np.full(50, 0.3), size=4))
        true = M.kl_from_logprobs(la, lb)
        ia, ib = np.argsort(-la, axis=1)[:, :5], np.argsort(-lb, axis=1)[:, :5]
        bound = M.kl_topk(ia, np.take_along_axis(la, ia, 1), ib, np.take_along_axis(lb, ib, 1))
        assert np.all(bound <= true + 1e-12) and np.all(bound >= 0)


def test_pairing_by_id_else_text():
    how, pairs = M.pair_prompts(["x", "y", "z"], ["z", "x"], ["1", "2", "3"], ["3", "1"])
    assert how == "id" and pairs == [(0, 1, "x"), (2, 0, "z")]
    how, pairs = M.pair_prompts(["p0", "p0"], ["q0", "q1"], ["a", "b"], ["b", "a"])
    assert how == "text" and pairs == [(0, 1, "p0"), (1, 0, "p0")]


def test_clean_against_corrupted_prompts_of_one_model(tiny_models, tmp_path):
    model = tiny_models["tiny-gpt2"]
    clean, corrupt = tmp_path / "clean.h5", tmp_path / "corrupt.h5"
    workbench.capture(model, [{"id": "q", "prompt": "the cat sat"}, {"id": "r", "prompt": "one two"}],
                      hooks=["residual"], out=clean, progress=False)
    workbench.capture(model, [{"id": "q", "prompt": "the dog sat"}, {"id": "r", "prompt": "one two three"}],
                      hooks=["residual"], out=corrupt, progress=False)
    d = _diff(clean, corrupt).data
    [pair] = d["pairs"]
    assert pair["id"] == "q" and pair["same_tokens"] is False
    assert [x["id"] for x in d["left_out"]] == ["r"]


def test_refusals_are_one_line(tiny_models, tmp_path, planted):
    a, _ = planted
    gpt2, bert, other_hooks = tmp_path / "gpt2.h5", tmp_path / "bert.h5", tmp_path / "attn.h5"
    workbench.capture(tiny_models["tiny-gpt2"], ["some words here"], hooks=["residual"], out=gpt2, progress=False)
    workbench.capture(tiny_models["tiny-gpt2"], ["other words"], hooks=["attention"], out=other_hooks, progress=False)
    workbench.capture(tiny_models["tiny-bert"], ["some words here"], hooks=["residual"], out=bert, progress=False)
    cases = [
        ((str(gpt2), str(bert)), "are not of one architecture"),
        ((str(gpt2), str(other_hooks)), "hold no hook in common"),
        ((str(gpt2), str(a)), "d_model 64) and a.h5 (synthetic: decoder, d_model 16) are not of one"),
        ((str(gpt2), str(tmp_path / "nope.h5")), "no such run"),
    ]
    for args, message in cases:
        r = run_cli("diff", *args)
        errors = [x for x in r.stderr.splitlines() if x.startswith("workbench: error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], (args, r.stderr)
    copy = tmp_path / "copy.h5"
    workbench.capture(tiny_models["tiny-gpt2"], [{"id": "zz", "prompt": "nothing shared"}], hooks=["residual"],
                      out=copy, progress=False)
    r = run_cli("diff", str(gpt2), str(copy))
    assert r.returncode == 2 and "have no prompts in common" in r.stderr
    with workbench.open_run(gpt2) as run, pytest.raises(UserError, match="needs the second run"):
        analyze(run, [build_analyses().get("diff")])


def test_cli_prints_and_stores_the_diff(planted):
    a, b = planted
    r = run_cli("diff", str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert f"most changed hooks: {PLANT_HOOK}" in r.stdout
    again = run_cli("diff", str(a), str(b), "--json")
    assert again.returncode == 0 and '"paired_by": "id"' in again.stdout
