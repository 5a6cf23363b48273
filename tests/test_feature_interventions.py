"""SAE features as interventions (plugins/feature_interventions.py) through the engine (intervene.py).

Oracles, not the analysis' own code: the feature's activation by the SAE's numpy encoding
(``SAE.encode``, not the torch path the analysis uses), its contribution ``a_f · W_dec[f]`` written
out here, a plain ``model.bridge.hooks`` forward pass that adds it, and the metric computed here
from those logits in float64; clamping a feature to its own activation must change nothing; a
planted SAE whose decoder row is a token's unembedding must make greedy generation say it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from workbench_plugins.feature_interventions import FeatureEdit, parse_positions
from workbench_plugins.intervene import Edit, Intervener, Metric
from workbench_plugins.sae import stored_sae
from workbench_plugins.sae_format import SAE

import workbench
from tests.clitools import run_cli as _cli
from workbench.analysis import AnalysisContext
from workbench.errors import UserError
from workbench.registries import analyze, build_analyses

HOOK = "blocks.0.hook_resid_post"
NAME = "feature-intervention"




@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    """A tiny-llama run (character tokens) with an SAE trained on it by the ``sae`` analysis."""
    model = tiny_models["tiny-llama"]
    folder = tmp_path_factory.mktemp("fi")
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "a", "dog", "ran", "to", "the", "park", "when",
             "it", "rained"]
    rng = np.random.default_rng(0)
    lines = [json.dumps({"prompt": " ".join(rng.choice(words, size=8)), "answer": "x", "wrong": "q"})
             for _ in range(40)]
    (folder / "p.jsonl").write_text("\n".join(lines) + "\n")
    workbench.capture(model, str(folder / "p.jsonl"), hooks=[HOOK], out=folder / "run.h5", progress=False)
    run = workbench.open_run(folder / "run.h5")
    [out] = analyze(run, [build_analyses().get("sae")],
                    {"sae": {"hook": HOOK, "features": 64, "k": 4, "batch": 64, "ce": False}}, model=model)
    assert out.ok, out.stored.error
    yield run, model, stored_sae(out.stored)
    run.close()


def _run(run, model, **params):
    [out] = analyze(run, [build_analyses().get(NAME)], {NAME: {"tokens": 0, **params}}, force=True, model=model)
    assert out.ok, out.stored.error
    return out.stored


def _context(run, model, params):
    a = build_analyses().get(NAME)
    return AnalysisContext(run=run, params=a.resolve_params({"tokens": 0, "prompts": "0", **params}), analysis=a,
                           n_prompts=len(run), _model_loader=lambda: model)


def _tokens(run, i):
    return [int(t) for t in run.tokens(i)[: run.n_input_tokens(i)]]


def _clean(model, tokens):
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.tensor([tokens]), names_filter=[HOOK])
    return cache[HOOK][0].numpy().astype(np.float32)


def _strongest(sae, x):
    """The feature with the largest activation on this prompt (past the first position)."""
    acts = sae.encode(x)[1:]
    f = int(np.argmax(acts.max(0)))
    assert acts[:, f].max() > 0
    return f


def _metric_by_hand(model, tokens, delta, kind, target, wrong):
    """One plain forward pass with ``delta`` (positions, d_model) added at HOOK, the metric from
    its logits in float64."""
    add = torch.as_tensor(delta, dtype=torch.float32)

    def fn(act, hook):
        return act + add

    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=[(HOOK, fn)]):
        logits = model.bridge(torch.tensor([tokens]))[0].double().numpy()
    if kind == "logit_diff":
        return logits[-1, target] - logits[-1, wrong]
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(tokens) - 1), tokens[1:]].mean()


@pytest.mark.parametrize("kind", ["logit_diff", "loss"])
def test_ablation_equals_a_hooked_pass_by_hand(setup, kind):
    run, model, sae = setup
    tokens = _tokens(run, 0)
    x = _clean(model, tokens)
    f = _strongest(sae, x)
    out = _run(run, model, feature=f, metric=kind, prompts="0")
    rec, arr = out.data["prompts"][0], out.arrays
    a = sae.encode(x)[:, f]
    np.testing.assert_allclose(arr["activation"], a, atol=1e-6)
    delta = -a[:, None] * sae.W_dec[f][None, :]
    delta[0] = 0  # skip=auto: the first position (BOS) is never edited
    target, wrong = rec["target_id"], rec["wrong_id"]
    assert (kind == "logit_diff") == (wrong is not None)
    base = _metric_by_hand(model, tokens, np.zeros_like(delta), kind, target, wrong)
    want = _metric_by_hand(model, tokens, delta, kind, target, wrong)
    assert rec["baseline"] == pytest.approx(base, abs=1e-5)
    assert rec["intervened"] == pytest.approx(want, abs=1e-5)
    assert abs(want - base) > 1e-4  # the feature matters: the comparison is not vacuous
    assert rec["fired_positions"] == [q for q in range(len(tokens)) if a[q] > 0]
    # the per-position rows: the edit at the strongest position alone; silent positions are the baseline
    q = int(np.argmax(a[1:])) + 1
    alone = np.zeros_like(delta)
    alone[q] = delta[q]
    values = arr["position_values"]
    assert values[q] == pytest.approx(_metric_by_hand(model, tokens, alone, kind, target, wrong), abs=1e-5)
    assert np.isnan(values[0]) and all(values[p] == rec["baseline"] for p in range(1, len(tokens)) if a[p] == 0)
    assert out.data["shared_prefix"]
    text = build_analyses().get(NAME).text(out.result())
    assert f"feature {f} ablated" in text and "fires at" in text


def test_callable_source_equals_the_same_values_written_as_a_tensor(setup):
    """The engine's function-of-the-activation source equals the precomputed tensor, batched and
    one pass per row (a single edit at a hook sees the clean activation there)."""
    run, model, sae = setup
    tokens = _tokens(run, 1)
    x = torch.as_tensor(_clean(model, tokens))
    edit = FeatureEdit(sae, _strongest(sae, x.numpy()), "ablate")
    metric = Metric("loss", tokens)
    iv = Intervener(model, tokens, metric)
    rows = [(Edit(HOOK, 0),), *[(Edit(HOOK, 0, pos=p),) for p in range(len(tokens))]]
    with torch.inference_mode():
        fixed = iv.run(rows, {HOOK: edit(x)})
    live = iv.run(rows, {HOOK: edit})
    single = iv.run(rows[:4], {HOOK: edit}, batched=False)  # one full pass per row (slow: four rows)
    np.testing.assert_allclose(live, fixed, atol=1e-6, rtol=0)
    np.testing.assert_allclose(live[:4], single, atol=1e-5, rtol=0)
    assert np.ptp(live) > 1e-5


def test_clamping_to_its_own_activation_changes_nothing(setup):
    run, model, sae = setup
    tokens = _tokens(run, 0)
    x = _clean(model, tokens)
    f = _strongest(sae, x)
    a = sae.encode(x)[:, f]
    q = int(np.argmax(a[1:])) + 1
    same = _run(run, model, feature=f, mode="clamp", value=float(a[q]), positions=str(q), prompts="0")
    rec = same.data["prompts"][0]
    assert rec["edited_positions"] == [q]
    assert rec["intervened"] == pytest.approx(rec["baseline"], abs=1e-5)
    assert same.arrays["activation_after"][q] == pytest.approx(a[q], abs=1e-5)
    more = _run(run, model, feature=f, mode="clamp", value=float(a[q]) + 1.0, positions=str(q), prompts="0")
    assert abs(more.data["prompts"][0]["change"]) > 1e-4
    # clamping to 0 everywhere is ablation
    zero = _run(run, model, feature=f, mode="clamp", value=0.0, prompts="0")
    ablate = _run(run, model, feature=f, prompts="0")
    assert zero.data["prompts"][0]["intervened"] == pytest.approx(ablate.data["prompts"][0]["intervened"], abs=1e-6)


def test_steering_along_a_planted_feature(setup, tmp_path):
    """An SAE whose feature 2 decodes to token t's unembedding at the last layer: steering along it
    with alpha 0 generates what the model generates unedited; a large alpha makes it say t."""
    run, model, _ = setup
    t = model.tokenize("q", bos="none")[0]
    w_u = model.bridge.original_model.get_output_embeddings().weight.detach().float().numpy()
    d = w_u.shape[1]
    rng = np.random.default_rng(0)
    W_dec = rng.normal(size=(8, d)).astype(np.float32)
    W_dec[2] = w_u[t]
    last = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
    SAE(architecture="standard", W_enc=rng.normal(size=(d, 8)).astype(np.float32), b_enc=np.zeros(8, np.float32),
        W_dec=W_dec, b_dec=np.zeros(d, np.float32), hook_name=last).save(tmp_path / "planted")
    common = {"sae": str(tmp_path / "planted"), "feature": 2, "mode": "steer", "tokens": 4, "temperature": 0.0,
              "prompts": "0", "metric": "logit", "target": "q"}
    off = _run(run, model, alpha=0.0, **common).data["prompts"][0]
    assert off["same_output"] and len(off["plain"]["ids"]) == 4 and off["change"] == pytest.approx(0, abs=1e-6)
    on = _run(run, model, alpha=200.0, **common)
    rec = on.data["prompts"][0]
    assert rec["edited"]["ids"] == [t] * 4 and rec["plain"]["ids"] != [t] * 4 and not rec["same_output"]
    assert rec["change"] > 1 and on.data["decoder_norm"] == pytest.approx(float(np.linalg.norm(w_u[t])), rel=1e-5)
    assert rec["plain"]["ids"] == off["plain"]["ids"]  # the same seed, the same unedited generation
    assert "with:" in build_analyses().get(NAME).text(on.result())


@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm", "topk_rescaled"])
def test_ablation_removes_the_features_part_of_the_reconstruction(norm):
    """For SAEs that normalise their input or rescale TopK activations by the decoder norm, the
    feature's part is what it adds to the SAE's own (numpy) reconstruction: decode(a) - decode(a
    with a_f = 0), in the input's units."""
    rng = np.random.default_rng(2)
    d, F, f = 6, 10, 3
    sae = SAE(architecture="standard", W_enc=rng.normal(size=(d, F)).astype(np.float32),
              b_enc=np.full(F, 0.5, np.float32), W_dec=rng.normal(size=(F, d)).astype(np.float32),
              b_dec=rng.normal(size=d).astype(np.float32),
              normalize_activations="none" if norm == "topk_rescaled" else norm)
    if norm == "topk_rescaled":
        sae.architecture, sae.k, sae.rescale_acts_by_decoder_norm = "topk", 3, True
    sae.b_enc[f] = 100.0  # fires everywhere
    x = (3 * rng.normal(size=(5, d)) + 1).astype(np.float32)
    acts = sae.encode(x)
    off = acts.copy()
    off[:, f] = 0
    assert acts[:, f].min() > 0
    want = x - (sae.decode(acts, x) - sae.decode(off, x))
    with torch.inference_mode():
        got = FeatureEdit(sae, f, "ablate")(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(got - x).max() > 1e-2


def test_positions_parse():
    assert parse_positions("all", 5) is None
    assert parse_positions("0,3-4,-1", 5) == [0, 3, 4]
    assert parse_positions("7", 5) == []


def test_user_errors_exit_2_with_one_line(setup, tmp_path):
    run, model, _ = setup
    path = str(run.final_path)
    cases = [
        ([f"{NAME}.feature=64"], "feature 64: the SAE has 64 features (0..63)"),
        ([f"{NAME}.feature=1", f"{NAME}.sae=blocks.1.hook_mlp_out"], "no SAE matching 'blocks.1.hook_mlp_out'"),
    ]
    for params, message in cases:
        r = _cli("analyze", path, NAME, *[a for p in params for a in ("--param", p)])
        assert r.returncode == 2, (params, r.stderr)
        lines = [x for x in r.stderr.strip().splitlines() if x.startswith("workbench: error")]
        assert len(lines) == 1 and message in lines[0], (params, r.stderr)
    for params, message in [({}, "name the feature"), ({"feature": 1, "sae": f"{tmp_path}/nope"}, "no such SAE folder"),
                            ({"feature": 1, "positions": "a-b"}, "positions: 'a-b' is not"),
                            ({"feature": 1, "hook": "blocks.9.hook_resid_post"}, "has no hook")]:
        with pytest.raises(UserError, match=message):
            build_analyses().get(NAME).compute(_context(run, model, params))
