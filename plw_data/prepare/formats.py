"""Turn raw rows of each supported format into one shape: a conversation plus which turns train.

prompt-completion and alpaca rows become [system?, user, assistant]; messages and sharegpt rows keep
their turns. Everything downstream (render, masks, rg-stats in chars/words) sees only Conversation.
"""

from __future__ import annotations

import functools
import json
import math
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError, RowError
from .sources import RawRow, iter_rows

ROLES = ("system", "user", "assistant", "tool")
#: Names a message's reasoning may come under, passed to the template as the data has them.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
#: Message keys besides role/content that reach the chat template (tools, reasoning).
PASSED_FIELDS = (*REASONING_FIELDS, "tool_calls", "tool_call_id", "name")
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
    "tool": "tool",
}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, Any], ...]  # {"role", "content", ...PASSED_FIELDS}, as apply_chat_template takes them
    trained: tuple[bool, ...]  # per message: its content is completion
    weights: tuple[float, ...] | None = None  # per message "weight" multipliers; None: all 1
    tools: list[dict[str, Any]] | None = None  # JSON-schema tool list for the template's `tools`

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(m["role"] for m in self.messages)

    def is_plain_message(self, i: int) -> bool:
        """Role and text content only, no reasoning: a placeholder can stand for its content."""
        m = self.messages[i]
        return len(m) == 2 and isinstance(m["content"], str) and "</think>" not in m["content"]

    @property
    def is_plain(self) -> bool:
        """Only plain messages (tools may be given): the one-render skeleton path can mask it (docs/chat.md)."""
        return all(len(m) == 2 and isinstance(m["content"], str) and "</think>" not in m["content"] for m in self.messages)


def reasoning_of(message: dict[str, Any]) -> str | None:
    """A message's reasoning: its reasoning field, else the text inside <think>...</think> in its content."""
    for key in REASONING_FIELDS:
        if isinstance(message.get(key), str) and message[key].strip():
            return message[key]
    content = message.get("content")
    if isinstance(content, str) and "</think>" in content:
        head = content.split("</think>")[0]
        return head.split("<think>", 1)[1] if "<think>" in head else head
    return None


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


def _weight(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RowError("bad_weight", f"a message weight must be a finite number >= 0, got {value!r}", field=field)
    return float(value)


def _extra(turn: dict[str, Any], where: str) -> dict[str, Any]:
    """The passed-through keys of a turn, checked enough that the template sees what it expects."""
    out: dict[str, Any] = {}
    for key in PASSED_FIELDS:
        value = turn.get(key)
        if value is None:
            continue
        if key == "tool_calls":
            if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
                raise RowError("wrong_type", "tool_calls must be a list of objects", field=f"{where}.tool_calls")
            for j, call in enumerate(value):
                fn = call.get("function", call)
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RowError("bad_tool_call", "a tool call needs function.name", field=f"{where}.tool_calls[{j}]")
        elif not isinstance(value, str):
            raise RowError("wrong_type", f"expected a string, got {type(value).__name__}", field=f"{where}.{key}")
        out[key] = value
    return out


def _turns(row: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, Any]]:
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
        extra = _extra(turn, where)
        text = turn[text_key]
        content = None if text is None and extra.get("tool_calls") else _content(text, f"{where}.{text_key}")
        msg = {"role": role, "content": content, **extra}
        if turn.get("weight") is not None:
            msg["weight"] = _weight(turn["weight"], f"{where}.weight")
        out.append(msg)
    return out


def _tools(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]] | None:
    """The row's own `tools` (a list, or its JSON text), else the --tools file's list."""
    value = row.get("tools")
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except ValueError as e:
            raise RowError("bad_tools", f"not valid JSON: {e}", field="tools") from None
    if value is None:
        return load_tools_file(cfg.tools) if cfg.tools else None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError("bad_tools", "tools must be a list of JSON-schema objects", field="tools")
    return value


@functools.lru_cache(maxsize=4)
def load_tools_file(path: str) -> list[dict[str, Any]]:
    """The --tools list (read once per process)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: --tools must be a readable JSON file: {e}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{path}: --tools must hold a JSON list of tool schemas")
    return value


def _chat(msgs: list[dict[str, Any]], cfg: DataConfig, row: dict[str, Any] | None = None) -> Conversation:
    if cfg.system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": cfg.system_prompt}] + msgs
    weights = tuple(float(m.pop("weight", 1.0)) for m in msgs)
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    trained = [False] * len(msgs)
    for i in assistant if cfg.train_on == "all" else assistant[-1:]:
        trained[i] = weights[i] > 0  # weight 0: context, not trained
    tools = _tools(row, cfg) if row is not None else None
    return Conversation(tuple(msgs), tuple(trained), weights if any(w != 1.0 for w in weights) else None, tools)


FORMATS = {
    "prompt-completion": _prompt_completion,
    "alpaca": _alpaca,
    "messages": lambda row, cfg: _chat(_turns(row, "messages", "role", "content", {r: r for r in ROLES}), cfg, row),
    "sharegpt": lambda row, cfg: _chat(_turns(row, "conversations", "from", "value", SHAREGPT_ROLES), cfg, row),
}

# Private-use code points: the renderer's placeholders; content must not contain them.
RESERVED = ("\ue000", "\ue001")


def validate(conv: Conversation) -> Conversation:
    """Structural checks every template relies on; each failure is a named drop reason."""
    all_roles = conv.roles
    roles = [r for r in all_roles if r != "system"]
    if "system" in all_roles[1:]:
        raise RowError("bad_turn_order", "a system message may only come first")
    if "assistant" not in roles:
        raise RowError("no_assistant_turn", "nothing to train on")
    if roles[0] != "user":
        raise RowError("starts_with_assistant", "the first non-system turn must be the user's")
    # Consecutive same-role turns are the template's call: it raises if it refuses them.
    nul, (r0, r1) = "\x00", RESERVED
    for i, m in enumerate(conv.messages):
        text = m["content"] or ""
        parts = (text,) if len(m) == 2 else (text, *(m.get(k) or "" for k in REASONING_FIELDS))  # role, content only
        for part in parts:
            if nul in part:
                raise RowError("nul_byte", "content holds a NUL byte", field=f"messages[{i}]")
            if r0 in part or r1 in part:
                raise RowError("reserved_character", "content holds U+E000/U+E001", field=f"messages[{i}]")
        if not text.strip() and m["role"] in ("user", "assistant") and not m.get("tool_calls") and not reasoning_of(m):
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
    if all(type(x) is str and len(x) <= limit for x in record.values()):  # the common flat row, at once
        return None
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
