"""Chat models (``--chat``): prompts laid out by the model's own chat template.

The reference is the tokenizer's ``apply_chat_template`` called directly; the capture goes
through the run's text (the template rendered as a string) and our tokenization of it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.clitools import run_cli as _cli
from workbench.capturing.prompts import chat_prompts, from_mapping, normalize
from workbench.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def template_ids(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# --- prompts, without a model ----------------------------------------------------------------------


def test_jsonl_messages_are_checked():
    p = from_mapping({"id": "c", "messages": CONVERSATION}, 0, "line 1")
    assert p.metadata["messages"] == CONVERSATION and p.id == "c"
    for bad, why in [({"messages": []}, "non-empty list"),
                     ({"messages": "hi"}, "non-empty list"),
                     ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
                     ({"messages": [{"role": "robot", "content": "x"}]}, "roles are"),
                     ({"messages": CONVERSATION, "prompt": "x"}, "not both")]:
        with pytest.raises(UserError, match=why):
            from_mapping(bad, 0, "line 1")


def test_messages_without_chat_are_refused(tmp_path):
    from workbench.capturing import capture

    with pytest.raises(UserError, match="capture it with --chat"):
        capture("tiny-gpt2", [{"messages": CONVERSATION}], out=tmp_path / "r.h5", progress=False)
    assert not (tmp_path / "r.h5").exists()


def test_a_model_without_a_template_is_one_line(tmp_path):
    r = _cli("capture", "-m", "tiny-gpt2", "-p", "hello", "--chat", "-o", str(tmp_path / "r.h5"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("workbench: error: tiny-gpt2 has no chat template "
                                                 "(it is not a chat model): drop --chat")
    assert not (tmp_path / "r.h5").exists()
    r = _cli("capture", "-m", "tiny-gpt2", "-p", "hello", "--chat", "--bos", "prepend", "-o", str(tmp_path / "r.h5"))
    assert r.returncode == 2 and "drop --bos prepend" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------


@pytest.mark.integration
def test_chat_capture_tokens_equal_apply_chat_template(smollm2, tmp_path):
    from workbench.capturing import capture
    from workbench.store import open_run

    tok = smollm2.tokenizer
    prompts = [
        "The capital of France is",
        {"id": "conv", "messages": CONVERSATION, "answer": " Rome"},
        {"id": "patch", "prompt": "When Mary and John went to the store, John gave a drink to",
         "corrupted": "When Mary and John went to the store, Anna gave a drink to"},
    ]
    out = tmp_path / "chat.h5"
    capture(smollm2, prompts, hooks=["blocks.0.hook_resid_post"], out=out, chat=True, progress=False)
    conversations = [[{"role": "user", "content": prompts[0]}], CONVERSATION,
                     [{"role": "user", "content": prompts[2]["prompt"]}]]
    with open_run(out) as run:
        for i, messages in enumerate(conversations):
            want = template_ids(tok, messages)
            assert run.tokens(i).tolist() == want
            assert run.prompt(i) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=False)
            assert run.metadata(i)["messages"] == messages
        # the template and the special tokens are recorded
        chat = run.capture_settings.chat
        assert chat["template"] == tok.chat_template
        assert chat["special_tokens"]["bos_token"] == tok.bos_token == "<|im_start|>"
        assert run.capture_settings.bos == "none"
        # the token strip shows the template's special tokens as special tokens
        shown = run.display_tokens(1)
        ids = run.tokens(1).tolist()
        start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
        assert ids.count(start) == 5 and ids.count(end) == 4  # system, user, assistant, user + the opened turn
        for t, tid in zip(shown, ids):
            if tid in (start, end):
                assert t.kind == "special" and t.label == tok.convert_ids_to_tokens(tid)
        # the corrupted prompt is laid out the same way, its last user turn swapped
        meta = run.metadata(2)
        corrupted = [{"role": "user", "content": prompts[2]["corrupted"]}]
        assert meta["corrupted_message"] == prompts[2]["corrupted"]
        assert smollm2.tokenize(meta["corrupted"], bos="none") == template_ids(tok, corrupted)
        # the stored activations are the model's on exactly those tokens
        import torch

        ids0 = torch.tensor([run.tokens(0).tolist()])
        with torch.inference_mode():
            _, cache = smollm2.bridge.run_with_cache(ids0, names_filter="blocks.0.hook_resid_post")
        np.testing.assert_allclose(run.activation("blocks.0.hook_resid_post", 0),
                                   cache["blocks.0.hook_resid_post"][0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_predict_chat_opens_the_assistants_turn(smollm2):
    pred = smollm2.predict("What is the capital of France? Answer in one word.", k=5, chat=True)
    want = template_ids(smollm2.tokenizer, [{"role": "user",
                                             "content": "What is the capital of France? Answer in one word."}])
    assert pred.token_ids == want and pred.bos_policy == "none"
    assert "".join(pred.str_tokens).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # the assistant answers ("The capital of France is Paris."); the bare text is continued instead
    assert pred.top[0].token.strip() in ("The", "Paris")
    plain = smollm2.predict("What is the capital of France? Answer in one word.", k=5)
    assert plain.top[0].token != pred.top[0].token


@pytest.mark.integration
def test_chat_on_the_command_line(tmp_path):
    lines = [json.dumps({"id": "conv", "messages": CONVERSATION}), json.dumps({"prompt": "Hello!"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "chat.h5"
    r = _cli("capture", "--prompts", str(tmp_path / "p.jsonl"), "--chat", "--hooks", "blocks.0.hook_resid_post",
             "--predictions", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = _cli("inspect", str(out), "--json")
    doc = json.loads(r.stdout)
    assert doc["settings"]["chat"]["template_sha256"]
    r = _cli("analyze", str(out), "next-token", "--chat")
    assert r.returncode == 0, r.stderr
    plain = tmp_path / "plain.h5"
    assert _cli("capture", "-p", "Hello!", "--hooks", "blocks.0.hook_resid_post", "-o", str(plain)).returncode == 0
    r = _cli("analyze", str(plain), "next-token", "--chat")
    assert r.returncode == 2 and "was not captured with --chat" in r.stderr


def test_chat_prompts_keep_ids_and_fields():
    class FakeModel:  # only the template step: a visible layout, no tokenizer needed
        def chat_text(self, messages):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    items = chat_prompts(FakeModel(), normalize([{"id": "a", "prompt": "hi", "answer": " x"},
                                                 {"id": "b", "messages": CONVERSATION, "corrupted": "And of Spain?"}]))
    assert [p.id for p in items] == ["a", "b"]
    assert items[0].text == "<user>hi<assistant>" and items[0].metadata["answer"] == " x"
    assert items[1].metadata["corrupted"].endswith("<user>And of Spain?<assistant>")
    assert items[1].metadata["corrupted"].startswith("<system>You answer in one word.<user>What is")
