"""Sparse autoencoders (plugins/sae.py, sae_data.py, sae_format.py) and the features analysis.

Ground truth, not the code's own output:
- a synthetic run whose activations are sparse combinations of known unit directions: the trained
  SAE's decoder must contain them (and a run of unstructured Gaussian activations must not);
- encoding by the formula written out here in numpy, ``TopK/ReLU(W_enc (x - b_dec) + b_enc)``,
  and by sparsify's own ``SparseCoder.encode`` on the same weights;
- SAELens-format folders written here by hand, field by field, for each architecture;
- feature statistics recomputed here from every stored row; logit effects from the Hugging Face
  module's own output embedding; the clean next-token loss from the run's stored per-token loss.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from workbench_plugins import sae_data
from workbench_plugins.sae import find_sae, stored_sae, to_sae
from workbench_plugins.sae_format import SAE, load_folder

import workbench
from workbench.capturing.prompts import Prompt
from workbench.errors import UserError
from workbench.registries import analyze, build_analyses
from workbench.store.synthetic import PlantedDictionary, random_directions, write_synthetic_run

HOOK = "blocks.0.hook_resid_post"
TRAIN = {"hook": HOOK, "features": 256, "k": 3, "batch": 256, "tokens": 80_000, "lr": 0.005, "ce": False}


def _train(run, **params):
    [a] = [build_analyses().get("sae")]
    [out] = analyze(run, [a], {"sae": {**TRAIN, **params}})
    assert out.ok, out.stored.error
    return out.stored


def _recovered(sae, directions):
    w = sae.W_dec / np.linalg.norm(sae.W_dec, axis=1, keepdims=True)
    return (directions @ w.T).max(1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    directions = random_directions(128, 64, seed=1)
    path = write_synthetic_run(tmp_path_factory.mktemp("planted") / "run.h5", n_prompts=1500, n_layers=1,
                               n_heads=1, d_model=64, lengths=(10, 16), seed=3, batch_size=100,
                               planted=PlantedDictionary(directions, hook=HOOK, active=3))
    run = workbench.open_run(path)
    return run, directions, _train(run)


def test_planted_directions_are_recovered(planted):
    run, directions, stored = planted
    best = _recovered(stored_sae(stored), directions)
    assert (best > 0.9).mean() >= 0.9, np.sort(best)[:10]
    held = stored.data["heldout"]
    assert held["explained_variance"] > 0.9 and held["l0"] <= 3
    assert stored.data["skipped"]["first_position"] and stored.data["prompts"]["heldout"] == 150


def test_unstructured_control_recovers_nothing(tmp_path):
    directions = random_directions(128, 64, seed=1)
    path = write_synthetic_run(tmp_path / "control.h5", n_prompts=1500, n_layers=1, n_heads=1, d_model=64,
                               lengths=(10, 16), seed=3, batch_size=100)
    stored = _train(workbench.open_run(path))
    assert (_recovered(stored_sae(stored), directions) > 0.9).mean() < 0.05
    assert stored.data["heldout"]["explained_variance"] < 0.5  # Gaussian noise has no sparse code


def _formula(x, W_enc, b_enc, b_dec, arch, k=None, threshold=None):
    pre = (x - b_dec) @ W_enc + b_enc
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.where(pre > threshold, np.maximum(pre, 0), 0)
    out = np.zeros_like(pre)
    for r in range(len(pre)):
        top = np.argsort(-pre[r])[:k]
        out[r, top] = np.maximum(pre[r, top], 0)
    return out


def test_trained_sae_encodes_as_the_formula_and_as_sparsify(planted):
    import torch
    from workbench_plugins.sae import import_sparsify

    run, _, stored = planted
    sae = stored_sae(stored)
    x = run.activation(HOOK, 5)[1:]
    want = _formula(x, sae.W_enc, sae.b_enc, sae.b_dec, "topk", k=sae.k)
    np.testing.assert_allclose(sae.encode(x), want, atol=1e-5)
    w = sae.torch_weights()
    np.testing.assert_allclose(sae.torch_encode(torch.from_numpy(x), w).numpy(), want, atol=1e-5)
    # sparsify's own module with the same weights picks the same features with the same values
    sp = import_sparsify()
    coder = sp.SparseCoder(64, sp.SparseCoderConfig(num_latents=sae.d_sae, k=sae.k))
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.from_numpy(sae.W_enc.T))
        coder.encoder.bias.copy_(torch.from_numpy(sae.b_enc))
        coder.W_dec.copy_(torch.from_numpy(sae.W_dec))
        coder.b_dec.copy_(torch.from_numpy(sae.b_dec))
        acts, idx, _ = coder.encode(torch.from_numpy(x))
        dense = torch.zeros(len(x), sae.d_sae).scatter_(-1, idx, acts).numpy()
        recon = coder.decode(acts, idx).numpy()
    np.testing.assert_allclose(dense, want, atol=1e-5)
    np.testing.assert_allclose(sae.decode(want), recon, atol=1e-4)
    assert to_sae(coder, HOOK, "m", {}).tensors().keys() == sae.tensors().keys()


def _write_saelens_folder(folder, arch, d_in=6, d_sae=10, seed=0, **cfg_extra):
    """A folder as SAELens 6 writes it (cfg.json fields, safetensors names and shapes)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t = {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
         "b_enc": rng.normal(size=d_sae).astype(np.float32),
         "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
         "b_dec": rng.normal(size=d_in).astype(np.float32)}
    if arch == "jumprelu":
        t["threshold"] = np.abs(rng.normal(size=d_sae)).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(t, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.0.hook_resid_post", "prepend_bos": True,
                        "sae_lens_version": "6.54.12"}, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_folder_loads_and_encodes_as_the_formula(tmp_path, arch):
    extra = {"k": 3, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {}
    t = _write_saelens_folder(tmp_path / "sae", arch, **extra)
    sae = load_folder(tmp_path / "sae")
    x = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)
    want = _formula(x, t["W_enc"], t["b_enc"], t["b_dec"], arch, k=3, threshold=t.get("threshold"))
    np.testing.assert_allclose(sae.encode(x), want, atol=1e-5)
    np.testing.assert_allclose(sae.decode(want), want @ t["W_dec"] + t["b_dec"], atol=1e-5)
    assert sae.hook_name == "blocks.0.hook_resid_post" and sae.model_name == "gpt2"
    # round trip: written back and read again, every tensor and setting is the same
    sae.save(tmp_path / "again")
    back = load_folder(tmp_path / "again")
    for name, arr in sae.tensors().items():
        np.testing.assert_array_equal(back.tensors()[name], arr)
    cfg = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == 6 and cfg["d_sae"] == 10
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["prepend_bos"] is True  # fields we do not interpret are kept


def test_input_normalisations_invert(tmp_path):
    for norm in ("constant_norm_rescale", "layer_norm"):
        t = _write_saelens_folder(tmp_path / norm, "standard", normalize_activations=norm)
        sae = load_folder(tmp_path / norm)
        x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32) * 30
        if norm == "constant_norm_rescale":
            xn = x * np.sqrt(6) / np.linalg.norm(x, axis=-1, keepdims=True)
        else:
            c = x - x.mean(-1, keepdims=True)
            xn = c / (c.std(-1, ddof=1, keepdims=True) + 1e-5)
        want = np.maximum((xn - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
        np.testing.assert_allclose(sae.encode(x), want, rtol=1e-4, atol=1e-4)
        # decoding the normalised input's reconstruction lands back in the input's scale
        assert abs(np.linalg.norm(sae.decode(want, x)) / np.linalg.norm(want @ t["W_dec"] + t["b_dec"]) - 1) > 0.01


def test_the_stored_sae_exports_as_a_saelens_folder(planted, tmp_path):
    run, _, stored = planted
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "sae-export", str(run.final_path),
                          str(tmp_path / "exported")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    back = load_folder(tmp_path / "exported")
    np.testing.assert_array_equal(back.W_dec, stored_sae(stored).W_dec)
    assert back.hook_name == HOOK and back.k == 3


def test_shuffled_batches_mix_blocks_and_use_every_row():
    rng = np.random.default_rng(0)
    blocks = [np.full((50, 2), b, dtype=np.float32) for b in range(20)]
    source = iter(blocks * 10)
    batches = sae_data.shuffled_batches(source, 2, buffer=400, batch=50, rng=rng)
    seen = np.concatenate([next(batches) for _ in range(16)])[:, 0]
    assert len(set(seen[:50].tolist())) >= 5  # one batch draws on many blocks
    counts = np.bincount(seen.astype(int), minlength=20)
    assert counts.sum() == 800 and counts[:8].min() > 0
    with pytest.raises(UserError, match="two batches"):
        next(sae_data.shuffled_batches(iter(blocks), 2, buffer=60, batch=50, rng=rng))


def test_features_statistics_equal_numpy_over_every_row(planted):
    run, _, stored = planted
    [out] = analyze(run, [build_analyses().get("features")], {"features": {"top": 5, "prompt": 3}})
    assert out.ok, out.stored.error
    a = out.stored.arrays
    sae = stored_sae(stored)
    rows, where = [], []
    for i in range(len(run)):
        x = run.activation(HOOK, i)[1:]  # the first position is left out, as in training
        rows.append(x)
        where += [(i, t + 1) for t in range(len(x))]
    acts = sae.encode(np.concatenate(rows))
    fires = (acts > 0).sum(0)
    np.testing.assert_array_equal(a["fires"], fires)
    np.testing.assert_allclose(a["max"], acts.max(0), rtol=1e-5)
    np.testing.assert_allclose(a["density"], fires / len(acts), rtol=1e-6)
    f = int(np.argmax(fires))
    best = np.argsort(-acts[:, f])[:5]
    np.testing.assert_allclose(a["top_values"][f], acts[best, f], rtol=1e-5)
    assert (a["top_prompt"][f][0], a["top_pos"][f][0]) == where[best[0]]
    assert a["hist"][f].sum() == fires[f]
    tokens = out.stored.data["tokens"]["rows"]
    want = sae.encode(run.activation(HOOK, 3))
    assert {g for g, _ in tokens[2]["features"]} == set(np.flatnonzero(want[2] > 0).tolist())
    assert "cannot be reloaded" in out.stored.data["logits"]["note"]


def test_bad_sae_folders_are_one_line_exit_2(planted, tmp_path):
    run, _, _ = planted
    bad = {}
    (tmp_path / "empty").mkdir()
    bad["empty"] = "lacks cfg.json and sae_weights.safetensors"
    _write_saelens_folder(tmp_path / "foreign", "standard")
    (tmp_path / "foreign" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    bad["foreign"] = "not a safetensors file"
    _write_saelens_folder(tmp_path / "wide", "standard", d_in=6)
    bad["wide"] = "reads 6-dimensional vectors"
    _write_saelens_folder(tmp_path / "gated", "gated")
    bad["gated"] = "'gated' is not supported"
    _write_saelens_folder(tmp_path / "otherhook", "standard", d_in=64)
    cfg = json.loads((tmp_path / "otherhook" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.7.hook_resid_post"
    (tmp_path / "otherhook" / "cfg.json").write_text(json.dumps(cfg))
    bad["otherhook"] = "blocks.7.hook_resid_post' was not captured"
    for name, message in bad.items():
        out = subprocess.run([sys.executable, "-m", "workbench.cli", "analyze", str(run.final_path), "features",
                              "--param", f"features.sae={tmp_path / name}"], capture_output=True, text=True)
        assert out.returncode == 2, (name, out.stderr)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, (name, out.stderr)
    with pytest.raises(UserError, match="name the hook"):
        analyze(run, [build_analyses().get("sae")], {})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models):
    model = tiny_models["tiny-llama"]
    words = "the cat sat on a mat and a dog ran to the park when it rained".split()
    rng = np.random.default_rng(0)
    prompts = [Prompt(text=" ".join(rng.choice(words, size=8)), id=f"p{i}") for i in range(60)]
    path = tmp_path_factory.mktemp("tiny") / "run.h5"
    workbench.capture(model, prompts, hooks=["blocks.1.hook_resid_post"], out=path, progress=False)
    return workbench.open_run(path), model


def test_ce_and_logit_effects_on_a_tiny_model(tiny_run):
    import torch

    run, model = tiny_run
    a = build_analyses()
    [out] = analyze(run, [a.get("sae")], {"sae": {"hook": "blocks.1.hook_resid_post", "features": 64,
                                                   "k": 4, "batch": 64, "holdout": 0.2}}, model=model)
    assert out.ok, out.stored.error
    ce = out.stored.data["ce"]
    held = [i for i in range(len(run)) if i not in set(_train_prompts(run, out.stored))]
    stored_loss = np.concatenate([run.loss(i)[:-1] for i in held])
    assert ce["loss_clean"] == pytest.approx(float(stored_loss.mean()), rel=1e-4)
    assert ce["ce_recovered"] is not None and ce["loss_zero"] != ce["loss_clean"]
    [feat] = analyze(run, [a.get("features")], {"features": {"logits": 5}}, model=model)
    assert feat.ok, feat.stored.error
    sae = stored_sae(out.stored)
    w_u = model.bridge.unembed.W_U.detach().to(torch.float32).numpy()  # (d_model, vocab)
    logits = sae.W_dec.astype(np.float64) @ w_u
    arr = feat.stored.arrays
    for f in (0, 17, 63):
        want = np.argsort(-logits[f])[:5]
        np.testing.assert_array_equal(arr["promoted_ids"][f], want)
        np.testing.assert_allclose(arr["promoted"][f], logits[f, want], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(arr["suppressed_ids"][f], np.argsort(logits[f])[:5])


def _train_prompts(run, stored):
    sel = sae_data.select(run, stored.params["hook"], range(len(run)), stored.params["holdout"],
                          stored.params["skip"], stored.params["seed"])
    return sel.train


def test_find_sae_names(planted, tmp_path):
    run, _, stored = planted
    sae, where = find_sae(run, "")
    assert where.startswith("sae result")
    assert find_sae(run, stored.meta["key"][:6])[0].d_sae == sae.d_sae
    assert find_sae(run, HOOK)[0].d_sae == sae.d_sae
    with pytest.raises(UserError, match="no SAE matching"):
        find_sae(run, "blocks.9.hook_resid_post")
    assert isinstance(sae, SAE)


def test_features_is_recomputed_when_the_sae_behind_it_changes(tmp_path):
    path = write_synthetic_run(tmp_path / "run.h5", n_prompts=200, n_layers=1, n_heads=1, d_model=16,
                               lengths=(8, 12), batch_size=50)
    run = workbench.open_run(path)
    small = {"features": 32, "k": 2, "batch": 64, "tokens": 2_000, "lr": 0.0}
    first = _train(run, **small)
    feat = build_analyses().get("features")
    [a] = analyze(run, [feat], {"features": {"logits": 0}})
    [again] = analyze(run, [feat], {"features": {"logits": 0}})
    assert (a.status, again.status) == ("computed", "reused")
    second = _train(run, **small, seed=1)
    [b] = analyze(run, [feat], {"features": {"logits": 0}})
    assert b.status == "computed" and b.stored.path != a.stored.path
    assert second.meta["key"] in b.stored.data["sae"]["source"] and first.meta["key"] in a.stored.data["sae"]["source"]
    with pytest.raises(UserError, match="not a folder"):
        analyze(run, [feat], {"features": {"sae": str(path)}})


def test_bfloat16_and_pre_6_topk_folders_load(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = _write_saelens_folder(tmp_path / "old", "standard", activation_fn_str="topk",
                              activation_fn_kwargs={"k": 2})
    save_file({n: torch.from_numpy(v).to(torch.bfloat16) for n, v in t.items()},
              str(tmp_path / "old" / "sae_weights.safetensors"))
    sae = load_folder(tmp_path / "old")
    assert sae.architecture == "topk" and sae.k == 2
    rounded = {n: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for n, v in t.items()}
    np.testing.assert_array_equal(sae.W_enc, rounded["W_enc"])
    x = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
    want = _formula(x, rounded["W_enc"], rounded["b_enc"], rounded["b_dec"], "topk", k=2)
    np.testing.assert_allclose(sae.encode(x), want, atol=1e-5)
    rows, cols, vals = sae.encode_sparse(x, chunk=2)
    np.testing.assert_allclose(vals, want[rows, cols])
    assert len(rows) == int((want > 0).sum())
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({"architecture": "standard", "metadata": "gpt2"}))
    with pytest.raises(UserError, match="metadata is not an object"):
        load_folder(tmp_path / "old")


def test_auto_skip_leaves_out_a_sink_that_is_not_first(tmp_path):
    def sink(i, hook, acts):
        if i == 3 and hook == HOOK:
            acts = acts.copy()
            acts[2] *= 500  # a second-position-style sink, ~100x the others' norm and more
        return acts

    path = write_synthetic_run(tmp_path / "run.h5", n_prompts=20, n_layers=1, n_heads=1, d_model=16,
                               edit=sink, batch_size=10)
    run = workbench.open_run(path)
    sel = sae_data.select(run, HOOK, range(len(run)), 0.0, "auto", 0)
    rows, prompts, pos = sae_data.read_block_where(run, sel, [2, 3, 4])
    n3 = run.n_tokens(3)
    assert sel.max_norm is not None and (3, 2) not in set(zip(prompts.tolist(), pos.tolist(), strict=True))
    assert int((prompts == 3).sum()) == n3 - 2  # its first position and the sink are left out
    np.testing.assert_array_equal(rows[prompts == 3][0], run.activation(HOOK, 3)[1])
    keep_all = sae_data.select(run, HOOK, range(len(run)), 0.0, "first", 0)
    assert int((sae_data.read_block_where(run, keep_all, [3])[1] == 3).sum()) == n3 - 1


def test_a_hang_up_during_training_leaves_no_result(tmp_path):
    import signal

    path = write_synthetic_run(tmp_path / "run.h5", n_prompts=200, n_layers=1, n_heads=1, d_model=16,
                               lengths=(8, 12), batch_size=50)
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "analyze", str(path), "sae",
                             "--param", f"sae.hook={HOOK}", "--param", "sae.tokens=100000000",
                             "--param", "sae.batch=64", "--param", "sae.features=32", "--param", "sae.k=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the first progress line: training has started
        if line.startswith("workbench: sae "):
            break
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    folder = path.with_name(path.name + ".results")
    assert not folder.exists() or not list(folder.iterdir())  # no result, no temporary
