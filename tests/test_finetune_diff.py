"""Fine-tuning made visible: ``toy-induction-ft`` (plugins/toy_finetune.py, trained by
examples/finetune_toy.py to follow every ``a`` with ``z``) against ``toy-induction``, and the
``diff`` analysis between them.

Oracles: the two models' own forward passes (TransformerLens, torch), not the diff code, for what
the fine-tune learned; and, for the diff's numbers, a variant built here whose only change from
the base is a known vector Δ added to the unembedding bias ``b_U``: nothing upstream of the logits
changes, so every residual hook's relative L2 and every head's JS must be exactly 0, and the logit
lens's KL at the last layer must equal ``KL(softmax(z) || softmax(z + Δ))`` computed by hand from
the base model's final logits ``z``.
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from workbench_plugins.toy_finetune import BASE, FINETUNE, boot, sha256
from workbench_plugins.toy_models import VOCAB

import workbench
from workbench.analysis import analyze as analyze_with
from workbench.models import ModelSource, Provenance
from workbench.registries import analyze, build_analyses, build_registry

pytestmark = pytest.mark.skipif(not (FINETUNE / "model.safetensors").is_file(),
                                reason="toy-induction-ft weights missing (examples/finetune_toy.py)")

BOS, A, Z = VOCAB["<bos>"], VOCAB["a"], VOCAB["z"]


def _prompts() -> list[dict[str, str]]:
    """Ten letters (no ``a`` or ``z``) with one ``a`` planted, then repeated: in the first copy
    only the rule predicts what follows ``a``; in the second, induction says another letter."""
    rng = np.random.default_rng(5)
    letters = [chr(c) for c in range(ord("b"), ord("y"))]
    out = []
    for i in range(8):
        seg = list(rng.choice(letters, 10, replace=False))
        seg[int(rng.integers(1, 8))] = "a"
        out.append({"id": f"p{i}", "prompt": " ".join(seg + seg)})
    return out


def _ids(prompt: str) -> list[int]:
    return [BOS] + [VOCAB[w] for w in prompt.split()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("ft")
    paths = {}
    for name in ("toy-induction", "toy-induction-ft"):
        paths[name] = folder / f"{name}.h5"
        workbench.capture(name, _prompts(), hooks=["residual", "attention"], out=paths[name], device="cpu",
                          progress=False)
    return paths


def _probs(name: str) -> np.ndarray:
    """The model's own next-token probabilities on the prompts, (prompts, positions, vocab)."""
    model = workbench.load_model(name, device="cpu", progress=False)
    tokens = torch.tensor([_ids(p["prompt"]) for p in _prompts()])
    with torch.no_grad():
        return torch.softmax(model.bridge(tokens).double(), -1).numpy()


def test_the_fine_tune_follows_a_with_z_and_keeps_induction():
    base, ft = _probs("toy-induction"), _probs("toy-induction-ft")
    tokens = np.array([_ids(p["prompt"]) for p in _prompts()])
    n = 10  # letters per copy; a copy starts at position 1 (after <bos>)
    first_a = np.argwhere(tokens[:, : n + 1] == A)  # (prompt, position) of each first-copy `a`
    assert len(first_a) == len(tokens)
    p_ft = ft[first_a[:, 0], first_a[:, 1], Z]
    p_base = base[first_a[:, 0], first_a[:, 1], Z]
    assert p_ft.min() > 0.5 and p_base.max() < 0.1, (p_ft, p_base)
    # induction kept: in the second copy, apart from after `a`, both models predict the repeat
    rows, cols = np.nonzero(tokens[:, n + 1 : -1] != A)
    cols = cols + n + 1
    target = tokens[rows, cols + 1]
    for probs in (base, ft):
        assert probs[rows, cols, target].mean() > 0.6


def test_the_diff_finds_z_moved_after_a(runs):
    paths = runs
    with workbench.open_run(paths["toy-induction"]) as run:
        [o] = analyze(run, [build_analyses().get("diff")],
                      {"diff": {"other": str(paths["toy-induction-ft"]), "lens": "on"}}, device="cpu")
        assert o.ok, o.stored.meta.get("traceback")
        d = o.stored.result().data
        stored = [run.tokens(p["a"]).tolist() for p in d["pairs"]]
    prompts = {p["id"]: p["prompt"] for p in _prompts()}
    assert stored == [_ids(prompts[p["id"]]) for p in d["pairs"]]
    top = d["lm"]["moved"][:5]
    after_a = [m for m in top if m["token"] == "z" and stored[m["pair"]][m["position"]] == A]
    assert after_a, top
    assert all(m["p_b"] > 0.5 for m in after_a)
    assert d["lens"]["layers"] == [0, 1] and d["lens"]["mean_kl"][1] > d["lens"]["mean_kl"][0] > 0


def test_a_change_of_the_unembedding_bias_only_is_seen_only_in_the_lens(runs, tmp_path):
    paths = runs
    delta = torch.as_tensor(np.random.default_rng(0).normal(0.0, 1.0, len(VOCAB)), dtype=torch.float32)
    weights = safetensors.torch.load_file(str(BASE / "model.safetensors"))
    [bias] = [k for k in weights if k.startswith("head.") and k.endswith(".bias")]
    weights[bias] = weights[bias] + delta
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(weights, str(path))
    provenance = Provenance(source="directory", location=str(path), sha256=sha256(path),
                            converted="toy-induction with a known vector added to b_U (a test)")
    registry = build_registry()
    registry.add(ModelSource(name="toy-induction-bias", family="decoder", description="test variant",
                             load=lambda request: boot(request, path, provenance)))
    variant = workbench.load_model("toy-induction-bias", device="cpu", progress=False, registry=registry)
    out = tmp_path / "bias.h5"
    workbench.capture(variant, _prompts(), hooks=["residual", "attention"], out=out, device="cpu",
                      progress=False)
    with workbench.open_run(paths["toy-induction"]) as run:
        [o] = analyze_with(run, [build_analyses().get("diff")], {"diff": {"other": str(out), "lens": "on"}},
                           device="cpu", registry=registry)
        assert o.ok, o.stored.meta.get("traceback")
        r = o.stored.result()
    d, arrays = r.data, r.arrays
    assert len(d["token_hooks"]) >= 4 and len(d["square_hooks"]) == 2
    for k, row in enumerate(d["token_hooks"]):
        assert np.all(arrays[f"rel_l2.{k}"] == 0), row["hook"]
    for k, row in enumerate(d["square_hooks"]):
        assert np.all(arrays[f"js.{k}"] == 0) and row["heads"] == [0.0, 0.0], row["hook"]
    base = workbench.load_model("toy-induction", device="cpu", progress=False)
    want = []
    for p in d["pairs"]:
        with torch.no_grad():
            z = base.bridge(torch.tensor([_ids(_prompts()[p["a"]]["prompt"])]))[0].double()
        la, lb = torch.log_softmax(z, -1), torch.log_softmax(z + delta.double(), -1)
        want.append((la.exp() * (la - lb)).sum(-1).numpy())
    want = np.concatenate(want)
    assert want.mean() > 0.1  # a change worth measuring
    np.testing.assert_allclose(arrays["lens_kl"][-1], want, rtol=0, atol=1e-5)
    assert np.all(arrays["kl_topk"] <= want + 1e-5)  # the top-k KL is a lower bound
