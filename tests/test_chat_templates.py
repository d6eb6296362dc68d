"""Today's chat data on real chat templates: reasoning, tool calls, a template override, a fixed date,
and rows that templates rewrite (docs/chat.md)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tokenizer, require_shared, tokenizer_dir

from plw_data.config import DataConfig
from plw_data.errors import ConfigError, RowError
from plw_data.prepare.encode import Encoder
from plw_data.prepare.skeleton import fixed_clock
from plw_data.prepare.formats import to_conversation
from plw_data.prepare.pipeline import prepare
from plw_data.schema import COMPLETION, PROMPT, REASONING, TEMPLATE

R1 = "chat_templates/llama.cpp/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
HERMES3 = "chat_templates/llama.cpp/NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"
LLAMA32 = "chat_templates/llama.cpp/meta-llama-Llama-3.2-3B-Instruct.jinja"
GEMMA = "chat_templates/chujiezheng/gemma-it.jinja"
FALCON = "chat_templates/chujiezheng/falcon-instruct.jinja"
PHI35 = "chat_templates/llama.cpp/microsoft-Phi-3.5-mini-instruct.jinja"

# Written for this test (not a vendor's file): a Qwen3-style template that renders `reasoning_content`
# in <think> blocks only for assistant turns after the last user message, as Qwen3's own template does.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user and m.reasoning_content %}"
    "{{- '<think>\\n' + m.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]},
}}]  # fmt: skip


def encoder(template: str | None, tok_name: str = "qwen2.5-instruct", **kw) -> tuple[Encoder, DataConfig]:
    path = str(require_shared(template)) if template and template.endswith(".jinja") else template
    cfg = DataConfig(tokenizer=str(tokenizer_dir(tok_name)), format="messages", chat_template_file=path, max_length=100_000, **kw)
    cfg.validate()
    return Encoder(load_tokenizer(tok_name), cfg), cfg


def examples(enc: Encoder, cfg: DataConfig, row: dict):
    conv = to_conversation(row, cfg)
    batch = enc.encode([(0, "f", 0, conv)])
    assert not batch.dropped, batch.dropped[0][3].detail
    bounds = np.concatenate(([0], np.cumsum(batch.lengths)))
    weights = batch.weight
    return conv, [
        (batch.input_ids[a:b], batch.category[a:b], None if weights is None else weights[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
    ]


def runs(cats: np.ndarray, members: set[int]) -> list[tuple[int, int]]:
    on = np.concatenate(([0], np.isin(cats, list(members)).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(on))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def decoded(tok, ids: np.ndarray, cats: np.ndarray, members: set[int]) -> list[str]:
    return [tok.decode(ids[a:b].tolist()) for a, b in runs(cats, members)]


def reference(enc: Encoder, messages: list, tools=None, generation: bool = False) -> str:
    with fixed_clock(enc.day):
        return enc.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False)


def test_deepseek_r1_reasoning_one_example_per_trained_turn() -> None:
    enc, cfg = encoder(R1)
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nAdd the numbers.\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\nSix."},
    ]
    _, exs = examples(enc, cfg, {"messages": msgs})
    assert len(exs) == 2  # the template drops every turn's reasoning: one example per trained turn
    for (ids, cats, _), k, reasoning in zip(exs, (1, 3), ("Add the numbers.", "Add again.")):
        prompt = reference(enc, msgs[:k], generation=True)
        assert prompt.endswith("<｜Assistant｜><think>\n")
        generated = msgs[k]["content"][len("<think>\n") :] + "<｜end▁of▁sentence｜>"
        assert enc.tok.decode(ids.tolist()) == prompt + generated
        assert ids.tolist() == enc.tok(prompt + generated, add_special_tokens=False)["input_ids"]
        assert "".join(decoded(enc.tok, ids, cats, {COMPLETION, REASONING})) == generated
        assert [s.strip() for s in decoded(enc.tok, ids, cats, {REASONING})] == [reasoning]
        assert cats[0] == TEMPLATE and {PROMPT, COMPLETION, REASONING} <= set(np.unique(cats).tolist())
    last, *_ = examples(encoder(R1, reasoning_turns="last")[0], cfg, {"messages": msgs})[1]
    assert np.array_equal(last[0], exs[1][0])


def test_qwen3_style_reasoning_field(tmp_path: Path) -> None:
    template = tmp_path / "qwen3_like.jinja"
    template.write_text(QWEN3_LIKE)
    enc, cfg = encoder(str(template))
    one = [{"role": "user", "content": "Capital of France?"},
           {"role": "assistant", "content": "Paris.", "reasoning_content": "The capital of France is Paris."}]  # fmt: skip
    _, [(ids, cats, _)] = examples(enc, cfg, {"messages": one})
    assert ids.tolist() == enc.tok(reference(enc, one), add_special_tokens=False)["input_ids"]
    assert "".join(decoded(enc.tok, ids, cats, {COMPLETION, REASONING})) == (
        "<think>\nThe capital of France is Paris.\n</think>\n\nParis.<|im_end|>"
    )
    # a token may straddle a content's edge (".\n" is one token): it belongs to the content
    assert [s.strip() for s in decoded(enc.tok, ids, cats, {REASONING})] == ["The capital of France is Paris."]
    assert decoded(enc.tok, ids, cats, {PROMPT}) == ["Capital of France?"]
    # Two turns: the full rendering drops the first turn's reasoning, so each turn is its own example;
    # the last one is exactly the whole conversation.
    two = one + [{"role": "user", "content": "And of Italy?"},
                 {"role": "assistant", "content": "Rome.", "reasoning": "Italy's capital is Rome."}]  # fmt: skip
    _, exs = examples(enc, cfg, {"messages": two})
    assert len(exs) == 2
    assert np.array_equal(exs[0][0], ids)
    ids2, cats2, _ = exs[1]
    assert ids2.tolist() == enc.tok(reference(enc, two), add_special_tokens=False)["input_ids"]
    assert [s.strip() for s in decoded(enc.tok, ids2, cats2, {REASONING})] == ["Italy's capital is Rome."]
    assert decoded(enc.tok, ids2, cats2, {PROMPT}) == ["Capital of France?", "Paris.", "And of Italy?"]  # context


def test_hermes3_tool_calls_and_results() -> None:
    enc, cfg = encoder(HERMES3)
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_7", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]  # fmt: skip
    conv, [(ids, cats, _)] = examples(enc, cfg, {"messages": msgs, "tools": json.dumps(TOOLS)})
    assert conv.messages[1]["tool_calls"][0]["id"] == "call_7" and conv.messages[2]["tool_call_id"] == "call_7"
    ref = enc.tok.apply_chat_template(msgs, tools=TOOLS, tokenize=True, return_dict=False)
    assert ids.tolist() == list(ref)
    assert decoded(enc.tok, ids, cats, {COMPLETION}) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees.<|im_end|>",
    ]
    assert [s.strip() for s in decoded(enc.tok, ids, cats, {PROMPT})] == ["Weather in Paris?", '{"temp": 21}']
    # --tools FILE serves rows without their own list
    assert to_conversation({"messages": msgs}, DataConfig(format="messages")).tools is None


def test_tools_file_for_every_row(tmp_path: Path) -> None:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    cfg = DataConfig(format="messages", tools=str(path))
    assert to_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, cfg).tools == TOOLS
    with pytest.raises(RowError) as e:
        to_conversation({"messages": [], "tools": "{not json"}, cfg)
    assert (e.value.reason, e.value.field) == ("bad_tools", "tools")


class _Clock(dt.datetime):
    """A clock that advances an hour per reading, from 23:00: any run crosses midnight."""

    start = dt.datetime(2031, 5, 17, 23, 0)
    readings = 0

    @classmethod
    def now(cls, tz=None):
        cls.readings += 1
        return cls.start + dt.timedelta(hours=cls.readings)


def test_llama32_date_is_fixed_across_midnight(tmp_path: Path, monkeypatch) -> None:
    from transformers.utils import chat_template_utils as ctu

    monkeypatch.setattr(ctu, "datetime", _Clock)
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]} for i in range(12)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer("llama-3-instruct")
    assert "18 May 2031" in tok.apply_chat_template(rows[0]["messages"], chat_template=require_shared(LLAMA32).read_text(), tokenize=False)

    def run(name: str) -> dict[str, bytes]:
        cfg = DataConfig(tokenizer=str(tokenizer_dir("llama-3-instruct")), format="messages", batch_size=3,
                         chat_template_file=str(require_shared(LLAMA32)), date="2025-02-03")  # fmt: skip
        prepare([str(src)], cfg, tmp_path / name, progress=False)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).rglob("*")) if p.is_file() and p.name != "run.json"}

    first = run("a")
    _Clock.start = dt.datetime(2031, 12, 31, 23, 30)
    assert run("b") == first
    import datasets

    row = datasets.load_from_disk(str(tmp_path / "a" / "train"))[0]
    assert "Today Date: 03 Feb 2025" in tok.decode(row["input_ids"])
    manifest = json.loads(first["manifest.json"])
    assert manifest["config"]["date"] == "2025-02-03"
    assert manifest["tokenizer"]["chat_template_sha256"] == hashlib.sha256(require_shared(LLAMA32).read_bytes()).hexdigest()


def test_gemma_whitespace_separators_and_empty_system() -> None:
    # Phi-3's tokenizer writes each newline as its own byte token, so a newline on the wrong side of
    # the template's "\n\n" separator would show (45e00e8 made the system's newline prompt and the
    # user's template).
    enc, cfg = encoder(GEMMA, tok_name="phi-3-mini-instruct")
    msgs = [{"role": "system", "content": "S\n"}, {"role": "user", "content": "\nU"}, {"role": "assistant", "content": "A"}]
    _, [(ids, cats, _)] = examples(enc, cfg, {"messages": msgs})
    assert ids.tolist() == enc.tok(reference(enc, msgs), add_special_tokens=False)["input_ids"]
    tokens = enc.tok.convert_ids_to_tokens(ids.tolist())
    s = tokens.index("S")
    assert list(zip(tokens[s : s + 5], cats[s : s + 5].tolist())) == [
        ("S", PROMPT), ("<0x0A>", TEMPLATE), ("<0x0A>", TEMPLATE), ("<0x0A>", PROMPT), ("U", PROMPT),
    ]  # fmt: skip
    empty = [{"role": "system", "content": ""}, *msgs[1:]]
    _, [(ids, _, _)] = examples(enc, cfg, {"messages": empty})
    assert ids.tolist() == enc.tok(reference(enc, empty), add_special_tokens=False)["input_ids"]


def test_phi35_empty_system_prompt_is_kept() -> None:
    enc, cfg = encoder(PHI35, tok_name="phi-3-mini-instruct")
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}]
    _, [(ids, cats, _)] = examples(enc, cfg, {"messages": msgs})
    with fixed_clock(enc.day):
        ref = enc.tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert ids.tolist() == list(ref)
    assert decoded(enc.tok, ids, cats, {PROMPT}) == ["Q?"]


def test_falcon_rewritten_blank_lines_are_kept() -> None:
    enc, cfg = encoder(FALCON, tok_name="llama-3-instruct")
    msgs = [{"role": "user", "content": "para one\n\npara two"}, {"role": "assistant", "content": "ans one\n\nans two"}]
    _, [(ids, cats, _)] = examples(enc, cfg, {"messages": msgs})
    assert ids.tolist() == enc.tok(reference(enc, msgs), add_special_tokens=False)["input_ids"]
    assert [s.strip() for s in decoded(enc.tok, ids, cats, {PROMPT})] == ["para one\npara two"]  # as the template wrote it
    assert [s.strip() for s in decoded(enc.tok, ids, cats, {COMPLETION})] == ["ans one\nans two"]


def test_message_weights() -> None:
    enc, cfg = encoder(None, tok_name="qwen2.5-instruct")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
            {"role": "user", "content": "c", "weight": 0.25}, {"role": "assistant", "content": "d", "weight": 2.5}]  # fmt: skip
    conv, [(ids, cats, w)] = examples(enc, cfg, {"messages": msgs})
    assert conv.trained == (False, False, False, True)  # weight 0: context, not trained
    assert decoded(enc.tok, ids, cats, {PROMPT}) == ["a", "b", "c"]
    assert decoded(enc.tok, ids, cats, {COMPLETION}) == ["d<|im_end|>"]
    assert set(w[cats == COMPLETION].tolist()) == {2.5}
    assert w[cats == PROMPT].tolist() == [1.0, 0.0, 0.25]
    assert set(w[cats == TEMPLATE].tolist()) == {1.0}
    _, [(_, _, none)] = examples(enc, cfg, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    assert none is None
    for bad in (-1, float("nan"), "1", True):
        with pytest.raises(RowError) as e:
            to_conversation({"messages": [{"role": "user", "content": "a", "weight": bad}, {"role": "assistant", "content": "b"}]}, cfg)
        assert (e.value.reason, e.value.field) == ("bad_weight", "messages[0].weight")


def test_template_that_renders_no_row_is_a_config_error(tmp_path: Path) -> None:
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ raise_exception('no such role') }}")
    cfg = DataConfig(tokenizer=str(tokenizer_dir("qwen2.5-instruct")), format="messages", chat_template_file=str(bad))
    with pytest.raises(ConfigError, match=r"no row kept.*template_error: no such role"):
        prepare([str(src)], cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_chat_template_from_a_folder_and_recipe_string() -> None:
    folder = str(tokenizer_dir("llama-3-instruct"))
    cfg = DataConfig(chat_template=folder)  # a recipe's `chat_template: DIR`
    cfg.validate()
    assert (cfg.chat_template, cfg.chat_template_file) == (True, folder)
    enc = Encoder(load_tokenizer("qwen2.5-instruct"), cfg)
    assert enc.tok.chat_template == load_tokenizer("llama-3-instruct").chat_template
    assert load_tokenizer("qwen2.5-instruct").chat_template != enc.tok.chat_template  # the caller's is untouched
    with pytest.raises(ConfigError, match="--date"):
        DataConfig(date="01/02/2026").validate()


def test_inspect_colours_tool_calls(tmp_path: Path) -> None:
    from plw_data.prepare.inspect import STYLES, TOOL_CALL, render_row

    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": '{"temp": 21}'}, {"role": "assistant", "content": "Mild."}]  # fmt: skip
    src = tmp_path / "tools.jsonl"
    src.write_text(json.dumps({"messages": msgs, "tools": TOOLS}) + "\n")
    cfg = DataConfig(tokenizer=str(tokenizer_dir("qwen2.5-instruct")), format="messages", chat_template_file=str(require_shared(HERMES3)))
    prepare([str(src)], cfg, tmp_path / "out", progress=False)
    group = render_row(tmp_path / "out", "train", 0)
    body = group.renderables[2]
    styled = {str(body)[s.start : s.end]: s.style for s in body.spans}
    assert styled['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'] == STYLES[TOOL_CALL]
    assert styled["Mild.<|im_end|>"] == "bold green"


def test_inline_reasoning_under_a_template_that_keeps_it_is_one_exact_example() -> None:
    enc, cfg = encoder(None)  # qwen2.5's own template prints contents as they are
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4."},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nAgain.\n</think>\n\n6."}]  # fmt: skip
    _, [(ids, cats, _)] = examples(enc, cfg, {"messages": msgs})
    assert ids.tolist() == list(enc.tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    assert [s.strip() for s in decoded(enc.tok, ids, cats, {REASONING})] == ["Add.", "Again."]
    assert "".join(decoded(enc.tok, ids, cats, {COMPLETION, REASONING})) == (
        "<think>\nAdd.\n</think>\n\n4.<|im_end|><think>\nAgain.\n</think>\n\n6.<|im_end|>"
    )
    # a reasoning field the template ignores is never trained without it
    conv = to_conversation({"messages": [msgs[0], {"role": "assistant", "content": "4.", "thinking": "Add."}]}, cfg)
    (err,) = [d[3] for d in enc.encode([(0, "f", 0, conv)]).dropped]
    assert err.reason == "reasoning_not_rendered"


def test_reasoning_dataset_prepares_verifies_and_keeps_each_row_in_one_split(tmp_path: Path) -> None:
    """Multi-turn R1 conversations (earlier turns' reasoning dropped by the template): one example per
    trained turn, reasoning_mask on disk, every row's examples in one split, and `verify` passes."""
    import datasets

    from plw_data import schema as S
    from plw_data.batch.collate import PLWCollator
    from plw_data.prepare.verify import verify

    rows = []
    for k in range(12):
        rows.append({"messages": [
            {"role": "user", "content": f"What is {k} + {k}?"},
            {"role": "assistant", "content": f"<think>\nAdding {k} to itself gives {2 * k}.\n</think>\n\nIt is {2 * k}."},
            {"role": "user", "content": "And times three?"},
            {"role": "assistant", "content": f"<think>\n{3 * k} is {k} three times.\n</think>\n\n{3 * k}."},
        ]})
    src = tmp_path / "r1.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(tokenizer=str(tokenizer_dir("qwen2.5-instruct")), format="messages", max_length=512,
                     chat_template_file=str(require_shared(R1)), eval_fraction=0.25)
    cfg.validate()
    m = prepare([str(src)], cfg, tmp_path / "out", progress=False)
    assert m["counts"]["kept"] == 12 and m["counts"]["repeated"] == 12  # two examples per row
    verify(tmp_path / "out")
    seen: dict[str, set[int]] = {}
    reasoning_tokens = 0
    for split in ("train", "eval"):
        ds = datasets.load_from_disk(str(tmp_path / "out" / split))
        assert S.REASONING_MASK in ds.column_names
        seen[split] = {i for row in ds for i in row[S.EXAMPLE_INDEX]}
        reasoning_tokens += sum(sum(row[S.REASONING_MASK]) for row in ds)
        batch = PLWCollator(0.1, reasoning_weight=0.0)(list(ds))
        assert batch["loss_weights"].sum() > 0
    assert not seen["train"] & seen["eval"] and len(seen["train"] | seen["eval"]) == 12
    assert reasoning_tokens == sum(s["reasoning_tokens"] for s in m["splits"].values()) > 0
