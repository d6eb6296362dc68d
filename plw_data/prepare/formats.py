"""Turn raw rows of each supported format into one shape: a conversation plus which turns train.

prompt-completion and alpaca rows become [system?, user, assistant]; messages and sharegpt rows keep
their turns. Everything downstream (render, masks, rg-stats in chars/words) sees only Conversation.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import DataConfig
from ..errors import RowError
from .sources import RawRow, iter_rows

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, str], ...]  # {"role", "content"}, as apply_chat_template takes them
    trained: tuple[bool, ...]  # per message: its content is completion

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(m["role"] for m in self.messages)


def _text(value: Any, field: str) -> str:
    """A scalar field as text; lists of strings are lettered like multiple-choice options."""
    if value is None:
        raise RowError("missing_field", "value is null", field=field)
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError("wrong_type", f"expected a string, got {type(value).__name__}", field=field)
    return str(value)


class _Fields(dict):
    """str.format mapping over a row: lists render as "A) ...\\nB) ...", errors name the field."""

    def __init__(self, row: dict[str, Any], labels: str):
        super().__init__(row)
        self.labels = labels

    def __missing__(self, key: str) -> Any:
        raise RowError("missing_field", "the template names a field the row does not have", field=key)

    def __getitem__(self, key: str) -> str:
        value = super().__getitem__(key)
        if isinstance(value, list):
            if len(value) > len(self.labels) or not all(isinstance(v, str) for v in value):
                raise RowError("wrong_type", "a list field must hold at most 26 strings", field=key)
            return "\n".join(f"{self.labels[i]}) {v}" for i, v in enumerate(value))
        return _text(value, key)


def render_template(template: str, row: dict[str, Any], labels: str) -> str:
    try:
        return string.Formatter().vformat(template, (), _Fields(row, labels))
    except (IndexError, ValueError) as e:
        raise RowError("bad_template", f"{template!r}: {e}") from None


def _field(row: dict[str, Any], name: str) -> str:
    if name not in row:
        raise RowError("missing_field", "the row has no such field", field=name)
    return _text(row[name], name)


def _single_turn(prompt: str, completion: str, system: str | None) -> Conversation:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": completion},
    ]
    return Conversation(tuple(msgs), tuple(m["role"] == "assistant" for m in msgs))


def _prompt_completion(row: dict[str, Any], cfg: DataConfig) -> Conversation:
    prompt = render_template(cfg.prompt_template, row, cfg.options_labels) if cfg.prompt_template else _field(row, "prompt")
    completion = (
        render_template(cfg.completion_template, row, cfg.options_labels)
        if cfg.completion_template
        else _field(row, "completion")
    )
    return _single_turn(prompt, completion, cfg.system_prompt)


def _alpaca(row: dict[str, Any], cfg: DataConfig) -> Conversation:
    if cfg.prompt_template:
        prompt = render_template(cfg.prompt_template, row, cfg.options_labels)
    else:
        instruction = _field(row, "instruction")
        extra = _text(row["input"], "input") if row.get("input") is not None else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    completion = (
        render_template(cfg.completion_template, row, cfg.options_labels)
        if cfg.completion_template
        else _field(row, "output")
    )
    return _single_turn(prompt, completion, cfg.system_prompt)


def _content(value: Any, field: str) -> str:
    """Message content: a string, or a list of parts of which only text parts are supported."""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise RowError("unsupported_content", "only text parts are supported", field=field)
            texts.append(part["text"])
        return "".join(texts)
    return _text(value, field)


def _turns(row: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if key not in row or row[key] is None:
        raise RowError("missing_field", "the row has no conversation", field=key)
    turns = row[key]
    if not isinstance(turns, list):
        raise RowError("wrong_type", f"expected a list of turns, got {type(turns).__name__}", field=key)
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError("wrong_type", "a turn must be an object", field=where)
        if role_key not in turn or text_key not in turn:
            missing = role_key if role_key not in turn else text_key
            raise RowError("missing_field", "the turn has no such key", field=f"{where}.{missing}")
        role = roles.get(str(turn[role_key]).lower()) if isinstance(turn[role_key], str) else None
        if role is None:
            raise RowError("unknown_role", f"role {turn[role_key]!r} is not one of {sorted(roles)}", field=f"{where}.{role_key}")
        out.append({"role": role, "content": _content(turn[text_key], f"{where}.{text_key}")})
    return out


def _chat(msgs: list[dict[str, str]], cfg: DataConfig) -> Conversation:
    if cfg.system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": cfg.system_prompt}] + msgs
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    trained = [False] * len(msgs)
    for i in assistant if cfg.train_on == "all" else assistant[-1:]:
        trained[i] = True
    return Conversation(tuple(msgs), tuple(trained))


FORMATS = {
    "prompt-completion": _prompt_completion,
    "alpaca": _alpaca,
    "messages": lambda row, cfg: _chat(_turns(row, "messages", "role", "content", {r: r for r in ROLES}), cfg),
    "sharegpt": lambda row, cfg: _chat(_turns(row, "conversations", "from", "value", SHAREGPT_ROLES), cfg),
}

# Private-use code points: the renderer's placeholders; content must not contain them.
RESERVED = ("\ue000", "\ue001")


def validate(conv: Conversation) -> Conversation:
    """Structural checks every template relies on; each failure is a named drop reason."""
    roles = [r for r in conv.roles if r != "system"]
    if "system" in conv.roles[1:]:
        raise RowError("bad_turn_order", "a system message may only come first")
    if "assistant" not in roles:
        raise RowError("no_assistant_turn", "nothing to train on")
    if roles[0] != "user":
        raise RowError("starts_with_assistant", "the first non-system turn must be the user's")
    if any(a == b for a, b in zip(roles, roles[1:])):
        raise RowError("bad_turn_order", "user and assistant turns must alternate")
    for i, m in enumerate(conv.messages):
        text = m["content"]
        if "\x00" in text:
            raise RowError("nul_byte", "content holds a NUL byte", field=f"messages[{i}]")
        if any(c in text for c in RESERVED):
            raise RowError("reserved_character", "content holds U+E000/U+E001", field=f"messages[{i}]")
        if not text.strip() and m["role"] != "system":
            kind = "empty_completion" if m["role"] == "assistant" else "empty_prompt"
            raise RowError(kind, f"{m['role']} content is empty or whitespace", field=f"messages[{i}]")
    return conv


def to_conversation(row: dict[str, Any], cfg: DataConfig) -> Conversation:
    return validate(FORMATS[cfg.format](row, cfg))


def iter_conversations(
    inputs: list[str], cfg: DataConfig, *, start_index: int = 0
) -> Iterator[tuple[RawRow, Conversation | RowError]]:
    """Every row of the inputs with its conversation, or the RowError that drops it."""
    for raw in iter_rows(inputs, start_index=start_index, split=cfg.split):
        yield raw, convert(raw, cfg)


def row_too_large(record: dict[str, Any], limit: int) -> RowError | None:
    """A row holding a string over ``limit`` characters, found before any rendering or tokenizing."""
    stack: list[tuple[str, Any]] = list(record.items())
    while stack:
        name, x = stack.pop()
        if isinstance(x, str) and len(x) > limit:
            return RowError("row_too_large", f"{len(x):,} characters, over --max-field-chars {limit:,}", field=name)
        if isinstance(x, dict):
            stack.extend((f"{name}.{k}", v) for k, v in x.items())
        elif isinstance(x, list):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(x))
    return None


def convert(raw: RawRow, cfg: DataConfig) -> Conversation | RowError:
    if isinstance(raw.record, RowError):
        return raw.record
    if (too_large := row_too_large(raw.record, cfg.field_chars_limit())) is not None:
        return too_large
    try:
        return to_conversation(raw.record, cfg)
    except RowError as e:
        return e
