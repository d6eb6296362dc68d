"""Where each message's content is in a chat template's rendering: the template's skeleton.

The template is rendered once per role pattern with placeholder contents; the fixed text between
placeholders (the skeleton's pieces) is then matched against a real rendering to find each content's
character span, and the Rust tokenizer's char->token map turns spans into token ranges. User text
that looks like a role header or a special token stays inside its message's span.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError, RowError
from .formats import RESERVED

_PLACEHOLDER = re.compile(f"{RESERVED[0]}(\\d+){RESERVED[1]}")
_PAD = " \n"  # probe padding: shows whether a template keeps a content's outer whitespace
_REWRITE_TRIES = 8  # occurrences of the following text tried when a template rewrote a content


def _placeholder(i: int) -> str:
    return f"{RESERVED[0]}{i}{RESERVED[1]}"


@contextmanager
def fixed_clock(day: _dt.date) -> Iterator[None]:
    """Pin the clock that chat templates read through transformers' ``strftime_now`` to midnight of
    ``day``, so that a template printing today's date renders the same bytes on any day."""
    from transformers.utils import chat_template_utils as ctu

    class _Fixed(_dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> _dt.datetime:  # the run's date, whatever the zone
            return _dt.datetime(day.year, day.month, day.day)

    saved = ctu.datetime
    ctu.datetime = _Fixed
    try:
        yield
    finally:
        ctu.datetime = saved


class Skeleton:
    """A template rendered with placeholder contents: the fixed text between message contents.

    Messages whose content is not a string, is empty, or is listed in ``keep`` render as they are:
    their text is part of the fixed pieces. A second rendering with whitespace-padded placeholders
    tells, per message, whether the template keeps the content's outer whitespace, so a whitespace-only
    separator next to a content is never ambiguous."""

    def __init__(self, render: Any, messages: list[dict[str, Any]], keep: frozenset[int] = frozenset()):
        def with_placeholders(pad: str) -> list[dict[str, Any]]:
            return [
                m if i in keep or not isinstance(m.get("content"), str) or not m["content"]
                else {**m, "content": f"{pad}{_placeholder(i)}{pad}"}
                for i, m in enumerate(messages)
            ]

        text = render(with_placeholders(""))
        parts = _PLACEHOLDER.split(text)
        self.pieces: list[str] = parts[0::2]
        self.order: list[int] = [int(i) for i in parts[1::2]]
        self.roles = [m["role"] for m in messages]
        if len(set(self.order)) != len(self.order) or self.order != sorted(self.order):
            raise ConfigError(f"chat template renders messages out of order or twice (roles {self.roles}); masks would be ambiguous")
        self.missing = [  # contents the template leaves out: nothing of them would be trained or seen
            i for i, m in enumerate(messages)
            if i not in keep and isinstance(m.get("content"), str) and m["content"] and i not in self.order
        ]
        padded = render(with_placeholders(_PAD))
        self.strip: dict[int, tuple[bool, bool]] = {}  # message -> (strips leading, strips trailing) whitespace
        for i in self.order:
            at = padded.find(_placeholder(i))
            lead = padded[max(at - len(_PAD), 0) : at] == _PAD
            trail = padded.startswith(_PAD, at + len(_placeholder(i)))
            self.strip[i] = (not lead, not trail)

    def _candidates(self, msg: int, content: str) -> Iterator[str]:
        """The content as the template shows it (the probe's prediction) first, then the other
        whitespace variants; lazily, as contents can be long."""
        lead, trail = self.strip[msg]
        first = content.lstrip() if lead else content
        first = first.rstrip() if trail else first
        yield first
        seen = {len(first)}
        for variant in (str.rstrip, str.lstrip, str.strip, str):
            cand = variant(content)
            if len(cand) not in seen:  # variants of one content differ only in length
                seen.add(len(cand))
                yield cand

    def _greedy(self, text: str, contents: list[str]) -> list[tuple[int, int, int]] | None:
        """The common case, fast: each content's first fitting variant, no backtracking, no rewrites."""
        pos, out, n = len(self.pieces[0]), [], len(self.order)
        for k, msg in enumerate(self.order):
            after = self.pieces[k + 1]
            for cand in self._candidates(msg, contents[msg]):
                end = pos + len(cand)
                if text.startswith(cand, pos) and text.startswith(after, end) and (k < n - 1 or end + len(after) == len(text)):
                    out.append((msg, pos, end))
                    pos = end + len(after)
                    break
            else:
                return None
        return out

    def spans(self, text: str, contents: list[str]) -> list[tuple[int, int, int]]:
        """(message index, start, end) character spans of each rendered content within text.

        Depth-first over each content's whitespace variants, backtracking when a later piece does
        not follow; a content that the template rewrote (no variant fits) takes the text up to the
        next fixed piece. Raises a RowError naming the message that cannot be placed."""
        if self.missing:
            i = self.missing[0]
            raise RowError("message_not_rendered", f"message {i} ({self.roles[i]}): the chat template leaves its content out")
        if not text.startswith(self.pieces[0]):
            raise RowError("template_mismatch", f"the rendering starts with {text[:40]!r}, the template's skeleton with {self.pieces[0][:40]!r}")
        greedy = self._greedy(text, contents)
        if greedy is not None:
            return greedy
        failed: set[tuple[int, int]] = set()
        deepest = [0, len(self.pieces[0])]

        def ends(k: int, pos: int) -> Iterator[int]:
            msg, after, last = self.order[k], self.pieces[k + 1], k == len(self.order) - 1
            fits = lambda end: text.startswith(after, end) and (not last or end + len(after) == len(text))
            for cand in self._candidates(msg, contents[msg]):
                if text.startswith(cand, pos) and fits(pos + len(cand)):
                    yield pos + len(cand)
            if last:
                if text.endswith(after) and len(text) - len(after) >= pos:
                    yield len(text) - len(after)
            elif after:
                at = text.find(after, pos)
                for _ in range(_REWRITE_TRIES):
                    if at < 0:
                        break
                    yield at
                    at = text.find(after, at + 1)

        def walk(k: int, pos: int) -> list[tuple[int, int, int]] | None:
            if k == len(self.order):
                return [] if pos == len(text) else None
            if (k, pos) in failed:
                return None
            if k > deepest[0]:
                deepest[:] = [k, pos]
            tried = set()
            for end in ends(k, pos):  # lazily: the fallbacks are searched only when the variants fail
                if end in tried:
                    continue
                tried.add(end)
                rest = walk(k + 1, end + len(self.pieces[k + 1]))
                if rest is not None:
                    return [(self.order[k], pos, end), *rest]
            failed.add((k, pos))
            return None

        try:
            found = walk(0, len(self.pieces[0]))
        except RecursionError:
            raise RowError("too_many_turns", f"{len(self.order)} messages") from None
        if found is None:
            k, pos = deepest
            k = min(k, len(self.order) - 1)
            msg = self.order[k]
            raise RowError(
                "template_mismatch",
                f"message {msg} ({self.roles[msg]}): the template altered it: the rendering has {text[pos : pos + 60]!r} "
                f"where the content {contents[msg][:40]!r} then {self.pieces[k + 1][:30]!r} should be",
            )
        return found


def token_range(enc: Any, start: int, end: int) -> tuple[int, int] | None:
    """[first, last] tokens overlapping chars [start, end); None when none (content normalised away)."""
    first = enc.char_to_token(start)  # the common case at once; else the first char that has a token
    if first is None:
        first = next((t for c in range(start + 1, end) if (t := enc.char_to_token(c)) is not None), None)
        if first is None:
            return None
    last = enc.char_to_token(end - 1)
    if last is None:
        last = next(t for c in range(end - 2, start - 1, -1) if (t := enc.char_to_token(c)) is not None)
    # Several tokens can share one char (byte fallback): widen to all that overlap.
    while first > 0 and enc.token_to_chars(first - 1)[1] > start:
        first -= 1
    n = len(enc)
    while last + 1 < n and enc.token_to_chars(last + 1)[0] < end:
        last += 1
    return first, last


def prints_contents_verbatim(source: str) -> bool:
    """Whether a chat template uses message contents only by printing them, whole or trimmed: every
    ``x['content']`` / ``x.content`` (and every variable assigned from one) is printed, concatenated
    (``+``, ``~``) or trimmed, never tested, compared, measured, split or passed to a call. Then a
    rendering is the skeleton's fixed pieces with the contents put between them (docs/performance.md);
    any other use (a template that branches on, rewrites or JSON-encodes contents) renders with Jinja."""
    from jinja2 import Environment, nodes

    try:
        tree = Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except Exception:
        return False
    if "tojson" in source:  # whole messages serialised: contents escaped
        return False
    if any(n.attr in ("items", "values") for n in tree.find_all(nodes.Getattr)):  # contents reached by iteration
        return False
    parents: dict[int, nodes.Node] = {}
    stack: list[nodes.Node] = [tree]
    while stack:
        node = stack.pop()
        for child in node.iter_child_nodes():
            parents[id(child)] = node
            stack.append(child)

    def printed(node: nodes.Node, names: set[str]) -> bool:
        while True:
            parent = parents.get(id(node))
            if isinstance(parent, nodes.Output):
                return True
            if isinstance(parent, (nodes.Add, nodes.Concat)) or (
                isinstance(parent, nodes.Filter) and parent.name == "trim" and parent.node is node and not parent.args
            ):
                node = parent
                continue
            if isinstance(parent, nodes.Assign) and parent.node is node and isinstance(parent.target, nodes.Name):
                names.add(parent.target.name)
                return True
            return False

    def is_content(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Getattr):
            return node.attr == "content"
        return isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"

    names: set[str] = set()
    if not all(printed(n, names) for n in tree.find_all((nodes.Getattr, nodes.Getitem)) if is_content(n)):
        return False
    checked: set[str] = set()
    while names - checked:
        name = (names - checked).pop()
        checked.add(name)
        loads = [n for n in tree.find_all(nodes.Name) if n.name == name and n.ctx == "load"]
        if not all(printed(n, names) for n in loads):
            return False
    return True


def substitute(skeleton: Skeleton, contents: list[str]) -> tuple[str, list[tuple[int, int, int]]] | None:
    """The rendering as the skeleton's pieces with the contents between them, and each content's span;
    None where that is not provably the template's text: a content left out, or outer whitespace the
    template would strip (the whitespace probe) on a content that has some."""
    if skeleton.missing:
        return None
    out, spans, pos = [skeleton.pieces[0]], [], len(skeleton.pieces[0])
    for k, msg in enumerate(skeleton.order):
        content = contents[msg]
        lead, trail = skeleton.strip[msg]
        if (lead and content[:1].isspace()) or (trail and content[-1:].isspace()):
            return None
        spans.append((msg, pos, pos + len(content)))
        after = skeleton.pieces[k + 1]
        out += (content, after)
        pos += len(content) + len(after)
    return "".join(out), spans
