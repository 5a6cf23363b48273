"""One word across contexts (plugins/context.py): cosines between its residual vectors and its
logit-lens tokens.

Checked against independent computations on a tiny Llama (byte tokenizer: ``" bank"`` is five
tokens, so the word is located as a token sequence and compared at its last token): the position
found by hand in the prompt's text, numpy cosines in float64 of the vectors read back with
``run.activation``, the same-/cross-sense means over the labelled pairs, and the lens through the
Hugging Face model's own final RMSNorm and ``lm_head`` (and, at the last row, the model's forward
pass).
"""

from __future__ import annotations

import asyncio
from itertools import combinations

import numpy as np
import pytest
import torch
from workbench_plugins import context as C

import workbench
from tests.clitools import run_cli as _cli
from tests.widgets import plain
from workbench.capturing.prompts import Prompt
from workbench.errors import UserError
from workbench.registries import analyze, build_analyses

PROMPTS = [
    ("We sat by the river on the bank.", "river"),
    ("Water ran over the muddy bank again", "river"),
    ("She put money in the bank today.", "money"),
    ("The bank gave him a loan; the bank", "money"),  # twice: the first occurrence counts
    ("No such word here.", None),
    ("a bank", None),  # no sense label
]
WORD = " bank"


@pytest.fixture(scope="module")
def ctx_run(tmp_path_factory, tiny_models):
    model = tiny_models["tiny-llama"]
    out = tmp_path_factory.mktemp("context") / "run.h5"
    items = [Prompt(text=t, id=f"p{i}", metadata={"sense": s} if s else {}) for i, (t, s) in enumerate(PROMPTS)]
    workbench.capture(model, items, hooks=[*C.CONTEXT.needs, *C.CONTEXT.optional], out=out, progress=False)
    run = workbench.open_run(out)
    yield run, model
    run.close()


def _analyze(run, model, **params):
    [out] = analyze(run, [build_analyses().get("context")], {"context": {"word": WORD, **params}}, model=model)
    assert out.ok, out.stored.error
    return out.stored


def _position(run, i, word=WORD):
    """By hand: the first token whose prefix of the decoded prompt ends with the word."""
    strs = run.str_tokens(i)
    for p in range(len(strs)):
        text = "".join(strs[: p + 1])
        if text.endswith(word):
            return p
    return None


def _cos(u, v):
    return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))


def test_cosines_equal_numpy_on_the_stored_vectors(ctx_run):
    run, model = ctx_run
    stored = _analyze(run, model)
    d, a = stored.data, stored.arrays
    assert d["layers"] == ["embed", "0", "1"]
    assert d["hooks"] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    found = [i for i in range(len(run)) if _position(run, i) is not None]
    assert found == [0, 1, 2, 3, 5] and [p["index"] for p in d["prompts"]] == found
    assert d["skipped"] == [{"index": 4, "id": "p4"}]
    assert any("5 tokens" in n and "last token" in n for n in d["notes"])  # byte tokens: ' ', b, a, n, k
    assert d["token"] == "k" and d["pieces"] == [" ", "b", "a", "n", "k"]
    positions = [_position(run, i) for i in found]
    assert [p["position"] for p in d["prompts"]] == positions == a["positions"].tolist()
    assert positions[3] == len("The bank")  # the first ' bank' of prompt 3 (after BOS)
    vectors = np.stack([np.stack([run.activation(h, i)[p] for i, p in zip(found, positions)])
                        for h in d["hooks"]]).astype(np.float64)  # rows x contexts x d
    for r in range(len(d["hooks"])):
        for x, y in combinations(range(len(found)), 2):
            want = _cos(vectors[r, x], vectors[r, y])
            assert abs(a["cosine"][r, x, y] - want) < 1e-5 and abs(a["cosine"][r, y, x] - want) < 1e-5
        np.testing.assert_allclose(np.diag(a["cosine"][r]), 1.0, atol=1e-5)
    pairs = list(combinations(range(len(found)), 2))
    assert a["pairs"].tolist() == [list(p) for p in pairs]
    # RoPE model, no positional embedding: the same token has the same embedding in every context
    np.testing.assert_allclose(a["pair_cosine"][0], 1.0, atol=1e-6)
    assert a["pair_cosine"][-1].min() < 0.999  # the context changed it
    labels = ["river", "river", "money", "money", None]
    same = [(x, y) for x, y in pairs if labels[x] and labels[x] == labels[y]]
    cross = [(x, y) for x, y in pairs if labels[x] and labels[y] and labels[x] != labels[y]]
    assert (d["n_same_pairs"], d["n_cross_pairs"]) == (2, 4) == (len(same), len(cross))
    for r in range(len(d["hooks"])):
        v = vectors[r]
        assert abs(a["same"][r] - np.mean([_cos(v[x], v[y]) for x, y in same])) < 1e-5
        assert abs(a["cross"][r] - np.mean([_cos(v[x], v[y]) for x, y in cross])) < 1e-5
        assert abs(d["by_layer"][r]["mean"] - np.mean([_cos(v[x], v[y]) for x, y in pairs])) < 1e-5
        margin = min(_cos(v[x], v[y]) for x, y in same) - max(_cos(v[x], v[y]) for x, y in cross)
        assert abs(a["margin"][r] - margin) < 1e-5
        nearest = [max((o for o in range(4) if o != x), key=lambda o, x=x: _cos(v[x], v[o])) for x in range(4)]
        if r > 0:  # (the embedding row is all ties: strictly, no context is nearer its own sense)
            assert a["nearest_same"][r] == np.mean([labels[o] == labels[x] for x, o in enumerate(nearest)])
    assert a["nearest_same"][0] == 0.0
    assert d["senses"] == {"river": 2, "money": 2}
    np.testing.assert_allclose(a["norms"], np.linalg.norm(vectors, axis=-1).T, rtol=1e-6)
    text = C.CONTEXT.text(stored.result())
    assert "in 5 prompts" in text and "river 2, money 2" in text and "[ bank]" in text


def test_lens_tokens_equal_the_final_norm_and_unembedding_by_hand(ctx_run):
    run, model = ctx_run
    stored = _analyze(run, model, top=4)
    d, a = stored.data, stored.arrays
    hf = model.bridge.original_model
    for c, rec in enumerate(d["prompts"]):
        i, pos = rec["index"], rec["position"]
        for r, hook in enumerate(d["hooks"]):
            resid = torch.as_tensor(run.activation(hook, i)[pos])[None]
            with torch.inference_mode():  # the Hugging Face modules themselves: RMSNorm, lm_head
                logits = hf.lm_head(hf.model.norm(resid))[0].double()
            probs = torch.softmax(logits, -1)
            top = torch.topk(probs, 4)
            assert a["lens_ids"][c, r].tolist() == top.indices.tolist()
            np.testing.assert_allclose(a["lens_probs"][c, r], top.values.numpy(), atol=1e-5)
            assert rec["lens"][r] == model.str_tokens(top.indices.tolist())
        with torch.inference_mode():  # the last row is the model's own prediction there
            out = model.forward(torch.as_tensor(run.tokens(i), dtype=torch.long)[None])[0, pos]
        assert a["lens_ids"][c, -1, 0] == int(out.argmax())
    assert d["output_check"] == {"compared": 5, "agree": 5}




def test_errors_are_one_line(ctx_run):
    run, model = ctx_run
    context = build_analyses().get("context")
    with pytest.raises(UserError, match=r"'zebra' \(tokens .*\) occurs in none of the 6 prompts"):
        analyze(run, [context], {"context": {"word": "zebra"}}, model=model)
    with pytest.raises(UserError, match=r"occurs in only one prompt \('p3'\).*at least two"):
        analyze(run, [context], {"context": {"word": "loan"}}, model=model)
    with pytest.raises(UserError, match="give the word"):
        analyze(run, [context], model=model)
    proc = _cli("analyze", str(run.final_path), "context", "--param", "context.word= zebra")
    [error] = [line for line in proc.stderr.splitlines() if not line.startswith("workbench: reloading")]
    assert proc.returncode == 2 and error.startswith("workbench: error: ' zebra' (tokens"), proc.stderr
    assert "occurs in none of the 6 prompts of run.h5" in error


def test_view_shows_the_cosines_follows_the_focus_and_the_lens(ctx_run):
    from workbench_plugins.context_view import ContextView

    from workbench.tui import make_app

    run, model = ctx_run
    stored = _analyze(run, model)
    cos = stored.arrays["cosine"]
    app = make_app([str(run.final_path)], view="results")

    async def main():
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(3):
                await pilot.pause()
            view = app.query_one(ContextView)
            shown = {}
            app.query_one("#prompts").focus()
            for prompt in (0, 1, 2, 3, 4):  # prompt 4 has no ' bank': the first context is shown
                while app.focus_state.prompt < prompt:
                    await pilot.press("n")
                    await pilot.pause()
                shown[prompt] = plain(view, width=view.size.width)
            view.focus()
            await pilot.press("l")
            shown["lens"] = plain(view, width=view.size.width)
            shown["width"] = view.size.width
            return shown

    shown = asyncio.run(main())
    assert 24 <= shown["width"] <= 80  # the results panel's body, beside the list of results
    for prompt, c in ((0, 0), (2, 2), (3, 3)):
        text = shown[prompt]
        label = stored.data["prompts"][c]["label"]
        assert f"' bank' · prompt {prompt}\n[{label}] …" in text
        assert "same" in text and "cross" in text and "lens" in text
        other = 0 if c != 0 else 1  # the first other context: the first pair column
        assert f"{cos[-1, c, other]:.2f}" in text and f"#{stored.data['prompts'][other]['index']}" in text
        assert "embed" in text and "1.00" in text
    assert "prompt 4 has no ' bank': showing prompt 0" in " ".join(shown[4].split())  # unwrapped
    lens = stored.data["prompts"][0]["lens"]  # prompt 4 fell back to the first context
    assert "logit lens at 'k'" in shown["lens"] and "%" in shown["lens"]
    assert repr(lens[-1][0])[1:-1][:5] in shown["lens"]
