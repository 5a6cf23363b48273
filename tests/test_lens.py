"""Logit lens, direct logit attribution, neurons and the next-token distribution (plugins/lens.py).

Checked against independent computations: a fresh forward pass of the model (the lens's last
layer, the attribution's total), the final LayerNorm and unembedding applied by hand with the
Hugging Face module's own parameters (every lens layer), TransformerLens' ``logit_attrs`` on a
weight-processed (LayerNorm-folded) bridge (every head's and MLP's attribution, every neuron's
term), and numpy softmax / entropy / nucleus counts (the distribution).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from workbench_plugins import lens as L
from workbench_plugins.readout import Readout, attribute, neuron_terms

import workbench
from tests.clitools import run_cli as _cli
from tests.widgets import plain
from workbench.analysis import missing_inputs
from workbench.registries import analyze, build_analyses

PROMPTS = [
    {"prompt": "The cat sat on the mat", "answer": "and", "wrong": "or"},  # byte tokens: 'a' vs 'o'
    {"prompt": "abc abc ab"},
    {"prompt": "hi"},
]




@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A tiny GPT-2 run captured for every lens analysis, and its model."""
    model = workbench.load_model("tiny-gpt2", device="cpu", progress=False)
    out = tmp_path_factory.mktemp("lens") / "run.h5"
    from workbench.capturing.prompts import Prompt

    items = [Prompt(text=p["prompt"], id=f"p{i}", metadata={k: v for k, v in p.items() if k != "prompt"})
             for i, p in enumerate(PROMPTS)]
    needs = sorted({n for a in ("logit-lens", "dla", "neurons") for n in build_analyses().get(a).needs})
    workbench.capture(model, items, hooks=needs, out=out, progress=False)
    run = workbench.open_run(out)
    yield run, model
    run.close()


def _processed_cache(tokens):
    """A fresh tiny GPT-2 with TransformerLens' weight processing (LayerNorm folded into the
    unembedding, writing weights centred) and its cache: the oracle for attributions."""
    m = workbench.load_model("tiny-gpt2", device="cpu", progress=False)
    m.bridge.enable_compatibility_mode(disable_warnings=True)
    torch.set_grad_enabled(False)  # restored by the autouse fixture below
    return m.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long)[None])


@pytest.fixture(autouse=True)
def _grad_mode():
    yield
    torch.set_grad_enabled(True)


# --- logit lens ---------------------------------------------------------------------------------


def test_logit_lens_equals_the_final_norm_and_unembedding_by_hand(gpt2_run):
    run, model = gpt2_run
    [out] = analyze(run, [build_analyses().get("logit-lens")], {"logit-lens": {"top": 4}}, model=model)
    assert out.ok, out.stored.error
    a, d = out.stored.arrays, out.stored.data
    hf = model.bridge.original_model
    ln_f, lm_head = hf.transformer.ln_f, hf.lm_head
    for p in d["prompts"]:
        i, off, n = p["index"], p["offset"], p["n_tokens"]
        tokens = torch.as_tensor(run.tokens(i), dtype=torch.long)[None]
        with torch.inference_mode():
            real = torch.log_softmax(model.forward(tokens)[0].double(), -1)
        for r, hook in enumerate(d["hooks"]):
            resid = torch.as_tensor(run.activation(hook, i))
            with torch.inference_mode():  # by hand: torch's layer_norm with the HF module's weights
                logits = torch.nn.functional.layer_norm(resid, (resid.shape[-1],), ln_f.weight, ln_f.bias,
                                                        ln_f.eps) @ lm_head.weight.T
            logp = torch.log_softmax(logits.double(), -1)
            top = torch.topk(logp, 4, dim=-1)
            np.testing.assert_allclose(a["top_probs"][off : off + n, r], top.values.exp().numpy(), atol=1e-5)
            kl = (real.exp() * (real - logp)).sum(-1).numpy()
            np.testing.assert_allclose(a["kl"][off : off + n, r], kl, atol=1e-5)
            t = a["target_ids"][off : off + n]
            has = t >= 0
            ranks = (logits > logits.gather(-1, torch.as_tensor(np.where(has, t, 0))[:, None])).sum(-1) + 1
            assert (a["target_rank"][off : off + n, r][has] == ranks.numpy()[has]).all()
        # the last layer is the model's output
        assert a["kl"][off : off + n, -1].max() < 1e-6
        assert (a["top_ids"][off : off + n, -1, 0] == real.argmax(-1).numpy()).all()
        # targets: the next token; at the last position the answer where the prompt has one
        assert (a["target_ids"][off : off + n - 1] == run.tokens(i)[1:]).all()
    assert a["target_ids"][d["prompts"][0]["n_tokens"] - 1] == model.tokenizer("and")["input_ids"][0]
    assert a["target_ids"][d["prompts"][1]["offset"] + d["prompts"][1]["n_tokens"] - 1] == -1
    assert d["layers"] == ["embed", "0", "1"]
    text = L.LOGIT_LENS.text(out.stored.result())
    answer = model.str_tokens([model.tokenizer("and")["input_ids"][0]])[0]
    assert "last position" in text and f"target {answer!r}" in text


def _lens_on(model, hooks, out):
    """Capture PROMPTS with ``hooks``, run the logit lens: (stored tensors, data, arrays)."""
    from workbench.capturing.prompts import Prompt

    items = [Prompt(text=p["prompt"], id=f"p{i}", metadata={k: v for k, v in p.items() if k != "prompt"})
             for i, p in enumerate(PROMPTS)]
    workbench.capture(model, items, hooks=hooks, out=out, progress=False)
    with workbench.open_run(out) as run:
        lens = build_analyses().get("logit-lens")
        assert missing_inputs(run, lens) == []
        [o] = analyze(run, [lens], {"logit-lens": {"top": 4}}, model=model)
        assert o.ok, o.stored.error
        return set(run.hooks), o.stored.data, {k: np.asarray(v) for k, v in o.stored.arrays.items()}


def _assert_same_lens(a, b, rows=slice(None)):
    """Equal lenses (``a`` restricted to ``rows``); returns the largest absolute difference."""
    worst = 0.0
    for name in ("top_probs", "target_prob", "kl"):
        x, y = a[name][:, rows], b[name]
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
        worst = max(worst, float(np.nanmax(np.abs(x.astype(np.float64) - y))))
    for name in ("top_ids", "target_rank"):
        assert (a[name][:, rows] == b[name]).all(), name
    assert (a["target_ids"] == b["target_ids"]).all() and (a["offsets"] == b["offsets"]).all()
    return worst


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_logit_lens_reads_the_residual_stream_alone(tiny_models, tmp_path, name):
    """The same lens from a ``lens`` run, a ``residual`` run and a run of only
    ``blocks.*.hook_resid_post`` (without the embedding row): each row's final-norm scale comes
    from the row itself, not from a stored ``ln_final.hook_scale``."""
    model = tiny_models[name]
    _, d_lens, lens = _lens_on(model, ["lens"], tmp_path / "lens.h5")
    _, d_res, res = _lens_on(model, ["residual"], tmp_path / "residual.h5")
    stored, d_post, post = _lens_on(model, ["blocks.*.hook_resid_post"], tmp_path / "post.h5")
    assert stored == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert d_lens["layers"] == d_res["layers"] == ["embed", "0", "1"] and d_post["layers"] == ["0", "1"]
    assert _assert_same_lens(lens, res) < 1e-5
    assert _assert_same_lens(lens, post, slice(1, None)) < 1e-5
    assert d_lens["max_kl_to_model"] < 1e-6 and d_post["max_kl_to_model"] < 1e-6


def test_capture_for_logit_lens_captures_the_residual_stream_only(tmp_path):
    from workbench.cli import main

    out = tmp_path / "for.h5"
    with pytest.raises(SystemExit) as exit_info:
        main(["capture", "-m", "tiny-llama", "-p", "abc abc", "--for", "logit-lens", "-o", str(out)])
    assert exit_info.value.code == 0
    with workbench.open_run(out) as run:
        assert sorted(run.hooks) == ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre",
                                     "blocks.1.hook_resid_post"]  # stored tensors (their aliases aside)
        assert missing_inputs(run, build_analyses().get("logit-lens")) == []
        assert missing_inputs(run, build_analyses().get("dla"))  # attribution needs more


@pytest.mark.integration
def test_gemma3_logit_lens_from_the_residual_stream_equals_the_lens_run(gemma3, tmp_path):
    """Gemma's post-norms (sandwich norms) sit inside the blocks: the lens is still the final norm
    of the residual stream, recomputed from it; the same numbers as from a ``lens`` run."""
    _, d_lens, lens = _lens_on(gemma3, ["lens"], tmp_path / "lens.h5")
    _, d_post, post = _lens_on(gemma3, ["blocks.*.hook_resid_post"], tmp_path / "post.h5")
    assert _assert_same_lens(lens, post, slice(1, None)) < 1e-5
    assert d_lens["max_kl_to_model"] < 1e-5 and d_post["max_kl_to_model"] < 1e-5


# --- direct logit attribution ------------------------------------------------------------------


def test_dla_equals_transformer_lens_logit_attrs_and_sums_to_the_logit(gpt2_run):
    run, model = gpt2_run
    [out] = analyze(run, [build_analyses().get("dla")], model=model)
    assert out.ok, out.stored.error
    d, a = out.stored.data, out.stored.arrays
    rec = d["prompts"][0]
    assert rec["source"] == "answer" and rec["target"] == "a" and rec["wrong"] == "o"
    assert [r["source"] for r in d["prompts"][1:]] == ["top prediction", "top prediction"]
    for rec in d["prompts"]:
        i, pos = rec["index"], rec["position"]
        tokens = run.tokens(i)
        with torch.inference_mode():
            real = model.forward(torch.as_tensor(tokens, dtype=torch.long)[None])[0, pos].double()
        actual = float(real[rec["target_id"]] - (real[rec["wrong_id"]] if rec["wrong_id"] is not None else 0))
        assert rec["total"] == pytest.approx(actual, rel=1e-4, abs=1e-5)
        assert rec["rel_error"] < 1e-4 and rec["resid_check"] < 1e-5 and rec["attn_check"] < 1e-5
        # TransformerLens' own attribution: a logit difference (the processed model centres the
        # unembedding, which shifts single logits by a constant but leaves differences)
        wrong = rec["wrong_id"] if rec["wrong_id"] is not None else int(real.argmin())
        mine = attribute(run, Readout(model), i, pos, rec["target_id"], wrong)
        _, cache = _processed_cache(tokens[: pos + 1])
        target, other = torch.tensor([rec["target_id"]]), torch.tensor([wrong])
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)
        tl_heads = cache.logit_attrs(heads, tokens=target, incorrect_tokens=other, pos_slice=-1).flatten()
        np.testing.assert_allclose(mine.heads.flatten(), tl_heads.numpy(), atol=1e-5)
        parts, labels = cache.decompose_resid(layer=-1, pos_slice=-1, mode="all", return_labels=True)
        tl_parts = dict(zip(labels, cache.logit_attrs(parts, tokens=target, incorrect_tokens=other,
                                                      pos_slice=-1).flatten().tolist()))
        assert mine.embed == pytest.approx(tl_parts["embed"], abs=1e-5)
        assert mine.pos_embed == pytest.approx(tl_parts["pos_embed"], abs=1e-5)
        for layer in range(2):
            assert mine.mlp[layer] == pytest.approx(tl_parts[f"{layer}_mlp_out"], abs=1e-5)
            assert mine.heads[layer].sum() + mine.attn_bias[layer] == pytest.approx(tl_parts[f"{layer}_attn_out"],
                                                                                   abs=1e-5)
        if rec["wrong_id"] is not None:  # the stored arrays are the same attribution
            np.testing.assert_allclose(a["heads"][i], mine.heads, atol=1e-12)
    text = L.DLA.text(out.stored.result())
    assert "logit('a') - logit('o')" in text and "parts sum to" in text


def test_neuron_terms_equal_transformer_lens_and_add_up_to_the_mlp(gpt2_run):
    run, model = gpt2_run
    [out] = analyze(run, [build_analyses().get("neurons")], {"neurons": {"detail": 2, "examples": 3}}, model=model)
    assert out.ok, out.stored.error
    d = out.stored.data
    rec = d["prompts"][0]
    assert rec["check"] < 1e-6
    i, pos, target, wrong = rec["index"], rec["position"], rec["target_id"], rec["wrong_id"]
    terms, _, _, _ = neuron_terms(run, Readout(model), i, pos, target, wrong)
    _, cache = _processed_cache(run.tokens(i)[: pos + 1])
    W_out = workbench.load_model("tiny-gpt2", device="cpu", progress=False).bridge.blocks[1].mlp.W_out
    post = cache["blocks.1.mlp.hook_post"][0, -1]
    stack = post[:, None] * W_out  # each neuron's write, (d_mlp, d_model)
    tl = cache.logit_attrs(stack[:, None, :], tokens=torch.tensor([target]),
                           incorrect_tokens=torch.tensor([wrong]), pos_slice=-1).flatten()
    np.testing.assert_allclose(terms[1], tl.numpy(), atol=1e-5)
    best = max(rec["top"], key=lambda x: x["term"])
    assert best["term"] == pytest.approx(float(terms.max()), abs=1e-6)
    assert best["term"] == pytest.approx(best["activation"] * best["effect"], rel=1e-6)
    assert [n["neuron"] for n in d["neurons"]] == [x["neuron"] for x in rec["top"][:2]]
    nd = d["neurons"][0]
    # top-activating tokens: the largest values of that neuron anywhere in the run
    layer, index = nd["layer"], nd["index"]
    everything = np.concatenate([run.activation(f"blocks.{layer}.mlp.hook_post", j)[:, index] for j in range(len(run))])
    assert [e["activation"] for e in nd["top_activations"]] == pytest.approx(np.sort(everything)[::-1][:3].tolist())
    # promoted tokens: the output row through ln_final's weight and W_U, by hand
    b = model.bridge
    row = b.blocks[layer].mlp.W_out[index].double()
    scores = ((row - row.mean()) * b.ln_final.weight.double()) @ b.unembed.W_U.double()
    assert [t["id"] for t in nd["promotes"]] == torch.topk(scores, 3).indices.tolist()
    assert [t["id"] for t in nd["suppresses"]] == torch.topk(-scores, 3).indices.tolist()


def test_described_neurons_list_their_most_negative_activations_too(gpt2_run):
    """A neuron's term is activation x effect: one whose effect is negative helps the target
    through its negative activations, so both ends are listed (numpy on the stored activations)."""
    run, model = gpt2_run
    [out] = analyze(run, [build_analyses().get("neurons")], {"neurons": {"detail": 2, "examples": 3}}, model=model)
    assert out.ok, out.stored.error
    assert len(out.stored.data["neurons"]) == 2
    for nd in out.stored.data["neurons"]:
        cols = [run.activation(f"blocks.{nd['layer']}.mlp.hook_post", j)[:, nd["index"]].astype(np.float64)
                for j in range(len(run))]
        flat = np.concatenate(cols)
        where = [(j, p) for j, c in enumerate(cols) for p in range(len(c))]
        order = np.lexsort((np.arange(len(flat)), flat))  # ascending; ties by prompt, then position
        want = [k for k in order if flat[k] < 0][:3]
        assert len(want) == 3  # tiny GPT-2's GELU neurons do go negative
        got = nd["bottom_activations"]
        assert [e["activation"] for e in got] == pytest.approx(flat[want].tolist())
        assert [(e["prompt"], e["position"]) for e in got] == [where[k] for k in want]
        for e in got:
            assert e["token"] == run.str_tokens(e["prompt"])[e["position"]] and e["activation"] < 0
        assert [e["activation"] for e in nd["top_activations"]] == pytest.approx(np.sort(flat)[::-1][:3].tolist())
    text = build_analyses().get("neurons").text(out.stored.result())
    first = out.stored.data["neurons"][0]["bottom_activations"][0]
    assert "most negative activations:" in text and f"{first['activation']:8.3f}  prompt {first['prompt']}" in text


def test_post_norm_models_are_refused_and_bad_parameters_exit_2(gpt2_run, tmp_path):
    bert = tmp_path / "bert.h5"
    proc = _cli("capture", "-m", "tiny-bert", "--prompt", "hello world", "--for", "dla", "-o", str(bert))
    assert proc.returncode == 0, proc.stderr
    proc = _cli("analyze", str(bert), "dla")
    assert proc.returncode == 2 and "post-norm" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    run, _ = gpt2_run
    path = str(run.final_path)
    for args, message in [(("neurons", "--param", "neurons.neuron=X9"), "L<layer>N<index>"),
                          (("neurons", "--param", "neurons.neuron=L7N0"), "does not exist"),
                          (("dla", "--param", "dla.position=99"), "outside every prompt"),
                          (("distribution", "--param", "distribution.temperatures=1,hot"), "temperatures")]:
        proc = _cli("analyze", path, *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()  # (perhaps "reloading the model", then) one error line
        assert lines[-1].startswith("workbench: error:") and "Traceback" not in proc.stderr


# --- distribution -------------------------------------------------------------------------------


def test_distribution_softmax_temperature_entropy_nucleus_and_seeded_samples(gpt2_run):
    run, model = gpt2_run
    params = {"temperatures": "0,0.5,1,3", "top_k": 5, "top_p": 0.5, "samples": 50, "seed": 7}
    [out] = analyze(run, [build_analyses().get("distribution")], {"distribution": params}, model=model)
    assert out.ok, out.stored.error
    d, logits_stored = out.stored.data, out.stored.arrays["logits"]
    for rec in d["prompts"]:
        i = rec["index"]
        with torch.inference_mode():
            logits = model.forward(torch.as_tensor(run.tokens(i), dtype=torch.long)[None])[0, -1].double().numpy()
        np.testing.assert_allclose(logits_stored[i], logits, rtol=1e-6, atol=1e-6)
        for t in rec["temperatures"]:
            T = t["temperature"]
            if T == 0:
                assert t["top_ids"] == [int(np.argmax(logits))] and t["entropy"] == 0.0
                assert set(t["samples"]) == {int(np.argmax(logits))}
                continue
            x = logits / T
            p = np.exp(x - x.max())
            p /= p.sum()
            order = np.argsort(-p)
            assert t["top_ids"] == order[:5].tolist()
            assert t["top_probs"] == pytest.approx(p[order[:5]].tolist(), rel=1e-9)
            assert t["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
            assert t["top_k_mass"] == pytest.approx(float(p[order[:5]].sum()), rel=1e-9)
            assert t["nucleus_size"] == int(np.argmax(np.cumsum(p[order]) >= 0.5)) + 1
            assert len(t["samples"]) == 50
        # hotter is flatter
        ents = [t["entropy"] for t in rec["temperatures"]]
        assert ents == sorted(ents)
    # same seed, same samples; another seed, others
    [again] = analyze(run, [build_analyses().get("distribution")], {"distribution": params}, model=model, force=True)
    assert again.stored.data["prompts"] == d["prompts"]
    [other] = analyze(run, [build_analyses().get("distribution")], {"distribution": {**params, "seed": 8}},
                      model=model)
    assert other.stored.data["prompts"][0]["temperatures"][2]["samples"] != d["prompts"][0]["temperatures"][2]["samples"]
    # the sampler draws from the distribution: frequencies over many draws
    p = np.array([0.5, 0.3, 0.2])
    draws = np.bincount(L.sample_ids(torch.as_tensor(p), 20_000, 0, 0, 0), minlength=3) / 20_000
    np.testing.assert_allclose(draws, p, atol=0.015)
    assert "T=0.5" in L.DISTRIBUTION.text(out.stored.result())


def test_json_output_is_documented_shape(gpt2_run):
    run, model = gpt2_run
    analyze(run, [build_analyses().get("logit-lens")], model=model)
    proc = _cli("analyze", str(run.final_path), "logit-lens", "--json")
    assert proc.returncode == 0, proc.stderr
    [doc] = json.loads(proc.stdout)
    arrays = doc["result"]["arrays"]
    assert doc["result"]["data"]["layers"] == ["embed", "0", "1"]
    n = run.n_tokens_total()
    assert len(arrays["top_ids"]) == n and len(arrays["kl"][0]) == 3 and len(arrays["offsets"]) == len(run) + 1


# --- terminal views -----------------------------------------------------------------------------


def test_views_draw_follow_the_prompt_and_change_temperature(gpt2_run):
    from workbench_plugins.lens_view import DistributionView, DLAView, LensGridView, NeuronsView

    from workbench.tui import make_app
    from workbench.tui.results import ResultsPanel

    run, model = gpt2_run
    analyze(run, [build_analyses().get(a) for a in ("logit-lens", "dla", "neurons", "distribution")],
            model=model)
    app = make_app([str(run.final_path)], view="results")

    async def main():
        async with app.run_test(size=(140, 60)) as pilot:
            for _ in range(3):
                await pilot.pause()
            panel = app.query_one(ResultsPanel)
            seen = {}
            for k, (stored, view) in enumerate(panel.entries):
                if view is None or view.plugin != "lens":
                    continue
                panel.open(k)
                for _ in range(3):
                    await pilot.pause()
                widget = app.query_one(".result-view")
                seen[type(widget)] = widget
                text = plain(widget)
                if isinstance(widget, LensGridView):
                    shown = app.focus_state.prompt
                    assert f"logit lens · prompt {shown}" in text and "target" in text
                    app.query_one("#prompts").focus()
                    await pilot.press("p" if shown else "n")  # another prompt: the grid follows
                    await pilot.pause()
                    assert f"logit lens · prompt {shown - 1 if shown else 1}" in plain(widget)
                    widget.focus()
                    await pilot.press("r")
                    assert widget.show_rank and "target rank" in plain(widget)
                elif isinstance(widget, DLAView):
                    assert "parts sum to" in text and "per layer" in text
                elif isinstance(widget, DistributionView):
                    assert "T = 1" in text
                    widget.focus()
                    await pilot.press("minus", "minus")
                    assert widget.temperature == 0.5 and "T = 0.5" in plain(widget)
                    logits = stored.arrays["logits"][widget.prompt].astype(np.float64) / 0.5
                    p = np.exp(logits - logits.max())
                    top = int(np.argmax(p))
                    assert f"{p[top] / p.sum():.2%}" in plain(widget)
                    for _ in range(10):
                        await pilot.press("minus")
                    assert widget.temperature == 0.0 and "100.00%" in plain(widget)
                elif isinstance(widget, NeuronsView):
                    assert "MLP neurons" in text and "promotes" in text and "most negative:" in text
            assert set(seen) == {LensGridView, DLAView, DistributionView, NeuronsView}

    asyncio.run(main())
