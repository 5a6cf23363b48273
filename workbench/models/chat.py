"""Chat models: prompts as conversations, through the model's own chat template.

A chat model (SmolLM2-135M-Instruct, the default ``smollm2-135m``) was fine-tuned on
conversations laid out by a template: special tokens around each turn (``<|im_start|>user\\n ...
<|im_end|>``), a default system turn, and the opening of the assistant's turn that the model
continues. Feeding it bare text studies a different input from the one it was trained on.

The template is the tokenizer's own (a Jinja template shipped in the checkpoint, here in the
GGUF's metadata), applied by transformers' ``apply_chat_template`` — nothing is re-implemented.
The template writes its own special tokens, so a chat prompt is tokenized with the BOS policy
``none`` (the template's first token is the model's BOS); :func:`chat_ids` is exactly
``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from workbench.errors import UserError

__all__ = ["ROLES", "check_messages", "chat_ids", "chat_record", "render", "template_of", "user_turn"]

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` dicts of strings; a UserError naming
    ``where`` otherwise."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {j} must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {j} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def user_turn(text: str) -> list[dict[str, str]]:
    """A plain prompt as a conversation: one user turn."""
    return [{"role": "user", "content": text}]


def template_of(tokenizer: Any, model_name: str) -> str:
    """The tokenizer's chat template; a UserError when the model has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise UserError(f"{model_name} has no chat template (it is not a chat model): drop --chat")
    return template


def render(tokenizer: Any, messages: list[dict[str, str]], model_name: str) -> str:
    """The conversation as the text the template makes of it, ending with the opening of the
    assistant's turn (``add_generation_prompt``)."""
    template_of(tokenizer, model_name)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template itself refuses (jinja raise_exception), e.g. roles out of order
        raise UserError(f"{model_name}'s chat template refuses these messages: {exc}") from None
    return str(text)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], model_name: str) -> list[int]:
    """Token ids of the conversation, exactly as ``apply_chat_template(..., tokenize=True)``."""
    template_of(tokenizer, model_name)
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def chat_record(tokenizer: Any, model_name: str) -> dict[str, Any]:
    """What a run records of the template it was captured with (``meta/settings`` ``chat``)."""
    template = template_of(tokenizer, model_name)
    specials = {name: getattr(tokenizer, name, None)
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {
        "template": template,
        "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "add_generation_prompt": True,
        "special_tokens": {k: v for k, v in specials.items() if isinstance(v, str)},
        "added_special_tokens": [str(t) for t in getattr(tokenizer, "all_special_tokens", [])],
    }
