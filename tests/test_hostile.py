"""Hostile chat input (messages / sharegpt): every bad conversation is a named drop, every good one exact."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_tokenizer, tokenizer_dir

from plw_data.config import DataConfig
from plw_data.errors import PLWError
from plw_data.prepare.pipeline import prepare

TOK = "smollm2-135m-instruct"
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

# (row, expected drop reason or None when kept)
MESSAGES_CASES = [
    ({"messages": [U("Hi"), A("Hello!")]}, None),
    ({"messages": [U("Hi"), A("Hello!"), U("And?"), A("Bye.")]}, None),
    ({"messages": [{"role": "system", "content": "Be brief."}, U("Hi"), A("Yo")]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}]},
                   A("ok")]}, None),  # fmt: skip
    ({"messages": [U("Hi"), {"role": "robot", "content": "beep"}]}, "unknown_role"),
    ({"messages": [U("Hi"), U("Anyone?")]}, "no_assistant_turn"),
    ({"messages": [A("I speak first"), U("ok")]}, "starts_with_assistant"),
    ({"messages": [U("a"), A("b"), A("c")]}, None),  # consecutive turns: the template decides (this one accepts)
    ({"messages": [U("a"), {"role": "system", "content": "late"}, A("b")]}, "bad_turn_order"),
    ({"messages": [U("a"), A("   ")]}, "empty_completion"),
    ({"messages": [U(" \n "), A("b")]}, "empty_prompt"),
    ({"messages": [U("a"), A(None)]}, "missing_field"),
    ({"messages": [U("a"), {"role": "assistant"}]}, "missing_field"),
    ({"messages": [U("a"), A({"text": "nested"})]}, "wrong_type"),
    ({"messages": "Hi"}, "wrong_type"),
    ({"messages": [U("a"), "b"]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, A("b")]}, "unsupported_content"),
    ({"messages": [U("nul\x00byte"), A("b")]}, "nul_byte"),
    ({"conversations": [{"from": "human", "value": "wrong schema"}]}, "missing_field"),
    ({"messages": [U("long " * 3000), A("kept, prompt cut")]}, None),
    ({"messages": [U("q"), A("long " * 3000)]}, "completion_too_long"),
]


def cfg(fmt: str, **kw) -> DataConfig:
    base = DataConfig(tokenizer=str(tokenizer_dir(TOK)), format=fmt, max_length=512, eval_fraction=0.0, pack=False)
    for k, v in kw.items():
        setattr(base, k, v)
    base.validate()
    return base


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_ids(tok, messages: list[dict]) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))


def read_dropped(out: Path) -> dict[int, dict]:
    return {d["index"]: d for d in map(json.loads, (out / "dropped.jsonl").read_text().splitlines())}


def test_messages_hostile_rows_are_named_drops_and_good_rows_exact(tmp_path: Path) -> None:
    import datasets

    src = write_jsonl(tmp_path / "chat.jsonl", [row for row, _ in MESSAGES_CASES])
    out = tmp_path / "out"
    m = prepare([str(src)], cfg("messages"), out, progress=False)
    dropped = read_dropped(out)
    assert {i: d["reason"] for i, d in dropped.items()} == {i: r for i, (_, r) in enumerate(MESSAGES_CASES) if r}
    assert all(d["file"] == str(src) and d["row"] == i for i, d in dropped.items())
    assert dropped[4]["field"] == "messages[1].role"
    assert m["counts"]["truncated"] == 1
    tok = load_tokenizer(TOK)
    rows = {r["example_index"][0]: r for r in datasets.load_from_disk(str(out / "train"))}
    assert sorted(rows) == [0, 1, 2, 3, 7, 19]
    for i in (0, 1, 2, 7):
        assert rows[i]["input_ids"] == chat_ids(tok, MESSAGES_CASES[i][0]["messages"])
    # list-of-parts content is the concatenated text, exactly as that string renders
    assert rows[3]["input_ids"] == chat_ids(tok, [U("Two parts"), A("ok")])
    user = [t for t, p in zip(rows[3]["input_ids"], rows[3]["prompt_mask"]) if p]
    assert tok.decode(user).endswith("Two parts")


def test_sharegpt_roles_and_mixed_schemas_across_files(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Yo"}]}  # fmt: skip
    first = write_jsonl(tmp_path / "a.jsonl", [good, {"conversations": [{"from": "alien", "value": "?"}]}])
    # a second file of another schema, as parquet: every row is a named drop naming that file
    second = tmp_path / "b.parquet"
    pq.write_table(pa.table({"messages": [json.dumps([U("x"), A("y")])]}), second)
    out = tmp_path / "out"
    m = prepare([str(first), str(second)], cfg("sharegpt"), out, progress=False)
    dropped = read_dropped(out)
    assert dropped[1]["reason"] == "unknown_role" and dropped[1]["field"] == "conversations[0].from"
    assert dropped[2]["reason"] == "missing_field" and dropped[2]["file"] == str(second) and dropped[2]["row"] == 0
    assert m["counts"] == {"input_rows": 3, "kept": 1, "dropped": {"missing_field": 1, "unknown_role": 1}, "truncated": 0}
    with pytest.raises(PLWError, match=rf"{second}: row 0, field 'conversations': missing_field"):
        prepare([str(second)], cfg("sharegpt", on_error="fail"), tmp_path / "o2", progress=False)
