"""Embedding geometry and concept directions (plugins/directions.py).

Ground truth: synthetic residual streams with a direction planted from layer L on (the method
must find it there and not before; shuffled labels must score AUC about 0.5); neighbours,
analogies, the PCA map and token directions against numpy on the Hugging Face module's own
weight matrices; AUC against a count over all pairs; projections against a dot product by hand.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from workbench_plugins import directions as D

import workbench
from tests.clitools import run_cli as _cli
from tests.widgets import plain
from workbench.registries import analyze, build_analyses
from workbench.store.synthetic import write_synthetic_run

D_MODEL, N_LAYERS, PLANT_AT, N_PROMPTS = 64, 6, 3, 200




@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A synthetic run of 200 prompts, half labelled 'yes', whose residual stream after layer
    PLANT_AT and later carries 3 x a known unit direction in the 'yes' prompts."""
    rng = np.random.default_rng(7)
    true = rng.normal(size=D_MODEL)
    true /= np.linalg.norm(true)
    labels = ["yes" if i % 2 == 0 else "no" for i in range(N_PROMPTS)]

    def edit(i, hook, acts):
        if "hook_resid_post" in hook and int(hook.split(".")[1]) >= PLANT_AT and labels[i] == "yes":
            return acts + 3.0 * true
        return acts

    path = write_synthetic_run(tmp_path_factory.mktemp("planted") / "run.h5", n_prompts=N_PROMPTS,
                               n_layers=N_LAYERS, d_model=D_MODEL, seed=3, edit=edit,
                               metadata=[{"label": lb} for lb in labels])
    run = workbench.open_run(path)
    yield run, true
    run.close()


def _direction(run, **params):
    [out] = analyze(run, [build_analyses().get("direction")], {"direction": params}, force=True)
    assert out.ok, out.stored.error
    return out.stored


def test_a_planted_direction_is_found_from_its_layer_on_and_not_before(planted):
    run, true = planted
    stored = _direction(run, holdout=0.5)
    d = stored.data
    assert d["name"] == "yes-vs-no" and d["rows"] == [str(i) for i in range(N_LAYERS)]
    assert d["contrast"]["n_test_positive"] == d["contrast"]["n_test_negative"] == 50
    cos = [float(v @ true / np.linalg.norm(v)) for v in stored.arrays["directions"]]
    assert all(c > 0.95 for c in cos[PLANT_AT:]), cos
    assert all(abs(c) < 0.5 for c in cos[:PLANT_AT]), cos
    aucs = [x["auc"] for x in d["layers"]]
    assert min(aucs[PLANT_AT:]) > 0.95 and max(aucs[:PLANT_AT]) < 0.75, aucs
    assert int(d["layer"]) >= PLANT_AT
    assert float(stored.arrays["vector"] @ true / d["norm"]) > 0.95


def test_shuffled_labels_score_chance(planted):
    run, _ = planted
    d = _direction(run, holdout=0.5, shuffle=True).data
    assert d["name"] == "yes-vs-no-shuffled" and d["contrast"]["shuffled"]
    aucs = np.array([x["auc"] for x in d["layers"]])
    assert np.all(np.abs(aucs - 0.5) < 0.15), aucs
    assert abs(aucs.mean() - 0.5) < 0.08, aucs


def test_difference_of_means_and_scores_by_hand(planted):
    """The stored vectors are the training sets' mean difference, computed here by hand from the
    run's activations; the scores are projections onto their unit vectors."""
    run, _ = planted
    stored = _direction(run, holdout=0.3, seed=4, layer="1")
    a = stored.arrays
    prompts, labels, test = a["prompts"], a["labels"], a["test"]
    assert test.sum() == 60 and labels[test].sum() == 30
    layer = 4
    feats = []
    for i in prompts:
        act = run.activation(f"blocks.{layer}.hook_resid_post", int(i)).astype(np.float64)
        feats.append(act[1:].mean(0))  # BOS left out
    feats = np.array(feats)
    train = ~test
    want = feats[train & (labels == 1)].mean(0) - feats[train & (labels == 0)].mean(0)
    np.testing.assert_allclose(a["directions"][layer], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["scores"][:, layer], feats @ (want / np.linalg.norm(want)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["vector"], a["directions"][1], rtol=0, atol=0)  # layer="1" chosen
    assert stored.data["layer"] == "1"


def test_auc_equals_a_count_over_all_pairs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        labels = rng.integers(0, 2, size=40)
        pos, neg = scores[labels == 1], scores[labels == 0]
        pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
        assert D.auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    assert D.auc(np.array([1.0, 2.0]), np.array([1, 1])) != D.auc(np.array([1.0, 2.0]), np.array([1, 1]))  # nan


def test_projection_is_the_dot_product_with_the_unit_direction(planted):
    run, _ = planted
    _direction(run, name="planted", holdout=0.25)
    [out] = analyze(run, [build_analyses().get("projection")], {"projection": {"direction": "planted"}}, force=True)
    assert out.ok, out.stored.error
    d, a = out.stored.data, out.stored.arrays
    u = D.find_direction(run, "planted").vector
    u = u / np.linalg.norm(u)
    for rec in d["prompts"][:5]:
        i, off, n = rec["index"], rec["offset"], rec["n_tokens"]
        for r in range(N_LAYERS):
            act = run.activation(f"blocks.{r}.hook_resid_post", i).astype(np.float64)
            np.testing.assert_allclose(a["projection"][off : off + n, r], act @ u, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(a["cosine"][off : off + n, r], act @ u / np.linalg.norm(act, axis=1),
                                       rtol=1e-5, atol=1e-6)
        assert rec["label"] == run.metadata(i)["label"]
    means = {lb: np.mean([p["mean"][-1] for p in d["prompts"] if p["label"] == lb]) for lb in ("yes", "no")}
    assert means["yes"] - means["no"] == pytest.approx(3.0, abs=0.3)
    text = build_analyses().get("projection").text(out.stored.result())
    assert "projection onto direction 'planted'" in text and "AUC" in text


# --- embeddings on a real (tiny) model, against numpy on the Hugging Face weights --------------


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Llama (untied embeddings; byte-level vocabulary) run with the residual stream and
    labelled prompts, and its model."""
    from workbench.capturing.prompts import Prompt

    model = workbench.load_model("tiny-llama", device="cpu", progress=False)
    texts = [("aaa bab", "a"), ("abba a", "a"), ("a ab aa", "a"), ("zzy zz", "z"), ("yzz zy", "z"), ("z zzy", "z")]
    items = [Prompt(text=t, id=f"p{i}", metadata={"label": lb}) for i, (t, lb) in enumerate(texts)]
    out = tmp_path_factory.mktemp("emb") / "run.h5"
    workbench.capture(model, items, hooks=list(D.RESIDUAL), out=out, progress=False)
    run = workbench.open_run(out)
    yield run, model
    run.close()


def _numpy_neighbours(m, v, k, exclude, metric):
    scores = m @ v
    if metric == "cosine":
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = np.nan_to_num(scores / (np.linalg.norm(m, axis=1) * np.linalg.norm(v)))  # norm 0: cosine 0
    scores[list(exclude)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def _check(found, want_ids, want_scores):
    got_ids = np.array([x["id"] for x in found])
    got = np.array([x["score"] for x in found])
    np.testing.assert_allclose(got, want_scores, rtol=1e-4, atol=1e-5)
    gaps = np.diff(want_scores)
    for j in range(len(want_ids)):  # ids agree wherever the score is not (nearly) tied
        near = (j > 0 and abs(gaps[j - 1]) < 1e-5) or (j < len(gaps) and abs(gaps[j]) < 1e-5)
        assert near or got_ids[j] == want_ids[j], (j, got_ids, want_ids)


def test_neighbours_analogy_and_map_equal_numpy(llama_run):
    run, model = llama_run
    hf = model.bridge.original_model
    mats = {"embed": hf.get_input_embeddings().weight.detach().double().numpy(),
            "unembed": hf.get_output_embeddings().weight.detach().double().numpy()}
    assert not np.allclose(mats["embed"], mats["unembed"])  # untied: the two matrices differ
    [out] = analyze(run, [build_analyses().get("embeddings")],
                    {"embeddings": {"tokens": "a,b,c,x,y,z", "space": False, "k": 7, "analogy": "b - a + y"}},
                    model=model, force=True)
    assert out.ok, out.stored.error
    d = out.stored.data
    ids = [model.tokenizer("a" if w == "a" else w, add_special_tokens=False)["input_ids"][0] for w in "abcxyz"]
    assert [t["id"] for t in d["tokens"]] == ids and d["matrices"] == ["embed", "unembed"] and not d["tied"]
    for name, m in mats.items():
        for t, nb in zip(ids, d["neighbours"][name]):
            for metric in ("cosine", "dot"):
                _check(nb[metric], *_numpy_neighbours(m, m[t], 7, (t,), metric))
        vec = m[ids[1]] - m[ids[0]] + m[ids[4]]
        for metric in ("cosine", "dot"):
            _check(d["analogy"][name][metric], *_numpy_neighbours(m, vec, 7, (ids[1], ids[0], ids[4]), metric))
        x = m[ids] - m[ids].mean(0)
        cov_vals, cov_vecs = np.linalg.eigh(x.T @ x)
        top = cov_vecs[:, ::-1][:, :2]
        want = x @ top
        got = np.array(d["map"][name]["xy"])
        for j in range(2):  # a principal axis has no sign: compare up to one
            assert min(np.abs(got[:, j] - want[:, j]).max(), np.abs(got[:, j] + want[:, j]).max()) < 1e-6
        np.testing.assert_allclose(d["map"][name]["explained"], cov_vals[::-1][:2] / cov_vals.sum(), rtol=1e-6)
    text = build_analyses().get("embeddings").text(out.stored.result())
    assert "nearest tokens in embed" in text and "b - a + y in unembed" in text and "2-D PCA" in text


def test_words_of_several_tokens_are_skipped_with_the_reason(llama_run):
    run, model = llama_run
    [out] = analyze(run, [build_analyses().get("embeddings")], model=model, force=True)  # defaults: words
    d = out.stored.data
    assert out.ok and d["tokens"] == [] and len(d["skipped"]) == 10 and d["map"] is None
    assert "tokens" in d["skipped"][0]["reason"] and "skipped" in d["analogy"]
    assert "skipped ' king'" not in build_analyses().get("embeddings").text(out.stored.result())


def test_words_outside_the_vocabulary_are_skipped_with_a_warning(tmp_path, capsys):
    """The toys' word-level tokenizer maps every word it lacks to '<pad>': 'king - man + woman'
    must not become '<pad> - <pad> + <pad>'."""
    model = workbench.load_model("toy-induction", device="cpu", progress=False)
    out = tmp_path / "toy.h5"
    workbench.capture(model, ["a b c a b c"], hooks=["residual"], out=out, progress=False)
    run = workbench.open_run(out)
    emb = build_analyses().get("embeddings")
    capsys.readouterr()
    [o] = analyze(run, [emb], model=model)  # the defaults: no word is in the vocabulary
    d = o.stored.data
    words = [w.strip() for w in D.DEFAULT_WORDS.split(",")]
    assert o.ok and d["tokens"] == [] and [s["word"] for s in d["skipped"]] == words
    assert all("not in the vocabulary" in s["reason"] and "'<pad>'" in s["reason"] for s in d["skipped"])
    assert d["analogy"]["unknown"] == ["king", "man", "woman"] and "terms" not in d["analogy"]
    (warning,) = d["warnings"]
    assert warning.startswith("embeddings: skipped 10 word(s) not in toy-induction's vocabulary")
    assert all(repr(w) in warning for w in words)
    assert f"workbench: warning: {warning}" in capsys.readouterr().err
    assert f"warning: {warning}" in emb.text(o.stored.result())
    [o] = analyze(run, [emb], {"embeddings": {"tokens": "a, b, king", "analogy": "a - b + zebra"}}, model=model)
    d = o.stored.data
    assert [t["token"] for t in d["tokens"]] == ["a", "b"] and [s["word"] for s in d["skipped"]] == ["king"]
    assert d["analogy"]["unknown"] == ["zebra"] and d["warnings"][0].endswith(": 'king', 'zebra'")
    [o] = analyze(run, [emb], {"embeddings": {"tokens": "a, b, c", "analogy": "a - b + c"}}, model=model)
    d = o.stored.data
    assert d["warnings"] == [] and [t["id"] for t in d["analogy"]["terms"]] == [
        model.tokenizer.convert_tokens_to_ids(w) for w in "abc"]
    r = _cli("analyze", str(out), "embeddings", "--param", "embeddings.tokens=king,queen")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "'king', 'queen', 'man', 'woman'" in last and "nothing is left to show" in last
    r = _cli("analyze", str(out), "direction", "--param", "direction.source=tokens", "--param", "direction.a=king",
             "--param", "direction.b=a")
    assert r.returncode == 2 and "'king' is not in the vocabulary" in r.stderr.strip().splitlines()[-1], r.stderr


def test_token_and_file_directions(llama_run, tmp_path):
    run, model = llama_run
    hf = model.bridge.original_model
    w_u = hf.get_output_embeddings().weight.detach().double().numpy()
    ia, ib = (model.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "az")
    stored = _direction(run, source="tokens", a="a", b="z", space=False, matrix="unembed")
    d = stored.data
    assert d["name"] == "a-minus-z" and d["layer"] is None and d["tokens"]["a_id"] == ia
    np.testing.assert_allclose(stored.arrays["vector"], w_u[ia] - w_u[ib], rtol=1e-5, atol=1e-6)
    assert len(d["layers"]) == len(d["rows"]) and d["contrast"]["n_positive"] == 3  # scored on the labels
    # a file of one vector per layer, then the API other plugins use
    per_layer = np.random.default_rng(1).normal(size=(len(d["rows"]), model.info.d_model))
    np.save(tmp_path / "mine.npy", per_layer)
    stored = _direction(run, source="file", file=str(tmp_path / "mine.npy"), layer="1")
    assert stored.data["name"] == "mine" and stored.data["layer"] == "1"
    found = D.find_direction(run, "mine")
    np.testing.assert_allclose(found.vector, per_layer[2], rtol=1e-6)  # rows: embed, 0, 1, ...
    np.testing.assert_allclose(found.at("embed"), per_layer[0], rtol=1e-6)
    assert sorted(D.directions(run)) == ["a-minus-z", "mine"]
    [out] = analyze(run, [build_analyses().get("embeddings")],
                    {"embeddings": {"tokens": "a,b,c", "space": False, "direction": "a-minus-z"}}, model=model,
                    force=True)
    assert out.stored.data["direction"]["unembed"]["cosine"][0]["id"] == int(np.argmax(
        (w_u @ (w_u[ia] - w_u[ib])) / np.linalg.norm(w_u, axis=1)))


def test_user_errors_exit_2_with_one_line(llama_run, tmp_path):
    run, _ = llama_run
    path = str(run.final_path)
    np.save(tmp_path / "bad.npy", np.zeros(5))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        (["direction", "--param", "direction.field=topic"], "no prompt has a 'topic' field"),
        (["direction", "--param", "direction.positive=q"], "no prompt has label='q'"),
        (["direction", "--param", "direction.source=file", "--param", f"direction.file={tmp_path}/none.npy"],
         "direction file not found"),
        (["direction", "--param", "direction.source=file", "--param", f"direction.file={tmp_path}/bad.npy"],
         "holds shape (5,)"),
        (["direction", "--param", "direction.source=file", "--param", f"direction.file={tmp_path}/obj.npy"],
         "is not a numeric array"),
        (["direction", "--param", "direction.layer=77"], "no layer '77'"),
        (["direction", "--param", "direction.name=Bad Name"], "direction name 'Bad Name'"),
        (["direction", "--param", "direction.source=tokens", "--param", "direction.a=abc",
          "--param", "direction.b=z", "--param", "direction.space=false"], "'abc' is 3 tokens"),
        (["projection", "--param", "projection.direction=nothing"], "no direction named 'nothing'"),
    ]
    for args, message in cases:
        r = _cli("analyze", path, *args)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and message in last and "Traceback" not in r.stderr, (args, r.stderr)


def test_named_only_analyses_are_not_run_without_names(llama_run):
    run, _ = llama_run
    r = _cli("analyze", str(run.final_path), "--json")
    assert r.returncode == 0, r.stderr
    ran = {rec["analysis"] for rec in json.loads(r.stdout)}
    assert "embeddings" in ran and not ran & {"direction", "projection"}
    listing = _cli("analyze", "--list").stdout
    assert "direction 1" in listing and "named only" in listing


def test_views_draw_the_neighbours_map_separation_and_projection(planted, llama_run):
    from textual.app import App
    from workbench_plugins.directions_view import (
        MapView,
        NeighboursView,
        ProjectionView,
        SeparationView,
    )

    run, model = llama_run
    [emb] = analyze(run, [build_analyses().get("embeddings")],
                    {"embeddings": {"tokens": "a,b,x,y,z", "space": False, "analogy": "b - a + y"}}, model=model)
    prun, _ = planted
    sep = _direction(prun, name="planted", holdout=0.25)
    [proj] = analyze(prun, [build_analyses().get("projection")], {"projection": {"direction": "planted"}})

    class Host(App):
        def __init__(self, widget):
            super().__init__()
            self.widget = widget

        def compose(self):
            yield self.widget

    async def show(widget, keys=()):
        async with Host(widget).run_test(size=(150, 60)) as pilot:
            await pilot.pause()
            before = plain(widget)
            widget.focus()
            for k in keys:
                await pilot.press(k)
            await pilot.pause()
            return before, plain(widget)

    nb = NeighboursView(emb.stored, run)
    before, after = asyncio.run(show(nb, ("d", "m")))
    assert "by cosine" in before and "embed" in before and "b - a + y" in before
    assert "by dot" in after and "unembed" in after
    first = emb.stored.data["neighbours"]["unembed"][0]["dot"][0]
    assert repr(first["token"]) in after and f"{first['score']:.2f}" in after

    mv = MapView(emb.stored, run)
    before, _ = asyncio.run(show(mv))
    lines = mv.canvas()
    xy = np.array(emb.stored.data["map"]["embed"]["xy"])
    where = {t: next((r, line.index("•" + t)) for r, line in enumerate(lines) if "•" + t in line) for t in "abxyz"}
    rightmost = "abxyz"[int(np.argmax(xy[:, 0]))]
    assert max(where.values(), key=lambda rc: rc[1]) == where[rightmost]
    top = "abxyz"[int(np.argmax(xy[:, 1]))]
    assert min(where.values(), key=lambda rc: rc[0])[0] == where[top][0]

    before, _ = asyncio.run(show(SeparationView(sep, prun)))
    assert "direction planted" in before and "AUC" in before and "cos to chosen" in before

    pv = ProjectionView(proj.stored, prun)
    before, after = asyncio.run(show(pv, ("c",)))
    rec = proj.stored.data["prompts"][0]
    assert "projection onto planted · prompt 0 · label='yes'" in before
    assert f"{proj.stored.arrays['projection'][rec['offset'] + 1, -1]:.1f}" in before
    last = proj.stored.data["separation"][-1]
    assert f"{last['auc']:.2f}  {last['accuracy']:.0%}" in before.splitlines()[2]  # top row: the last layer
    assert "cosine" in after and pv.cosine



def test_map_labels_never_cover_each_other():
    from types import SimpleNamespace

    from workbench_plugins.directions_view import MapView

    tokens = [" London", " Paris", " France", " dog"]
    xy = [[0.0, 0.0], [0.0, 0.0], [0.01, 0.0], [1.0, 1.0]]  # three labels on one spot
    stored = SimpleNamespace(data={"matrices": ["embed"], "map": {"tokens": tokens, "embed": {"xy": xy}}})
    text = "\n".join(MapView(stored, None, width=40, height=6).canvas())
    for t in tokens:
        assert text.count("•" + t) == 1, text


def test_encoder_pools_without_cls_and_sep_and_a_third_label_is_left_unscored(tmp_path):
    from workbench.capturing.prompts import Prompt

    model = workbench.load_model("tiny-bert", device="cpu", progress=False)
    texts = [("ab ab", "x"), ("ba ab", "x"), ("aab", "x"), ("zz y", "o"), ("yz z", "o"), ("zyy", "o"), ("q", "other")]
    items = [Prompt(text=t, id=f"p{i}", metadata={"label": lb}) for i, (t, lb) in enumerate(texts)]
    workbench.capture(model, items, hooks=list(D.RESIDUAL), out=tmp_path / "b.h5", progress=False)
    with workbench.open_run(tmp_path / "b.h5") as run:
        tokens = run.str_tokens(0)
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        stored = _direction(run, positive="x", negative="o", holdout=0.0, layer="1")
        a = stored.arrays
        feats = np.array([run.activation("blocks.1.hook_resid_post", int(i))[1:-1].astype(np.float64).mean(0)
                          for i in a["prompts"]])
        want = feats[a["labels"] == 1].mean(0) - feats[a["labels"] == 0].mean(0)
        np.testing.assert_allclose(stored.arrays["vector"], want, rtol=1e-5, atol=1e-6)
        assert stored.data["contrast"]["evaluated_on"].startswith("the training prompts")
        tok = _direction(run, source="tokens", a="a", b="z", space=False)
        assert tok.data["layers"] == [] and "has the values 'o', 'other', 'x'" in tok.data["not_scored"]
        assert "not scored on the prompts" in build_analyses().get("direction").text(tok.result())
