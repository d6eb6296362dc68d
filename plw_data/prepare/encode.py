"""Render, tokenize and mask: conversations become token ids with one category per token.

Chat formats go through the tokenizer's own chat template, so ids equal
`tokenizer.apply_chat_template(messages, tokenize=True)`. Masks do not depend on `{% generation %}`
markers: the template is rendered once per role sequence with placeholder contents (the skeleton),
the real rendering is matched against the skeleton to find each message's character span, and the
Rust tokenizer's char->token map turns spans into token ranges. A token overlapping a message's
content belongs to it; everything else the template added is template. User text that looks like a
role header or a special token stays inside its message's span, so it can never be mistaken for
scaffolding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, RowError
from ..schema import COMPLETION, PROMPT, REASONING, TEMPLATE
from ..tokenizer import special_ids
from .formats import RESERVED, Conversation

PLAIN_SEPARATOR = "\n"  # between turns when no chat template is used (a template token)
_PLACEHOLDER = re.compile(f"{RESERVED[0]}(\\d+){RESERVED[1]}")


@dataclass
class CountsBatch:
    """Per-example token counts by category: what rg-stats needs, from raw inputs or shards alike."""

    example_index: np.ndarray  # int64 [n]
    template: np.ndarray  # int64 [n]
    prompt: np.ndarray  # int64 [n]
    completion: np.ndarray  # int64 [n]
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class EncodedBatch:
    """Encoded examples of one chunk, flat: lengths split input_ids/category per example."""

    example_index: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]
    input_ids: np.ndarray  # int32 [sum(lengths)]
    category: np.ndarray  # uint8 [sum(lengths)]: TEMPLATE, PROMPT, COMPLETION or REASONING (schema codes)
    truncated: int = 0
    dropped: list[tuple[int, str, int, RowError]] = field(default_factory=list)  # (index, file, row, error)
    weight: np.ndarray | None = None  # float32 [sum(lengths)]: per-message weight multipliers; None: all 1
    source: np.ndarray | None = None  # int16 [n]: source of each example in a mixture; None: one source

    def counts(self) -> CountsBatch:
        dropped: dict[str, int] = {}
        for *_, err in self.dropped:
            dropped[err.reason] = dropped.get(err.reason, 0) + 1
        if not len(self.lengths):
            empty = np.zeros(0, np.int64)
            return CountsBatch(self.example_index, empty, empty, empty, dropped)
        starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        completion = (self.category == COMPLETION) | (self.category == REASONING)
        per = [np.add.reduceat(m.astype(np.int64), starts) for m in (self.category == TEMPLATE, self.category == PROMPT, completion)]
        return CountsBatch(self.example_index, *per, dropped)

    @staticmethod
    def from_examples(
        kept: list[tuple[int, np.ndarray, np.ndarray]], dropped: list[tuple[int, str, int, RowError]], truncated: int
    ) -> EncodedBatch:
        if not kept:
            return EncodedBatch(
                np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8), truncated, dropped
            )
        return EncodedBatch(
            np.fromiter((k[0] for k in kept), np.int64, len(kept)),
            np.fromiter((len(k[1]) for k in kept), np.int64, len(kept)),
            np.concatenate([k[1] for k in kept]),
            np.concatenate([k[2] for k in kept]),
            truncated,
            dropped,
        )


def truncate(ids: np.ndarray, cats: np.ndarray, max_length: int, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Fit an example into max_length by removing prompt tokens only; the completion is kept whole."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, cats
    if policy == "drop":
        raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
    prompt_pos = np.flatnonzero(cats == PROMPT)
    if len(prompt_pos) < excess:
        raise RowError(
            "completion_too_long",
            f"{len(ids)} tokens; without any prompt still {len(ids) - len(prompt_pos)} > max_length {max_length}",
        )
    cut = prompt_pos[:excess] if policy == "left" else prompt_pos[len(prompt_pos) - excess :]
    keep = np.ones(len(ids), bool)
    keep[cut] = False
    return ids[keep], cats[keep]


class _Skeleton:
    """A template rendered with placeholder contents: the fixed text between message contents."""

    def __init__(self, tok: Any, roles: tuple[str, ...]):
        msgs = [{"role": r, "content": f"{RESERVED[0]}{i}{RESERVED[1]}"} for i, r in enumerate(roles)]
        text = tok.apply_chat_template(msgs, tokenize=False)
        parts = _PLACEHOLDER.split(text)
        self.pieces: list[str] = parts[0::2]
        self.order: list[int] = [int(i) for i in parts[1::2]]
        if len(set(self.order)) != len(self.order) or self.order != sorted(self.order):
            raise ConfigError(f"chat template renders messages out of order or twice (roles {roles}); masks would be ambiguous")

    def spans(self, text: str, contents: list[str]) -> list[tuple[int, int, int]]:
        """(message index, start, end) character spans of each rendered content within text."""
        pos = len(self.pieces[0])
        if not text.startswith(self.pieces[0]):
            raise RowError("template_mismatch", "the rendering does not start like the template's skeleton")
        out = []
        for k, msg in enumerate(self.order):
            after = self.pieces[k + 1]
            last = k == len(self.order) - 1
            content = contents[msg]
            for cand in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
                end = pos + len(cand)
                if text.startswith(cand, pos) and text.startswith(after, end) and (not last or end + len(after) == len(text)):
                    out.append((msg, pos, end))
                    pos = end + len(after)
                    break
            else:
                raise RowError("template_mismatch", f"cannot locate message {msg}'s content in the rendered template")
        return out


def _token_range(enc: Any, start: int, end: int) -> tuple[int, int] | None:
    """[first, last] tokens overlapping chars [start, end); None when none (content normalised away)."""
    first = next((t for c in range(start, end) if (t := enc.char_to_token(c)) is not None), None)
    if first is None:
        return None
    last = next(t for c in range(end - 1, start - 1, -1) if (t := enc.char_to_token(c)) is not None)
    # Several tokens can share one char (byte fallback): widen to all that overlap.
    while first > 0 and enc.token_to_chars(first - 1)[1] > start:
        first -= 1
    n = len(enc)
    while last + 1 < n and enc.token_to_chars(last + 1)[0] < end:
        last += 1
    return first, last


@dataclass
class _Job:
    """One chunk between render and finish: what the tokenizer call needs, and what finish needs after."""

    convs: list  # (index, file, row, Conversation) of the rows still alive
    dropped: list[tuple[int, str, int, RowError]]
    rendered: list  # chat: (text, spans) or RowError per conv; plain: unused
    texts: list[str]  # what goes to the tokenizer


class Encoder:
    """Encodes conversations for one tokenizer and config; stateless across batches except caches."""

    def __init__(self, tok: Any, cfg: DataConfig):
        has_template = isinstance(getattr(tok, "chat_template", None), str)
        if cfg.chat_template and not has_template:
            raise ConfigError(f"{cfg.tokenizer}: --chat-template was asked for but the tokenizer has none")
        self.tok = tok
        self.cfg = cfg
        self.chat = has_template if cfg.chat_template is None else cfg.chat_template
        self.backend = tok.backend_tokenizer
        special = np.array(sorted(special_ids(tok)), np.int64)
        self.is_special = np.zeros(max(len(tok), int(special.max(initial=0)) + 1), bool)  # id -> bool lookup
        self.is_special[special] = True
        self._skeletons: dict[tuple[str, ...], _Skeleton] = {}
        if not self.chat:
            if tok.eos_token_id is None:
                raise ConfigError(f"{cfg.tokenizer}: plain (no chat template) rendering needs an EOS token")
            probe = self.backend.encode("a", add_special_tokens=True).ids
            self.bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else []

    def encode(self, items: list[tuple[int, str, int, Conversation | RowError]]) -> EncodedBatch:
        """items: (global index, file, row, conversation or the error that already drops it)."""
        job = self.render(items)
        return self.finish(job, self.tokenize(job))

    def render(self, items: list[tuple[int, str, int, Conversation | RowError]]) -> _Job:
        """The Python work before the tokenizer call: rendered texts (chat) or turn pieces (plain)."""
        dropped = [(i, f, r, c) for i, f, r, c in items if isinstance(c, RowError)]
        convs = [(i, f, r, c) for i, f, r, c in items if not isinstance(c, RowError)]
        if not self.chat:
            return _Job(convs, dropped, [], self._plain_pieces(convs))
        rendered = []
        for *_, conv in convs:
            try:
                rendered.append(self._render(conv))
            except RowError as e:
                rendered.append(e)
        return _Job(convs, dropped, rendered, [r[0] for r in rendered if not isinstance(r, RowError)])

    def tokenize(self, job: _Job) -> list[Any]:
        """The Rust tokenizer call; it releases the GIL, so it can overlap Python work in a thread."""
        return self.backend.encode_batch(job.texts, add_special_tokens=False)

    def finish(self, job: _Job, encodings: list[Any]) -> EncodedBatch:
        """Masks, truncation and drops from the tokenizer's output."""
        examples = self._chat_masks(job, encodings) if self.chat else self._assemble_plain(job.convs, encodings)
        dropped, kept, truncated = list(job.dropped), [], 0
        for (index, file, row, _), example in zip(job.convs, examples):
            if isinstance(example, RowError):
                dropped.append((index, file, row, example))
                continue
            ids, cats = example
            try:
                t_ids, t_cats = truncate(ids, cats, self.cfg.max_length, self.cfg.truncation)
            except RowError as e:
                dropped.append((index, file, row, e))
                continue
            truncated += len(t_ids) < len(ids)
            kept.append((index, t_ids, t_cats))
        dropped.sort(key=lambda d: d[0])
        return EncodedBatch.from_examples(kept, dropped, truncated)

    # -- chat templates -------------------------------------------------------------------------

    def _skeleton(self, roles: tuple[str, ...]) -> _Skeleton:
        if roles not in self._skeletons:
            self._skeletons[roles] = _Skeleton(self.tok, roles)
        return self._skeletons[roles]

    def _render(self, conv: Conversation) -> tuple[str, list[tuple[int, int, int]]]:
        try:
            text = self.tok.apply_chat_template(list(conv.messages), tokenize=False)
            skeleton = self._skeleton(conv.roles)
        except RowError:
            raise
        except Exception as e:  # a template's raise_exception(), a jinja error
            raise RowError("template_error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        return text, skeleton.spans(text, [m["content"] for m in conv.messages])

    def _chat_masks(self, job: _Job, encodings: list[Any]) -> list[tuple[np.ndarray, np.ndarray] | RowError]:
        it = iter(encodings)
        return [r if isinstance(r, RowError) else self._masks(next(it), r[1], conv) for (*_, conv), r in zip(job.convs, job.rendered)]

    def _masks(self, enc: Any, spans: list[tuple[int, int, int]], conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(enc.ids, dtype=np.int32)
        cats = np.zeros(len(ids), np.uint8)
        ranges = [(msg, _token_range(enc, a, b)) for msg, a, b in spans if b > a]
        ranges = [(msg, r) for msg, r in ranges if r is not None]
        for k, (msg, (first, last)) in enumerate(ranges):
            trained = conv.trained[msg]
            cats[first : last + 1] = COMPLETION if trained else PROMPT
            if not trained or self.cfg.end_of_turn == "none":
                continue
            limit = ranges[k + 1][1][0] if k + 1 < len(ranges) else len(ids)
            is_special = self.is_special[ids[last + 1 : limit]]
            if is_special.any():
                eot = last + 1 + int(is_special.argmax())
                start = last + 1 if self.cfg.end_of_turn == "eot+separator" else eot
                cats[start : eot + 1] = COMPLETION
        return ids, cats

    # -- plain text (no chat template) ----------------------------------------------------------

    def _plain_pieces(self, convs: list) -> list[str]:
        """Turns are tokenized separately and joined: prompt, separator, completion, EOS."""
        pieces: list[str] = []
        for *_, conv in convs:
            for k, m in enumerate(conv.messages):
                pieces.extend(([PLAIN_SEPARATOR] if k else []) + [m["content"]])
        return pieces

    def _assemble_plain(self, convs: list, encodings: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        encoded = iter(e.ids for e in encodings)
        eos = self.tok.eos_token_id
        out = []
        for *_, conv in convs:
            ids: list[int] = list(self.bos)
            cats: list[int] = [TEMPLATE] * len(self.bos)
            for k, trained in enumerate(conv.trained):
                if k:
                    sep = next(encoded)
                    ids += sep
                    cats += [TEMPLATE] * len(sep)
                content = next(encoded)
                ids += content
                cats += [COMPLETION if trained else PROMPT] * len(content)
                if trained:
                    ids.append(eos)
                    cats.append(TEMPLATE if self.cfg.end_of_turn == "none" else COMPLETION)
            out.append((np.asarray(ids, np.int32), np.asarray(cats, np.uint8)))
        return out
