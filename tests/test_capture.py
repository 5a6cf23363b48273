"""Capture and the run store, against independent computations.

The oracles:
- TransformerLens' own ``run_with_cache`` on each prompt alone (batching only changes float32
  rounding: a documented tolerance), and on the same padded batch (then stored values must be
  bit-identical: storage adds no error of its own);
- torch's own float16/bfloat16 conversions for the reduced storage dtypes;
- log-softmax of the model's logits for the per-token loss and the top-k predictions.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import workbench
from workbench.errors import UserError
from workbench.store import schema as S

# Batching changes float32 results by rounding only; measured 7.6e-6 of a tensor's largest
# magnitude on SmolLM2 (docs/store.md). Checked here with margin.
BATCH_RTOL = 5e-5


def random_prompts(n: int, seed: int, lo: int = 2, hi: int = 299) -> list[str]:
    """Texts of lo..hi characters: with the byte tokenizer plus BOS, lo+1..hi+1 tokens."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz      ,.;:!?ABCXYZ0123456789"
    lengths = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]  # both extremes included
    rng.shuffle(lengths)
    return ["".join(rng.choice(alphabet) for _ in range(k)) for k in lengths]


def assert_close_to_tensor(stored: np.ndarray, expected: np.ndarray, name: str, rtol: float) -> None:
    assert stored.shape == expected.shape, (name, stored.shape, expected.shape)
    finite = np.isfinite(expected)
    assert (np.isfinite(stored) == finite).all(), f"{name}: non-finite values differ"
    assert (stored[~finite] == expected[~finite]).all(), f"{name}: infinities differ"
    if finite.any():
        scale = max(float(np.abs(expected[finite]).max()), 1e-30)
        err = float(np.abs(stored[finite].astype(np.float64) - expected[finite]).max())
        assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["tiny-llama"]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory, llama):
    """200 prompts of 3 to 300 tokens, every hook, batch size 7."""
    prompts = random_prompts(200, seed=1)
    out = tmp_path_factory.mktemp("big") / "run.h5"
    result = workbench.capture(llama, prompts, hooks=["all"], out=out, batch_size=7, progress=False)
    return prompts, result, workbench.open_run(out)


def test_200_prompts_equal_run_with_cache_hook_by_hook(big_run, llama):
    prompts, result, run = big_run
    assert len(run) == 200 and run.status == "complete"
    lengths = [run.n_tokens(i) for i in range(200)]
    assert min(lengths) == 3 and max(lengths) == 300
    assert result.n_tokens == sum(lengths)
    checked = 0
    for i in range(200):
        ids = torch.tensor([llama.tokenize(prompts[i])])
        assert run.tokens(i).tolist() == ids[0].tolist()
        with torch.no_grad():
            _, cache = llama.bridge.run_with_cache(ids)
        for name in run.hook_names:  # stored names and every alias
            if name not in cache:
                continue
            expected = cache[name][0].numpy()
            assert_close_to_tensor(run.activation(name, i), expected, f"{name}[{i}]", BATCH_RTOL)
            checked += 1
    assert checked > 200 * 40


def test_stored_values_are_bit_identical_to_the_batch_the_model_ran(big_run, llama):
    """Same padded batch through TransformerLens: storage must add no error at all."""
    prompts, _, run = big_run
    idx = list(range(14, 21))  # the third batch of 7
    ids = [llama.tokenize(prompts[i]) for i in idx]
    n_max = max(map(len, ids))
    batch = torch.zeros(len(ids), n_max, dtype=torch.long)
    for r, t in enumerate(ids):
        batch[r, : len(t)] = torch.tensor(t)
    with torch.no_grad():
        _, cache = llama.bridge.run_with_cache(batch)
    for r, i in enumerate(idx):
        n = len(ids[r])
        for name, spec in run.hooks.items():
            t = cache[name][r]
            expected = t[:, :n, :n] if spec.layout == "square" else t[:n]
            np.testing.assert_array_equal(run.activation(name, i), expected.numpy(), err_msg=name)


def test_aliases_and_pass_through_tensors_are_stored_once(big_run, llama):
    _, _, run = big_run
    stored = run.hooks
    # resid_post of layer 0 is the tensor resid_pre of layer 1 receives: stored once.
    spec = run.resolve("blocks.1.hook_resid_pre")
    assert spec.name == "blocks.0.hook_resid_post"
    assert "blocks.0.hook_out" in spec.aliases  # the bridge's own name for it
    assert "blocks.1.hook_resid_pre" not in stored
    assert len(run.hook_names) > len(stored)
    # every stored tensor is a distinct object in a real forward pass
    assert len(stored) == len({s.name for s in stored.values()})


def test_attention_layout_and_causal_mask(big_run):
    _, _, run = big_run
    pattern = run.activation("blocks.1.attn.hook_pattern", 5)
    n = run.n_tokens(5)
    assert pattern.shape == (4, n, n)
    assert run.axes("blocks.1.attn.hook_pattern") == ("head", "query_pos", "key_pos")
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
    assert (np.triu(pattern, k=1) == 0).all()
    q = run.activation("blocks.0.attn.hook_q", 5)
    k = run.activation("blocks.0.attn.hook_k", 5)
    assert q.shape == (n, 4, 16) and k.shape == (n, 2, 16)  # grouped-query: 4 query, 2 KV heads
    assert run.axes("blocks.0.attn.hook_k") == ("pos", "kv_head", "d_head")


def test_loss_and_top_k_equal_an_independent_log_softmax(big_run, llama):
    prompts, _, run = big_run
    for i in (0, 57, 199):
        ids = torch.tensor([llama.tokenize(prompts[i])])
        with torch.no_grad():
            logits = llama.bridge(ids)[0].double()
        logp = torch.log_softmax(logits, -1)
        n = ids.shape[1]
        expected_loss = -logp[torch.arange(n - 1), ids[0, 1:]]
        loss = run.loss(i)
        assert np.isnan(loss[-1])
        np.testing.assert_allclose(loss[:-1], expected_loss.numpy(), rtol=1e-4, atol=1e-5)
        top_ids, top_lp = run.top_k(i)
        assert top_ids.shape == (n, 10)
        assert (top_ids == torch.topk(logp, 10).indices.numpy()).mean() > 0.99  # ties aside
        np.testing.assert_allclose(top_lp, torch.topk(logp, 10).values.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab, k", [(49152, 10), (50257, 10), (5000, 3), (3000, 10), (50257, 300)])
def test_top_k_by_groups_equals_torch_topk(vocab, k):
    from workbench.capturing.forward import _topk_by_groups

    gen = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(16, vocab, generator=gen) * 4
    x[3, -1] = 50.0  # the top entry in the last, partial group
    x[4, :] = float("-inf")
    x[4, 77] = 0.0
    x[5, 100:140] = 30.0  # ties across two groups
    values, ids = _topk_by_groups(x, k)
    expected = torch.topk(x, k, dim=-1)
    assert torch.equal(values, expected.values)
    assert torch.equal(x.gather(-1, ids), values)  # each index holds its value...
    assert all(len(set(row.tolist())) == k for row in ids)  # ...once
    assert ids[4, 0] == 77  # the rest of row 4 is tied at -inf
    untied = [r for r in range(16) if r not in (4, 5)]
    assert torch.equal(ids[untied], expected.indices[untied])


def test_no_lm_outputs_with_zero_predictions(tmp_path, llama):
    """``predictions=0``: the same activations, and no loss or top-k at all (nor their datasets);
    the analyses that need LM outputs say what is missing."""
    from workbench.analysis import missing_inputs
    from workbench.registries import build_analyses

    prompts = random_prompts(6, seed=3, hi=40)
    with_lm = workbench.capture(llama, prompts, hooks=["residual"], out=tmp_path / "a.h5", progress=False)
    without = workbench.capture(llama, prompts, hooks=["residual"], out=tmp_path / "b.h5", predictions=0,
                                progress=False)
    assert without.bytes_written < with_lm.bytes_written
    with workbench.open_run(tmp_path / "a.h5") as a, workbench.open_run(tmp_path / "b.h5") as b:
        assert a.has_lm_outputs and not b.has_lm_outputs
        assert b.capture_settings.top_k == 0
        for i in range(len(a)):
            for hook in a.hooks:
                np.testing.assert_array_equal(a.activation(hook, i), b.activation(hook, i))
        with pytest.raises(UserError):
            b.loss(0)
        assert missing_inputs(b, build_analyses().get("next-token"))


def test_without_lm_outputs_the_pass_ends_at_the_last_stored_hook(tmp_path, llama):
    """With no LM outputs the forward pass stops once every stored hook has fired: later layers,
    the final norm and the unembedding never run, and the stored values are those of a full pass."""
    prompts = random_prompts(9, seed=4, hi=30)
    calls = {"final norm": 0, "block 1": 0}
    handles = [llama.bridge.ln_final.register_forward_hook(lambda *a: calls.__setitem__("final norm", calls["final norm"] + 1)),
               llama.bridge.blocks[1].register_forward_hook(lambda *a: calls.__setitem__("block 1", calls["block 1"] + 1))]
    try:
        hooks = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"]
        # one batch per prompt: 9 passes (the capture also probes its hooks, at most twice)
        workbench.capture(llama, prompts, hooks=hooks, out=tmp_path / "early.h5", predictions=0, batch_size=1,
                          progress=False)
        early = dict(calls)
        assert early["final norm"] <= 2 and early["block 1"] <= 2
        workbench.capture(llama, prompts, hooks=hooks, out=tmp_path / "full.h5", batch_size=1, progress=False)
        assert calls["final norm"] - early["final norm"] >= 9 and calls["block 1"] - early["block 1"] >= 9
    finally:
        for h in handles:
            h.remove()
    with workbench.open_run(tmp_path / "early.h5") as a, workbench.open_run(tmp_path / "full.h5") as b:
        for i in range(len(a)):
            for hook in hooks:
                np.testing.assert_array_equal(a.activation(hook, i), b.activation(hook, i))


def test_stored_vocabulary_names_predictions_like_the_tokenizer(big_run, llama):
    _, _, run = big_run
    assert run.has_vocab
    top_ids, _ = run.top_k(3)
    ids = [int(i) for i in top_ids.reshape(-1)[:50]] + [0, len(llama.tokenizer) - 1]
    assert run.token_strings(ids) == [llama.tokenizer.decode([i]) for i in ids]
    assert run.token_strings(run.tokens(3)) == run.str_tokens(3)
    assert run.token_strings([len(llama.tokenizer), -1]) == [f"#{len(llama.tokenizer)}", "#-1"]


@pytest.mark.parametrize("dtype, convert", [
    ("float16", lambda t: t.half().float()),
    ("bfloat16", lambda t: t.bfloat16().float()),
])
def test_reduced_dtypes_round_exactly_like_torch(tmp_path, llama, dtype, convert):
    prompts = random_prompts(12, seed=2, hi=60)
    out = tmp_path / f"{dtype}.h5"
    workbench.capture(llama, prompts, hooks=["residual", "attention"], out=out, batch_size=5,
                      dtype=dtype, progress=False)
    with workbench.open_run(out) as run:
        assert run.storage_dtype == dtype
        ids = run.tokens(3)
        batch_ids = [llama.tokenize(p) for p in prompts[:5]]
        n_max = max(map(len, batch_ids))
        batch = torch.zeros(5, n_max, dtype=torch.long)
        for r, t in enumerate(batch_ids):
            batch[r, : len(t)] = torch.tensor(t)
        with torch.no_grad():
            _, cache = llama.bridge.run_with_cache(batch)
        n = len(ids)
        for name, spec in run.hooks.items():
            t = cache[name][3]
            t = t[:, :n, :n] if spec.layout == "square" else t[:n]
            stored = np.asarray(run.activation(name, 3), dtype=np.float32)
            np.testing.assert_array_equal(stored, convert(t).numpy(), err_msg=name)
        # and the on-disk type is what docs/store.md says
        raw = run.f[f"acts/{next(iter(run.hooks))}"]
        assert raw.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)


def test_float16_overflow_is_refused_not_stored(tmp_path, llama, monkeypatch):
    from workbench.capturing import forward as runner

    real = runner._to_storage

    def huge(x, storage, name):
        return real(x * 1e6 if x.is_floating_point() else x, storage, name)

    monkeypatch.setattr(runner, "_to_storage", huge)
    out = tmp_path / "f16.h5"
    with pytest.raises(UserError, match="beyond float16's range"):
        workbench.capture(llama, ["abc"], hooks=["residual"], out=out, dtype="float16", progress=False)
    assert not out.exists() and not (tmp_path / "f16.h5.partial").exists()


def test_metadata_and_task_fields_round_trip(tmp_path, llama):
    src = tmp_path / "tasks.jsonl"
    rows = [
        {"id": "ioi-1", "prompt": "ab cd", "answer": " x", "wrong": " y", "corrupted": "ab ce",
         "note": {"nested": [1, 2]}},
        {"prompt": "héllo 🙂", "answer": " z"},
    ]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    out = tmp_path / "run.h5"
    workbench.capture(llama, src, hooks=["blocks.0.hook_resid_post"], out=out, progress=False)
    with workbench.open_run(out) as run:
        assert run.prompt_ids == ["ioi-1", "p1"]
        assert run.prompts == ["ab cd", "héllo 🙂"]
        assert run.metadata(0) == {"answer": " x", "wrong": " y", "corrupted": "ab ce",
                                   "note": {"nested": [1, 2]}}
        assert run.metadata(1) == {"answer": " z"}
        assert run.str_tokens(1)[0] == "<bos>"
        assert "".join(run.str_tokens(0)[1:]) == "ab cd"
        assert run.settings["bos"] == "prepend" and run.model_info["bos"]["prefix"] == ["<bos>"]
        assert run.model_info["provenance"]["seed"] == 0


def test_corrupted_prompt_must_have_the_same_length(tmp_path, llama):
    with pytest.raises(UserError, match="corrupted prompt has 5 tokens, the prompt 3"):
        workbench.capture(llama, [{"prompt": "ab", "corrupted": "abcd"}], hooks=["residual"],
                          out=tmp_path / "r.h5", progress=False)
    assert not list(tmp_path.iterdir())


def test_dry_run_writes_nothing_and_estimates_the_size(tmp_path, llama):
    prompts = random_prompts(30, seed=3, hi=80)
    out = tmp_path / "run.h5"
    plan = workbench.capture(llama, prompts, hooks=["residual", "attention"], out=out,
                             dry_run=True, progress=False).plan
    assert not out.exists()
    workbench.capture(llama, prompts, hooks=["residual", "attention"], out=out, progress=False)
    size = out.stat().st_size
    assert 0.9 * size < plan.estimated_bytes() < 1.1 * size


def test_run_that_may_not_fit_is_warned_about(tmp_path, llama, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    workbench.capture(llama, ["abc"], hooks=["residual"], out=tmp_path / "r.h5", progress=False)
    assert "warning: the run needs about" in capsys.readouterr().err  # estimates can be high
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]  # the lock file removed


def test_a_capture_that_fails_before_writing_leaves_no_lock_file(tmp_path, llama, monkeypatch):
    from workbench.store import transaction

    def refuse(*args):
        raise UserError("refused")

    monkeypatch.setattr(transaction.RunTransaction, "check_space", refuse)
    with pytest.raises(UserError, match="refused"):
        workbench.capture(llama, ["abc"], hooks=["residual"], out=tmp_path / "r.h5", progress=False)
    assert not list(tmp_path.iterdir())  # not even the lock file


def test_existing_output_is_never_touched(tmp_path, llama):
    out = tmp_path / "run.h5"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="exists; --overwrite"):
        workbench.capture(llama, ["abc"], hooks=["residual"], out=out, progress=False)
    assert out.read_bytes() == b"precious"
    workbench.capture(llama, ["abc"], hooks=["residual"], out=out, overwrite=True, progress=False)
    assert workbench.open_run(out).prompts == ["abc"]


def test_prompt_longer_than_context(tmp_path, llama, capsys):
    long = "x" * 600  # 601 tokens > 512
    with pytest.raises(UserError, match="has 601 tokens; tiny-llama takes at most 512"):
        workbench.capture(llama, [long], hooks=["residual"], out=tmp_path / "r.h5", progress=False)
    workbench.capture(llama, [long, "ok"], hooks=["residual"], out=tmp_path / "r.h5",
                      truncate=True, progress=False)
    assert "1 prompts truncated to 512 tokens" in capsys.readouterr().err
    assert workbench.open_run(tmp_path / "r.h5").n_tokens(0) == 512


@pytest.mark.parametrize("hooks, message", [
    (["blocks.*.hook_resid"], "matches no hook of tiny-llama; close: blocks.*.hook_resid_"),
    (["blocks.9.hook_resid_post"], "layer 9 .* out of range: tiny-llama has layers 0-1"),
    (["rotary_emb.hook_cos"], "holds no value per prompt"),
])
def test_bad_hooks_are_user_errors(tmp_path, llama, hooks, message):
    with pytest.raises(UserError, match=message):
        workbench.capture(llama, ["abc"], hooks=hooks, out=tmp_path / "r.h5", progress=False)
    assert not list(tmp_path.iterdir())


def test_gated_hooks_are_captured_when_named_and_the_model_is_restored(tmp_path, llama):
    out = tmp_path / "r.h5"
    workbench.capture(llama, ["abcdef"], hooks=["blocks.0.attn.hook_result"], out=out, progress=False)
    assert llama.bridge.cfg.use_attn_result is False  # switched back off
    with workbench.open_run(out) as run:
        assert run.settings["gates"] == ["use_attn_result"]
        result = run.activation("blocks.0.attn.hook_result", 0)
        assert result.shape == (7, 4, 64)
        # per-head results sum to the attention output (up to the output bias, zero here)
        llama.bridge.set_use_attn_result(True)
        try:
            ids = torch.tensor([llama.tokenize("abcdef")])
            with torch.no_grad():
                _, cache = llama.bridge.run_with_cache(ids)
        finally:
            llama.bridge.set_use_attn_result(False)
        np.testing.assert_allclose(result, cache["blocks.0.attn.hook_result"][0].numpy(), rtol=1e-6)


def test_reader_does_not_import_torch(big_run):
    _, _, run = big_run
    code = (
        "import sys, workbench\n"
        f"run = workbench.open_run({str(run.path)!r})\n"
        "run.activation('blocks.0.hook_resid_post', 3); run.str_tokens(0); run.top_k(1)\n"
        "print('torch' in sys.modules, 'transformer_lens' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_run_file_is_plain_hdf5(big_run):
    _, _, run = big_run
    with h5py.File(run.path, "r") as f:  # plain h5py, no swmr flag needed for a finished run
        assert f.attrs["schema"] == S.SCHEMA and f.attrs["schema_version"] == S.SCHEMA_VERSION
        offsets = f["prompts/token_offsets"][:]
        assert offsets[0] == 0 and len(offsets) == 201
        resid = f["acts/blocks.1.hook_resid_post"]
        assert resid.shape == (offsets[-1], 64)
        assert json.loads(f["meta/settings"][()].decode())["batch_size"] == 7


def test_h5dump_reads_the_layout(big_run):
    import shutil

    if shutil.which("h5dump") is None:
        pytest.skip("h5dump (Debian hdf5-tools) is not installed")
    _, _, run = big_run
    out = subprocess.run(["h5dump", "-d", "/prompts/token_offsets", "-c", "3", str(run.path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "(0): 0," in out.stdout
    header = subprocess.run(["h5dump", "-H", str(run.path)], capture_output=True, text=True,
                            check=False)
    assert header.returncode == 0 and 'DATASET "blocks.0.attn.hook_pattern"' in header.stdout
