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

import datetime as _dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, RowError
from ..schema import COMPLETION, PROMPT, REASONING, TEMPLATE
from ..tokenizer import special_ids, with_chat_template
from .encoded import EncodedBatch, truncate
from .formats import Conversation, load_tools_file, reasoning_of
from .limits import render_chat_template
from .skeleton import Skeleton, fixed_clock, prints_contents_verbatim, substitute, token_range

PLAIN_SEPARATOR = "\n"  # between turns when no chat template is used (a template token)
_SKELETON_CACHE = 4096  # role patterns (x tool lists) kept
_CHECK_EVERY = 64  # one row in this many (seeded by its index) of a fast-rendered pattern is also rendered by Jinja


@dataclass
class _Layout:
    """One example's rendered text and where its messages are in it (character spans)."""

    text: str
    spans: list[tuple[int, int, int]]  # (message, start, end) of located contents
    turns: list[tuple[int, int, int, tuple[int, int] | None]] | None = None  # (message, start, end, reasoning span):
    # a trained turn as the model generates it (tool calls, reasoning, closing tokens); None: one-render path
    reasoning: list[tuple[int, int]] = field(default_factory=list)  # one-render path: inline <think> spans of trained turns


@dataclass
class _Job:
    """One chunk between render and finish: what the tokenizer call needs, and what finish needs after."""

    convs: list  # (index, file, row, Conversation) of the rows still alive
    dropped: list[tuple[int, str, int, RowError]]
    rendered: list  # chat: list[_Layout] or RowError per conv; plain: unused
    texts: list[str]  # what goes to the tokenizer
    renders: Counter = field(default_factory=Counter)  # this chunk's part of Encoder.renders


class Encoder:
    """Encodes conversations for one tokenizer and config; stateless across batches except caches."""

    def __init__(self, tok: Any, cfg: DataConfig):
        tok = with_chat_template(tok, cfg.chat_template_file)
        has_template = isinstance(getattr(tok, "chat_template", None), str)
        if cfg.chat_template and not has_template:
            raise ConfigError(f"{cfg.tokenizer}: --chat-template was asked for but the tokenizer has none")
        self.tok = tok  # with the run's chat template: fingerprint this one
        self.cfg = cfg
        self.chat = has_template if cfg.chat_template is None else bool(cfg.chat_template)
        self.day = _dt.date.fromisoformat(cfg.date)
        self.backend = tok.backend_tokenizer
        special = np.array(sorted(special_ids(tok)), np.int64)
        self.is_special = np.zeros(max(len(tok), int(special.max(initial=0)) + 1), bool)  # id -> bool lookup
        self.is_special[special] = True
        self._skeletons: dict[tuple, Skeleton] = {}
        # Fast rendering (docs/performance.md): per role pattern, True once its first row rendered the
        # same both ways, False after any mismatch (Jinja from then on).
        self.fast = has_template and self.chat and prints_contents_verbatim(tok.chat_template)
        self._fast_ok: dict[tuple, bool] = {}
        self.renders: Counter = Counter()  # fast, checked, mismatch, jinja: reported in run.json
        if cfg.tools:
            load_tools_file(cfg.tools)  # a bad --tools file fails here, before any row
        if self.chat:
            with fixed_clock(self.day):
                probe = tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ strftime_now('%Y-%m-%d') }}", tokenize=False)
            if probe != cfg.date:
                raise ConfigError(f"this transformers version's template clock cannot be fixed (got {probe!r}); --date would not hold")
        if not self.chat:
            if tok.eos_token_id is None:
                raise ConfigError(f"{cfg.tokenizer}: plain (no chat template) rendering needs an EOS token")
            probe_ids = self.backend.encode("a", add_special_tokens=True).ids
            self.bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe_ids[:1] == [tok.bos_token_id] else []

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
        rendered: list[list[_Layout] | RowError] = []
        before = self.renders.copy()
        with fixed_clock(self.day):
            for index, _, _, conv in convs:
                try:
                    rendered.append(self._render(conv, index))
                except RowError as e:
                    rendered.append(e)
        texts = [layout.text for r in rendered if not isinstance(r, RowError) for layout in r]
        return _Job(convs, dropped, rendered, texts, self.renders - before)

    def tokenize(self, job: _Job) -> list[Any]:
        """The Rust tokenizer call; it releases the GIL, so it can overlap Python work in a thread."""
        return self.backend.encode_batch(job.texts, add_special_tokens=False)

    def finish(self, job: _Job, encodings: list[Any]) -> EncodedBatch:
        """Masks, truncation and drops from the tokenizer's output."""
        examples = self._chat_masks(job, encodings) if self.chat else [[e] for e in self._assemble_plain(job.convs, encodings)]
        dropped, kept, truncated = list(job.dropped), [], 0
        for (index, file, row, _), per_row in zip(job.convs, examples):
            if isinstance(per_row, RowError):
                dropped.append((index, file, row, per_row))
                continue
            try:
                cut = [truncate(ids, cats, self.cfg.max_length, self.cfg.truncation, w) for ids, cats, w in per_row]
            except RowError as e:
                dropped.append((index, file, row, e))
                continue
            for (ids, _, _), (t_ids, t_cats, t_w) in zip(per_row, cut):
                truncated += len(t_ids) < len(ids)
                kept.append((index, t_ids, t_cats, t_w))
        dropped.sort(key=lambda d: d[0])
        batch = EncodedBatch.from_examples(kept, dropped, truncated)
        batch.renders = dict(job.renders)
        return batch

    # -- chat templates -------------------------------------------------------------------------

    def _apply(self, messages: list[dict[str, Any]], tools: Any = None, generation: bool = False) -> str:
        return render_chat_template(self.tok, messages, self.cfg, tools=tools, add_generation_prompt=generation)

    @staticmethod
    def _key(conv: Conversation) -> tuple:
        # Empty contents render as they are; a tool list is part of the fixed text.
        tools = None if conv.tools is None else json.dumps(conv.tools, sort_keys=True)
        return (tools, *((m["role"], not m["content"]) for m in conv.messages))

    def _skeleton(self, conv: Conversation, key: tuple | None = None) -> Skeleton:
        key = self._key(conv) if key is None else key
        if key not in self._skeletons:
            if len(self._skeletons) > _SKELETON_CACHE:  # rows with tools of their own: bounded
                self._skeletons.clear()
            self._skeletons[key] = Skeleton(lambda ms: self._apply(ms, conv.tools), list(conv.messages))
        return self._skeletons[key]

    def _render(self, conv: Conversation, index: int = 0) -> list[_Layout]:
        try:
            plain = conv.is_plain
            if plain and conv.tools is None and self.fast:
                try:
                    layout = self._render_fast(conv, index)
                except Exception:  # the Jinja path below fails the same way, with its own message
                    layout = None
                if layout is not None:
                    return [layout]
            if plain:
                self.renders["jinja"] += 1
                text = self._apply(list(conv.messages), conv.tools)
                skeleton = self._skeleton(conv)
                return [_Layout(text, skeleton.spans(text, [m["content"] for m in conv.messages]))]
            return self._render_inline(conv) or self._render_turns(conv)
        except RowError:
            raise
        except Exception as e:  # a template's raise_exception(), a jinja error
            raise RowError("template_error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    def _render_fast(self, conv: Conversation, index: int) -> _Layout | None:
        """The skeleton's pieces with the contents between them: the same text as Jinja for a template
        that prints contents verbatim (prints_contents_verbatim), checked against Jinja on every role
        pattern's first row, on one row in _CHECK_EVERY (seeded by the row index) and on every row with
        --check-render; a mismatch renders that row, and its pattern from then on, with Jinja. None: Jinja."""
        key = self._key(conv)
        if self._fast_ok.get(key) is False:
            return None
        contents = [m["content"] for m in conv.messages]
        made = substitute(self._skeleton(conv, key), contents)
        if made is None:
            return None
        text, spans = made
        if len(text) > 2 * sum(map(len, contents)) + self.cfg.field_chars_limit():
            return None  # over the render size limit: Jinja's render drops it as template_error
        check = self.cfg.check_render or key not in self._fast_ok or _sampled(index)
        if check:
            self.renders["checked"] += 1
            if self._apply(list(conv.messages), conv.tools) != text:
                self.renders["mismatch"] += 1
                self._fast_ok[key] = False
                return None
            self._fast_ok[key] = True
        self.renders["fast"] += 1
        return _Layout(text, spans)

    # -- reasoning and tools: each trained turn as the model generates it ---------------------------

    def _render_inline(self, conv: Conversation) -> list[_Layout] | None:
        """Inline <think> reasoning under a template that renders every trained content as it is: the
        one-render path, with each trained turn's reasoning located inside its content. None when a
        message is structured (a reasoning field, tool calls) or a trained turn's reasoning is not in its
        rendered content (the template drops it)."""
        msgs = list(conv.messages)
        if any(len(m) > 2 or not isinstance(m["content"], str) for m in msgs):
            return None
        text = self._apply(msgs, conv.tools)
        try:
            spans = Skeleton(lambda ms: self._apply(ms, conv.tools), msgs).spans(text, [m["content"] for m in msgs])
        except RowError:
            return None
        reasoning = []
        for msg, a, b in spans:
            if not conv.trained[msg] or (r := reasoning_of(msgs[msg])) is None:
                continue
            at = text.find(r.strip(), a, b) if r.strip() else -1
            if at < 0:
                return None  # the template dropped (or rewrote) this turn's reasoning
            reasoning.append((at, at + len(r.strip())))
        return [_Layout(text, spans, reasoning=reasoning)]

    def _render_turns(self, conv: Conversation) -> list[_Layout]:
        """Conversations with reasoning, tool calls or tools (docs/chat.md). A trained turn k is the text
        the template adds for message k after rendering messages[:k] with the generation prompt. When
        the whole conversation's rendering holds every trained turn that way, it is one example;
        otherwise (a template that drops earlier turns' reasoning) one example per trained turn, or only
        the last (--reasoning-turns)."""
        msgs, tools = list(conv.messages), conv.tools
        trained = [k for k, t in enumerate(conv.trained) if t]
        full = self._apply(msgs, tools)
        turns = []
        for k in trained:
            upto = self._apply(msgs[: k + 1], tools)
            start = self._turn_start(self._apply(msgs[:k], tools, True), upto, msgs[k])
            if start is None or not full.startswith(upto):
                break
            turns.append((k, start, len(upto), self._reasoning_span(full, start, len(upto), msgs[k])))
        else:
            return [_Layout(full, self._prompt_spans(conv, full, tools, set(trained)), turns)]
        chosen = trained if self.cfg.reasoning_turns == "per-turn" else trained[-1:]
        return [self._generated_turn(conv, k) for k in chosen]

    @staticmethod
    def _turn_start(prompt: str, upto: str, message: dict[str, Any]) -> int | None:
        """Where turn k starts in the rendering of messages[:k+1], or None when that rendering does not
        hold the turn as generated after ``prompt`` (the rendering with the generation prompt). Some
        templates close the previous message differently when a generation prompt follows (Hermes-3
        after a tool result): the turn then starts after the generation prompt's own scaffolding."""
        if upto.startswith(prompt):
            return len(prompt)
        common = len(_common_prefix(prompt, upto))
        opened = prompt[common:]
        at = upto.find(opened, common) if opened.strip() else -1  # whitespace alone could match anywhere
        if at < 0:
            return None
        reasoning = reasoning_of(message)
        if reasoning is not None and reasoning.strip() not in upto[at:]:
            return None
        return at + len(opened)

    def _generated_turn(self, conv: Conversation, k: int) -> _Layout:
        """One example for trained turn k: messages[:k] as the template renders them, then turn k as
        the model generates it; earlier assistant turns are context (prompt)."""
        msgs, tools = list(conv.messages), conv.tools
        prompt, upto = self._apply(msgs[:k], tools, True), self._apply(msgs[: k + 1], tools)
        start = self._turn_start(prompt, upto, msgs[k])
        reasoning = (reasoning_of(msgs[k]) or "").strip()
        if reasoning and reasoning not in upto and reasoning not in (msgs[k].get("content") or ""):
            raise _not_rendered()  # a reasoning field the template never renders
        if start is not None:
            turn = (k, start, len(upto), self._reasoning_span(upto, start, len(upto), msgs[k]))
            return _Layout(upto, self._prompt_spans(conv, upto, tools, {k}, upto=k + 1), [turn])
        # The template rewrote the turn (e.g. dropped its reasoning): the generation prompt, then the
        # message as the data has it (less what the prompt already opened), closed as the template closes it.
        common = len(_common_prefix(prompt, upto))
        opened, rendered = prompt[common:], upto[common:]
        raw = msgs[k].get("content") or ""
        answer = raw.split("</think>")[-1]
        shown = next((a for a in dict.fromkeys((answer, answer.lstrip(), answer.strip())) if rendered.startswith(a)), None)
        if shown is None or not raw.startswith(opened):
            raise RowError(
                "template_mismatch",
                f"message {k} (assistant): the template renders it as {rendered[:50]!r}, not as a generation "
                f"after its prompt's {opened[:30]!r}",
            )
        text = prompt + raw[len(opened) :] + rendered[len(shown) :]
        turn = (k, len(prompt), len(text), self._reasoning_span(text, len(prompt), len(text), msgs[k]))
        return _Layout(text, self._prompt_spans(conv, prompt, tools, {k}, upto=k, generation=True), [turn])

    def _reasoning_span(self, text: str, start: int, end: int, message: dict[str, Any]) -> tuple[int, int] | None:
        reasoning = reasoning_of(message)
        if reasoning is None:
            return None
        at = text.find(reasoning.strip(), start, end)
        if at < 0 or not reasoning.strip():
            raise _not_rendered()
        return at, at + len(reasoning.strip())

    def _prompt_spans(
        self, conv: Conversation, text: str, tools: Any, trained: set[int], *, upto: int | None = None, generation: bool = False
    ) -> list[tuple[int, int, int]]:
        """Spans of the untrained text contents (user, system, tool results, context turns) in the first
        part of text that renders messages[:upto]; trained turns stay fixed (located by _turn_start), and
        a context turn's tool calls are scaffolding. A content the template rewrote (an earlier turn's
        reasoning dropped) is the text the template put in its place."""
        msgs = list(conv.messages[:upto])
        skeleton = Skeleton(lambda ms: self._apply(ms, tools, generation), msgs, frozenset(trained))
        head = self._apply(msgs, tools, generation)
        if not text.startswith(head):
            raise RowError("template_mismatch", "the rendering of the earlier messages is not a prefix of the example")
        return skeleton.spans(head, [m["content"] or "" for m in msgs])

    def _chat_masks(self, job: _Job, encodings: list[Any]) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] | RowError]:
        it = iter(encodings)
        return [
            r if isinstance(r, RowError) else [self._masks(next(it), layout, conv) for layout in r]
            for (*_, conv), r in zip(job.convs, job.rendered)
        ]

    def _masks(self, enc: Any, layout: _Layout, conv: Conversation) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        ids = np.asarray(enc.ids, dtype=np.int32)
        cats = np.zeros(len(ids), np.uint8)
        weights = None if conv.weights is None else np.ones(len(ids), np.float32)
        ranges = [(msg, r) for msg, a, b in layout.spans if b > a and (r := token_range(enc, a, b)) is not None]
        in_turns = {t[0] for t in layout.turns} if layout.turns else ()
        for k, (msg, (first, last)) in enumerate(ranges):
            if msg in in_turns:
                continue
            trained = conv.trained[msg] and layout.turns is None
            cats[first : last + 1] = COMPLETION if trained else PROMPT
            end = last + 1
            if trained and self.cfg.end_of_turn != "none":
                limit = ranges[k + 1][1][0] if k + 1 < len(ranges) else len(ids)
                at = int(self.is_special[ids[last + 1 : limit]].argmax()) if limit > last + 1 else 0
                if limit > last + 1 and self.is_special[ids[last + 1 + at]]:  # argmax: the first special token
                    eot = last + 1 + at
                    start = last + 1 if self.cfg.end_of_turn == "eot+separator" else eot
                    cats[start : eot + 1] = COMPLETION
                    end = eot + 1
            if weights is not None:
                weights[first:end] = conv.weights[msg]
        for msg, a, b, reasoning in layout.turns or ():
            span = token_range(enc, a, b)
            if span is None:
                continue
            first, last = span
            special = np.flatnonzero(self.is_special[ids[first : last + 1]])
            if len(special):  # the closing token ends the turn; what follows it is scaffolding
                last = first + int(special[-1]) - (self.cfg.end_of_turn == "none")
            cats[first : last + 1] = COMPLETION
            if reasoning is not None and (r := token_range(enc, *reasoning)) is not None:
                cats[r[0] : r[1] + 1] = REASONING
        for a, b in layout.reasoning:
            if (r := token_range(enc, a, b)) is not None:
                cats[r[0] : r[1] + 1] = np.where(cats[r[0] : r[1] + 1] == COMPLETION, REASONING, cats[r[0] : r[1] + 1])
            if weights is not None:
                weights[first : last + 1] = conv.weights[msg]
        return ids, cats, weights

    # -- plain text (no chat template) ----------------------------------------------------------

    def _plain_pieces(self, convs: list) -> list[str]:
        """Turns are tokenized separately and joined: prompt, separator, completion, EOS."""
        pieces: list[str] = []
        for *_, conv in convs:
            for k, m in enumerate(conv.messages):
                pieces.extend(([PLAIN_SEPARATOR] if k else []) + [m["content"]])
        return pieces

    def _assemble_plain(self, convs: list, encodings: list[Any]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        encoded = iter(e.ids for e in encodings)
        eos = self.tok.eos_token_id
        out = []
        for *_, conv in convs:
            ids: list[int] = list(self.bos)
            cats: list[int] = [TEMPLATE] * len(self.bos)
            weights: list[float] = [1.0] * len(self.bos)
            for k, trained in enumerate(conv.trained):
                w = conv.weights[k] if conv.weights is not None else 1.0
                if k:
                    sep = next(encoded)
                    ids += sep
                    cats += [TEMPLATE] * len(sep)
                    weights += [1.0] * len(sep)
                content = next(encoded)
                ids += content
                cats += [COMPLETION if trained else PROMPT] * len(content)
                weights += [w] * len(content)
                if trained:
                    ids.append(eos)
                    cats.append(TEMPLATE if self.cfg.end_of_turn == "none" else COMPLETION)
                    weights.append(w if self.cfg.end_of_turn != "none" else 1.0)
            w_arr = None if conv.weights is None else np.asarray(weights, np.float32)
            out.append((np.asarray(ids, np.int32), np.asarray(cats, np.uint8), w_arr))
        return out


def _sampled(index: int) -> bool:
    """One row in _CHECK_EVERY, chosen by a hash of its index: the same rows whatever the batching."""
    return (index * 0x9E3779B1 >> 7) % _CHECK_EVERY == 0


def _not_rendered() -> RowError:
    return RowError("reasoning_not_rendered", "the chat template does not render this message's reasoning "
                    "(give one that does: --chat-template-file)")


def _common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]
