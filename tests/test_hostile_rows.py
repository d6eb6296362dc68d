"""Hostile rows and files: every row-level failure is a named drop (or the one-line error with
--on-error fail), every file-level failure one line with exit 2; nothing lost, no traceback."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from hostile_helpers import QA, cli, one_line_error, qa_rows, read_dropped, tok

GOOD = '{"question": "What is 1 + 1?", "answer": "2"}'
# (raw JSON line, expected drop reason or None when kept)
LINES = [
    (GOOD, None),
    ('{"question": "bad \\ud800 half", "answer": "x"}', "lone_surrogate"),
    ('{"question": "pair \\ud83d\\ude00 ok", "answer": "y"}', None),
    ('{"question": "q", "answer": "a", "n": ' + "7" * 5000 + "}", "number_too_large"),
    ('{"question": "q", "answer": "a", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nesting_too_deep"),
    ('{"question": "q", "answer": NaN}', "non_finite_number"),
    ('{"question": "q", "answer": -Infinity}', "non_finite_number"),
    ('{"question": "' + "x" * 20_000 + '", "answer": "a"}', "row_too_large"),
    ('{"question": "q", "answer": "a"', "malformed_json"),
]


def _prepare(tmp_path: Path, src: Path, *extra: str):
    return cli("prepare", src, "--tokenizer", tok(), *QA, "--output", tmp_path / "out", *extra)


def _reasons(out: Path) -> dict[int, str]:
    return {d["index"]: d["reason"] for d in read_dropped(out)}


def _counts(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["counts"]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_hostile_json_lines_are_named_drops_with_any_newline_and_a_bom(tmp_path: Path, newline: str) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + newline.join(line for line, _ in LINES).encode() + newline.encode())
    r = _prepare(tmp_path, src, "--max-field-chars", "10000")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert _reasons(out) == {i: reason for i, (_, reason) in enumerate(LINES) if reason}
    c = _counts(out)
    assert c["input_rows"] == len(LINES) and c["kept"] + sum(c["dropped"].values()) == len(LINES)
    assert c["kept"] == 2  # the BOM row and the valid surrogate pair


def test_on_error_fail_names_the_line(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text(GOOD + "\n\n" + LINES[1][0] + "\n")  # a blank line: the bad row is on line 3
    one_line_error(_prepare(tmp_path, src, "--on-error", "fail"), f"{src}: line 3", "lone_surrogate")


def test_row_too_large_is_dropped_before_tokenization_and_names_its_field(tmp_path: Path) -> None:
    src = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 5000}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("prepare", src, "--tokenizer", tok(), "--format", "messages", "--max-length", "64", "--output", tmp_path / "out")
    assert r.exit_code == 0, r.output
    (d,) = read_dropped(tmp_path / "out")  # default limit: 64 x max_length = 4096 characters
    assert d["reason"] == "row_too_large" and d["field"] == "messages[1].content" and "5,000 characters" in d["detail"]


def test_csv_big_field_bom_cr_lines_and_an_unterminated_quote(tmp_path: Path) -> None:
    src = tmp_path / "rows.csv"
    big = "z" * 200_000  # over csv's own 131,072 limit: read, then dropped by the row-size limit
    src.write_bytes(b"\xef\xbb\xbf" + f"question,answer\r1+1?,2\r{big},3\r2+2?,4\r".encode())
    assert _prepare(tmp_path, src).exit_code == 0
    assert _reasons(tmp_path / "out") == {1: "row_too_large"} and _counts(tmp_path / "out")["kept"] == 2
    src.write_text('question,answer\n1+1?,2\n"unterminated,3\n2+2?,4\n3+3?,6\n')
    one_line_error(_prepare(tmp_path, src, "--overwrite"), f"{src}: line 3", "CSV error")


def test_file_level_failures_are_one_line(tmp_path: Path) -> None:
    body = ("\n".join(json.dumps(r) for r in qa_rows(3000)) + "\n").encode()
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(body)[:2000])
    one_line_error(_prepare(tmp_path, truncated), str(truncated), "cannot read", "after ")
    for name in ("plain.jsonl.gz", "x.parquet", "x.arrow"):
        bad = tmp_path / name
        bad.write_bytes(b"this is not the format its name says " * 10)
        one_line_error(_prepare(tmp_path, bad), str(bad), "cannot read")
    assert not (tmp_path / "out").exists()
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.jsonl"
        locked.write_text(GOOD + "\n")
        locked.chmod(0)
        one_line_error(_prepare(tmp_path, locked), str(locked))
