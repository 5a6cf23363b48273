"""Ablation, activation and attribution patching, steering (plugins/interventions.py, intervene.py).

Oracles: TransformerLens' own ``run_with_hooks`` with a hook written here, one forward pass per
intervention (the batched, prefix-sharing engine must equal it within 1e-5); means over the
reference prompts from ``run_with_cache`` with numpy; the patching end points (the whole residual
stream before layer 0 patched gives 1, nothing patched gives 0); a central finite difference of
the real patch for attribution patching; the toy induction model's known circuit; for steering,
the residual stream's projection, which must rise by exactly alpha at the steered layer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from workbench_plugins import interventions as I
from workbench_plugins.intervene import Edit, Intervener, Metric, hook_names

import workbench
from tests import widgets
from tests.clitools import run_cli as _cli
from workbench.registries import analyze, build_analyses


def _hooked_metric(model, tokens, metric, edits):
    """The oracle: one plain forward pass with TransformerLens hooks that overwrite ``edits``
    (hook, pos or None, head or None, value tensor laid out like the activation without batch)."""
    def make(pos, head, value):
        def fn(act, hook):
            act = act.clone()
            idx = (slice(None) if pos is None else pos,) + (() if head is None else (head,))
            act[(0, *idx)] = value[idx]
            return act
        return fn

    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(torch.tensor([tokens]),
                                             fwd_hooks=[(h, make(p, k, v)) for h, p, k, v in edits])
    return float(metric(logits[:, metric.positions]))


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = tiny_models["tiny-llama"]
    tokens = model.tokenize("the cat sat on the mat")
    return model, tokens


@pytest.mark.parametrize("kind", ["logit", "loss"])
def test_batched_engine_equals_one_hooked_pass_per_row(llama, kind):
    model, tokens = llama
    metric = Metric(kind, tokens, target=int(tokens[2]))
    iv = Intervener(model, tokens, metric)
    assert iv.shared_prefix, iv.fallback_reason
    assert iv.shared_positions == (kind == "logit"), iv.positions_reason  # loss reads position 0
    assert (iv._narrow is not None) == (kind == "logit")  # one row of the unembedding, or all of it
    n_layers, n = len(model.bridge.blocks), len(tokens)
    hooks = [hook_names(layer)[k] for layer in range(n_layers) for k in ("z", "attn", "mlp", "resid")]
    acts = iv.activations(hooks)
    rng = torch.Generator().manual_seed(0)
    source = {h: torch.randn(a.shape, generator=rng) for h, a in acts.items()}
    n_heads = acts[hook_names(0)["z"]].shape[1]
    rows = [r for c in I.ABLATION_COMPONENTS for r in I.ablation_rows(c, n_layers, n_heads, n, True)]
    rows.append((Edit(hook_names(1)["z"], 1, pos=3, head=1), Edit(hook_names(0)["mlp"], 0, pos=2)))
    batched = iv.run(rows, source)
    assert len(rows) == n_layers * (n_heads + 2 + n) + 1
    oracle = [_hooked_metric(model, tokens, metric, [(e.hook, e.pos, e.head, source[e.hook]) for e in row])
              for row in rows]
    np.testing.assert_allclose(batched, oracle, atol=1e-5, rtol=0)
    assert np.ptp(batched) > 1e-3  # the edits change the metric: the comparison is not vacuous


def test_ablating_every_head_equals_zeroing_the_attention_output(llama):
    """hook_z is what the output projection reads: all heads of a layer zeroed = the attention
    output zeroed (tiny-llama's o_proj has no bias)."""
    model, tokens = llama
    metric = Metric("logit", tokens, target=5)
    iv = Intervener(model, tokens, metric)
    z, attn = hook_names(1)["z"], hook_names(1)["attn"]
    acts = iv.activations([z, attn])
    source = {z: torch.zeros_like(acts[z]), attn: torch.zeros_like(acts[attn])}
    heads = tuple(Edit(z, 1, head=h) for h in range(acts[z].shape[1]))
    a, b = iv.run([heads, (Edit(attn, 1),)], source)
    assert abs(a - b) < 1e-5 and abs(a - iv.baseline) > 1e-4


def test_patching_end_points(llama):
    """Patching the whole residual stream before layer 0 from the clean prompt reproduces the
    clean metric (1.0 normalised); patching nothing leaves the corrupted one (0.0)."""
    model, clean = llama
    corrupt = model.tokenize("the dog sat on the rug")
    assert len(corrupt) == len(clean)
    metric = Metric("logit_diff", clean, target=clean[5], wrong=corrupt[5])
    with torch.inference_mode():
        clean_value = float(metric(model.forward(torch.tensor([clean]))[:, metric.positions]))
    iv = Intervener(model, corrupt, metric)
    resid0 = hook_names(0)["resid"]
    source = iv.activations([resid0], clean)
    everything = tuple(Edit(resid0, 0, pos=p) for p in range(len(clean)))
    whole, nothing = (iv.run([everything, ()], source) - iv.baseline) / (clean_value - iv.baseline)
    assert abs(clean_value - iv.baseline) > 1e-3
    assert abs(whole - 1.0) < 1e-6 and nothing == 0.0  # float32 in a batch: measured 1e-7 from 1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_rows_run_from_their_first_changed_position(tiny_models, name):
    """A row whose edits leave every position before q as it was runs positions q.. only, on the
    clean pass's keys and values before q (Llama's cache is a keyword, GPT-2's a positional
    argument), and still equals one hooked pass per row; a row that writes only what is already
    there is the clean pass itself."""
    model = tiny_models[name]
    tokens = model.tokenize("the cat sat on the mat")
    n, n_layers = len(tokens), len(model.bridge.blocks)
    metric = Metric("logit", tokens, target=int(tokens[2]))
    iv = Intervener(model, tokens, metric)
    assert iv.shared_positions, iv.positions_reason
    assert not Intervener(model, tokens, Metric("loss", tokens)).shared_positions  # reads position 0
    resid, z = hook_names(1)["resid"], hook_names(0)["z"]
    acts = iv.activations([resid, z])
    rng = torch.Generator().manual_seed(1)
    source = {h: a.clone() for h, a in acts.items()}  # the clean values, then changed from a position on
    source[resid][3:] = torch.randn(source[resid][3:].shape, generator=rng)
    source[z][n - 2:, 1] = torch.randn(source[z][n - 2:, 1].shape, generator=rng)
    rows = [(Edit(resid, 1, pos=p),) for p in range(n)]
    rows += [(Edit(resid, 1),), (Edit(z, 0, head=1),), (Edit(z, 0, head=0),), (Edit(z, 0, head=1), Edit(resid, 1, pos=4))]
    assert iv.first_changes(rows, source) == [n, n, n, *range(3, n), 3, n - 2, n, min(4, n - 2)]
    lengths = []
    hook = model.bridge.blocks[n_layers - 1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    try:
        batched = iv.run(rows, source)
    finally:
        hook.remove()
    assert lengths and max(lengths) <= n - 3  # no pass ran the positions before 3
    oracle = [_hooked_metric(model, tokens, metric, [(e.hook, e.pos, e.head, source[e.hook]) for e in row])
              for row in rows]
    np.testing.assert_allclose(batched, oracle, atol=1e-5, rtol=0)
    for k in (0, 1, 2, n + 2):  # nothing changed: the clean pass, bit for bit, as one hooked pass gives it
        assert batched[k] == iv.baseline and oracle[k] == pytest.approx(iv.baseline, abs=1e-6)
    assert np.ptp(batched) > 1e-3


def test_attribution_is_the_derivative_of_the_real_patch(llama):
    """grad . (clean - corrupted) against a central finite difference of the patch, d/de
    metric(corrupted + e (clean - corrupted)) at e = 0, by TransformerLens hooks in float64."""
    model, clean = llama
    corrupt = model.tokenize("the dog sat on the rug")
    metric = Metric("logit_diff", clean, target=clean[5], wrong=corrupt[5])
    iv = Intervener(model, corrupt, metric)
    hooks = [hook_names(layer)[k] for layer in range(2) for k in ("resid", "attn", "mlp", "z")]
    clean_acts = iv.activations(hooks, clean)
    value, corrupt_acts, grads = iv.gradients(hooks)
    assert value == pytest.approx(iv.baseline, abs=1e-5)
    model.bridge.double()
    try:
        checked = 0
        for comp in ("resid", "attn", "mlp", "heads"):
            est = I.attribution(comp, grads, clean_acts, corrupt_acts, 2)
            for layer in range(2):
                h = hook_names(layer)[I._hook_key(comp)]
                cells = [(None, k) for k in range(est.shape[1])] if comp == "heads" else [(p, None) for p in (1, 3, 6)]
                for p, k in cells:
                    base, delta = corrupt_acts[h].double(), (clean_acts[h] - corrupt_acts[h]).double()
                    eps, vals = 1e-3, []
                    for sign in (1, -1):
                        v = base.clone()
                        idx = (slice(None), k) if comp == "heads" else (p,)
                        v[idx] = base[idx] + sign * eps * delta[idx]
                        vals.append(_hooked_metric(model, corrupt, metric, [(h, None if comp == "heads" else p, k, v)]))
                    fd = (vals[0] - vals[1]) / (2 * eps)
                    got = est[layer, k] if comp == "heads" else est[p, layer]
                    assert got == pytest.approx(fd, abs=2e-4 + 2e-3 * abs(fd)), (comp, layer, p, k)
                    checked += 1
        assert checked == 2 * (3 + 3 + 3 + model.info.n_heads)
    finally:
        model.bridge.float()


# --- the analyses on stored runs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("llama")
    prompts = [{"prompt": "the cat sat on the mat", "answer": "s", "wrong": "t", "corrupted": "the dog sat on the rug"},
               {"prompt": "a b c d e", "answer": "f", "corrupted": "a b x d e"},
               {"prompt": "no corruption here"}]
    (folder / "p.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    workbench.capture(tiny_models["tiny-llama"], str(folder / "p.jsonl"), hooks=["residual"],
                      out=folder / "run.h5", progress=False)
    run = workbench.open_run(folder / "run.h5")
    yield run
    run.close()


def _analyze(run, model, name, **params):
    [out] = analyze(run, [build_analyses().get(name)], {name: params}, force=True, model=model)
    assert out.ok, out.stored.error
    return out.stored


def test_mean_ablation_uses_the_mean_over_the_run_and_differs_from_zero(llama_run, tiny_models):
    model = tiny_models["tiny-llama"]
    zero = _analyze(llama_run, model, "ablation", method="zero", component="heads", prompts="0")
    mean = _analyze(llama_run, model, "ablation", method="mean", component="heads", prompts="0")
    # the oracle: means over the own tokens of all three prompts (not the BOS), by numpy
    z = hook_names(1)["z"]
    own = []
    for i in range(3):
        toks = llama_run.tokens(i)[: llama_run.n_input_tokens(i)].tolist()
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(torch.tensor([toks]), names_filter=[z])
        own.append(cache[z][0, 1:].double().numpy())
    mu = np.concatenate(own).mean(0)
    assert np.abs(mu).max() > 1e-3
    tokens = [int(t) for t in llama_run.tokens(0)[: llama_run.n_input_tokens(0)]]
    rec = mean.data["prompts"][0]
    metric = Metric("logit_diff", tokens, rec["target_id"], rec["wrong_id"])
    for head in range(mu.shape[0]):
        value = torch.tensor(np.broadcast_to(mu, (len(tokens), *mu.shape)).copy(), dtype=torch.float32)
        want = _hooked_metric(model, tokens, metric, [(z, None, head, value)])
        assert mean.arrays["heads"][0, 1, head] == pytest.approx(want, abs=1e-5)
    assert np.abs(mean.arrays["heads"] - zero.arrays["heads"]).max() > 1e-4
    assert rec["metric"] == "logit_diff" and rec["baseline"] == pytest.approx(
        _hooked_metric(model, tokens, metric, []), abs=1e-5)


def test_patching_analysis_on_a_run(llama_run, tiny_models):
    """One changed token: patching the residual stream at layer 0 there is the whole difference
    (1.0); at an unchanged position it patches nothing (0.0)."""
    out = _analyze(llama_run, tiny_models["tiny-llama"], "patching")
    d, a = out.data, out.arrays
    assert [p["index"] for p in d["prompts"]] == [0, 1]  # prompt 2 has no corrupted text
    rec = d["prompts"][1]
    assert rec["changed_positions"] == [5]  # "a b x d e": BOS, a, ' ', b, ' ', x
    block = a["resid"][rec["offset"] : rec["offset"] + rec["n_tokens"]]
    # float32 rounding divided by a small clean - corrupted difference (about 0.1 logits here)
    assert block[5, 0] == pytest.approx(1.0, abs=1e-4)
    assert np.abs(block[:5, 0]).max() < 1e-4
    assert a["heads"].shape == (2, 2, 4) and a["attr_heads"].shape == (2, 2, 4)
    assert set(rec["correlation"]) == {"resid", "attn", "mlp", "heads"}
    text = build_analyses().get("patching").text(out.result())
    assert "0 = corrupted, 1 = clean" in text and "r = " in text


def test_toy_induction_heads_carry_the_repetition(tmp_path):
    """Mean-ablating the previous-token head (L0H1) or the induction head (L1H0) of the toy
    induction model takes the repeated letter's probability to about chance (1/52); the other
    layer-0 head (L0H0) leaves several times more of it."""
    import random

    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = []
    for _ in range(8):
        s = rng.sample(letters, 10)
        lines.append(json.dumps({"prompt": " ".join(s + s[:-1]), "answer": s[-1]}))
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    workbench.capture("toy-induction", str(tmp_path / "p.jsonl"), hooks=["residual"], out=tmp_path / "t.h5",
                      progress=False)
    with workbench.open_run(tmp_path / "t.h5") as run:
        [out] = analyze(run, [build_analyses().get("ablation")],
                        {"ablation": {"method": "mean", "component": "heads", "metric": "prob"}})
    heads = out.stored.arrays["heads"]  # (prompts, layers, heads)
    base = np.array([p["baseline"] for p in out.stored.data["prompts"]])
    assert base.min() > 0.6
    assert heads[:, 0, 1].max() < 0.05 and heads[:, 1, 0].max() < 0.12
    assert heads[:, 0, 0].mean() > 5 * heads[:, 1, 0].mean()


def test_steering_adds_alpha_along_the_direction(llama_run, tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    rng = np.random.default_rng(0)
    v = rng.normal(size=model.info.d_model)
    np.save(tmp_path / "v.npy", v)
    out = _analyze(llama_run, model, "steering", direction=str(tmp_path / "v.npy"), layer="0", alpha=3.0,
                   tokens=5, prompts="0,1")
    d, a = out.data, out.arrays
    li = d["rows"].index("0")
    diff = a["projection_prompt"][:, 1, :] - a["projection_prompt"][:, 0, :]
    np.testing.assert_allclose(diff[:, li], 3.0, atol=1e-4)  # exactly alpha at the steered layer
    np.testing.assert_allclose(diff[:, : li], 0.0, atol=1e-6)  # nothing before it
    same = _analyze(llama_run, model, "steering", direction=str(tmp_path / "v.npy"), layer="0", alpha=0.0,
                    tokens=5, prompts="0")
    rec = same.data["prompts"][0]
    assert rec["same_output"] and len(rec["plain"]["ids"]) == 5
    again = _analyze(llama_run, model, "steering", direction=str(tmp_path / "v.npy"), layer="0", alpha=3.0,
                     tokens=5, prompts="0,1")
    assert [p["steered"]["ids"] for p in again.data["prompts"]] == [p["steered"]["ids"] for p in d["prompts"]]


def test_steering_along_a_tokens_unembedding_makes_the_model_say_it(llama_run, tiny_models, tmp_path):
    """A known mechanism: adding a large multiple of token t's unembedding vector to the last
    residual stream makes t the greedy choice at every step."""
    model = tiny_models["tiny-llama"]
    t = model.tokenize("q", bos="none")[0]
    w_u = model.bridge.original_model.get_output_embeddings().weight.detach().double().numpy()
    np.save(tmp_path / "u.npy", w_u[t])
    last = str(model.info.n_layers - 1)
    out = _analyze(llama_run, model, "steering", direction=str(tmp_path / "u.npy"), layer=last, alpha=200.0,
                   tokens=4, temperature=0.0, prompts="0")
    rec = out.data["prompts"][0]
    assert rec["steered"]["ids"] == [t] * 4 and rec["plain"]["ids"] != [t] * 4


def test_user_errors_exit_2_with_one_line(llama_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "abc", "answer": "d", "corrupted": "abcd"}) + "\n")
    path = str(llama_run.final_path)
    cases = [
        (["capture", "-m", "tiny-llama", "--prompts", str(bad), "-o", str(tmp_path / "b.h5")],
         "its corrupted prompt has 5 tokens, the prompt 4; patching needs equal lengths"),
        (["analyze", path, "ablation", "--param", "ablation.prompts=7"], "the run has no prompt 7"),
        (["analyze", path, "ablation", "--param", "ablation.prompts=1", "--param", "ablation.metric=logit_diff"],
         "needs a wrong token"),
        (["analyze", path, "steering"], "steering needs a direction"),
        (["analyze", path, "steering", "--param", "steering.direction=nope"], "no direction named 'nope'"),
        (["analyze", path, "steering", "--param", f"steering.direction={tmp_path}/x.npy",
          "--param", "steering.layer=0"], "direction file not found"),
    ]
    for args, message in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [x for x in r.stderr.strip().splitlines() if x.startswith("workbench: error")]
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)


def test_views_render(llama_run, tiny_models, tmp_path):
    from types import SimpleNamespace

    from workbench_plugins.interventions_view import AblationView, PatchingView, SteeringView

    def plain(view):
        return widgets.plain(SimpleNamespace(content=view.draw()))

    model = tiny_models["tiny-llama"]
    abl = _analyze(llama_run, model, "ablation", prompts="0")
    view = AblationView(abl, llama_run)
    text = plain(view)
    assert "zero ablation" in text and "H3" in text and "MLP" in text and "unablated" in text
    view.action_toggle_positions()
    assert "residual stream at each layer's entry" in plain(view)
    pat = _analyze(llama_run, model, "patching", prompts="1")
    view = PatchingView(pat, llama_run)
    view.prompt = 1
    assert "activation patching · resid" in plain(view) and "r = " in plain(view)
    view.action_toggle_attribution()
    assert "attribution patching · resid" in plain(view)
    for _ in range(3):
        view.action_component()
    assert "· heads ·" in plain(view) and "H0" in plain(view)
    np.save(tmp_path / "v.npy", np.ones(model.info.d_model))
    st = _analyze(llama_run, model, "steering", direction=str(tmp_path / "v.npy"), layer="1", tokens=3,
                  prompts="0")
    text = plain(SteeringView(st, llama_run))
    assert "without" in text and "with" in text and st.data["prompts"][0]["plain"]["text"][:3] in text
