"""Prompts: from the command line, a text file (one per line) or JSONL.

JSONL lines are objects with ``prompt`` (required) and ``id`` (optional); every other field is kept
as per-prompt metadata. For a chat model a line may carry ``messages`` (a list of ``{"role",
"content"}``) instead of ``prompt``; ``--chat`` lays every prompt out with the model's chat
template (:func:`chat_prompts`). Three fields have a meaning every analysis understands:

- ``answer``: the expected next token or text;
- ``wrong``: a contrasting answer, for logit differences (``answer`` minus ``wrong``);
- ``corrupted``: a corrupted version of the prompt with the same number of tokens, for patching.

A prompt without an id gets ``p<index>`` (:func:`~workbench.store.schema.default_prompt_id`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import UserError
from workbench.models.chat import check_messages, user_turn
from workbench.store.schema import default_prompt_id

if TYPE_CHECKING:
    from workbench.models.model import Model

__all__ = ["TASK_FIELDS", "Prompt", "chat_prompts", "command_line_prompts", "default_prompt_id", "normalize",
           "refuse_messages"]

TASK_FIELDS = ("answer", "wrong", "corrupted")


@dataclass(frozen=True)
class Prompt:
    text: str
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_metadata(meta: dict[str, Any], where: str) -> None:
    for key in TASK_FIELDS:
        if key in meta and not isinstance(meta[key], str):
            raise UserError(f"{where}: field {key!r} must be a string")
    if "corrupted" in meta and not meta["corrupted"]:
        raise UserError(f"{where}: field 'corrupted' is empty")


def from_mapping(obj: Mapping[str, Any], index: int, where: str) -> Prompt:
    if "messages" in obj:
        if "prompt" in obj:
            raise UserError(f"{where}: give either 'prompt' or 'messages', not both")
        messages = check_messages(obj["messages"], where)
        # The text until the chat template lays the conversation out (chat_prompts).
        obj = {**obj, "prompt": messages[-1]["content"] or "(empty message)", "messages": messages}
    if "prompt" not in obj:
        raise UserError(f"{where}: no 'prompt' field (or 'messages', for a chat model)")
    text = obj["prompt"]
    if not isinstance(text, str):
        raise UserError(f"{where}: 'prompt' must be a string")
    if not text:
        raise UserError(f"{where}: empty prompt")
    pid = obj.get("id", default_prompt_id(index))
    if not isinstance(pid, (str, int)) or isinstance(pid, bool) or pid == "":
        raise UserError(f"{where}: 'id' must be a non-empty string or an integer")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "id")}
    _check_metadata(meta, where)
    return Prompt(text=text, id=str(pid), metadata=meta)


def load_prompts_file(path: str | Path, first_index: int = 0) -> list[Prompt]:
    """Prompts from ``path``: JSONL when it ends in ``.jsonl`` (or ``.json``), else one prompt per
    line (empty lines are skipped). Prompts without an id get ``p<index>``, counting from
    ``first_index`` (for prompts that follow others)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {p}") from None
    except IsADirectoryError:
        raise UserError(f"prompts file {p} is a folder") from None
    except UnicodeDecodeError:
        raise UserError(f"prompts file {p} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read prompts file {p}: {exc.strerror}") from None
    prompts: list[Prompt] = []
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{p.name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object with a 'prompt' field")
            prompts.append(from_mapping(obj, first_index + len(prompts), where))
    else:
        for line in text.splitlines():
            if line:
                prompts.append(Prompt(text=line, id=default_prompt_id(first_index + len(prompts))))
    if not prompts:
        raise UserError(f"prompts file {p} holds no prompts")
    return prompts


def command_line_prompts(texts: Iterable[str], path: str | Path | None) -> list[Prompt]:
    """The prompts of ``--prompt TEXT`` options (ids ``p0``, ``p1``, ...) followed by those of a
    ``--prompts FILE`` (numbered on from there)."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not text:
            raise UserError(f"prompt {i + 1} (--prompt) is empty")
    prompts = [Prompt(text=text, id=default_prompt_id(i)) for i, text in enumerate(texts)]
    if path:
        prompts += load_prompts_file(path, first_index=len(prompts))
    if not prompts:
        raise UserError("no prompts: give --prompt TEXT or --prompts FILE")
    return prompts


def normalize(prompts: Iterable[str | Prompt | Mapping[str, Any]] | str | Path) -> list[Prompt]:
    """Accept a path to a prompts file, or prompts as strings, :class:`Prompt` objects or dicts
    (``{"prompt": ..., "id": ..., "answer": ...}``); check ids are unique."""
    if isinstance(prompts, (str, Path)):
        if isinstance(prompts, str) and not Path(prompts).suffix:
            raise UserError(
                "prompts must be a list of strings or a path to a .txt/.jsonl file "
                f"(got the single string {prompts[:40]!r})"
            )
        items: list[Prompt] = load_prompts_file(prompts)
    else:
        items = []
        for i, item in enumerate(prompts):
            if isinstance(item, Prompt):
                if not item.text:
                    raise UserError(f"prompt {item.id!r} is empty")
                items.append(item)
            elif isinstance(item, str):
                if not item:
                    raise UserError(f"prompt {i} is empty")
                items.append(Prompt(text=item, id=default_prompt_id(i)))
            elif isinstance(item, Mapping):
                items.append(from_mapping(item, i, f"prompt {i}"))
            else:
                raise UserError(f"prompt {i} must be a string or a dict, not {type(item).__name__}")
    if not items:
        raise UserError("no prompts given")
    seen: dict[str, int] = {}
    for i, p in enumerate(items):
        if p.id in seen:
            raise UserError(f"duplicate prompt id {p.id!r} (prompts {seen[p.id]} and {i})")
        seen[p.id] = i
    return items


def refuse_messages(prompts: list[Prompt]) -> None:
    """Without ``--chat``, a prompt given as ``messages`` cannot be captured: a UserError."""
    for p in prompts:
        if "messages" in p.metadata:
            raise UserError(f"prompt {p.id!r} is a conversation ('messages'): capture it with --chat "
                            "(the model's chat template lays it out)")


def chat_prompts(model: Model, prompts: list[Prompt]) -> list[Prompt]:
    """Every prompt laid out by ``model``'s chat template, the assistant's turn opened: its text
    becomes the template's text (whose tokens, under the BOS policy ``none``, are exactly
    ``apply_chat_template``'s), its conversation is kept as the ``messages`` field, and a
    ``corrupted`` text (patching) is laid out the same way as the last user turn
    (``corrupted_message`` keeps it as given)."""
    out = []
    for p in prompts:
        messages = p.metadata.get("messages") or user_turn(p.text)
        meta = {**p.metadata, "messages": messages}
        corrupted = meta.get("corrupted")
        if corrupted is not None:
            last = max(j for j, m in enumerate(messages) if m["role"] == "user") if any(
                m["role"] == "user" for m in messages) else None
            if last is None:
                raise UserError(f"prompt {p.id!r}: 'corrupted' replaces the last user turn, and it has none")
            swapped = [dict(m) for m in messages]
            swapped[last]["content"] = corrupted
            meta["corrupted_message"] = corrupted
            meta["corrupted"] = model.chat_text(swapped)
        out.append(Prompt(text=model.chat_text(messages), id=p.id, metadata=meta))
    return out
