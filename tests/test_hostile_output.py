"""Hostile output paths: --overwrite never deletes what plw-data did not write; a failed run cleans up."""

from __future__ import annotations

import json
from pathlib import Path

from hostile_helpers import QA, cli, one_line_error, qa_rows, tok, write_jsonl


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_users_directory_and_keeps_its_files(tmp_path: Path) -> None:
    user = tmp_path / "project"
    (user / "train").mkdir(parents=True)
    src = write_jsonl(user / "train" / "data.jsonl", qa_rows())
    (user / "notes.txt").write_text("mine")
    before = _tree(user)
    for extra in ([], ["--overwrite"]):
        r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", user, *extra)
        one_line_error(r, "not a plw-data directory", "notes.txt", "train/")
        assert _tree(user) == before
    (user / "manifest.json").write_text(json.dumps({"name": "my own manifest"}))  # not ours either
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", user, "--overwrite")
    one_line_error(r, "not a plw-data directory", "manifest.json")
    assert (user / "train" / "data.jsonl").read_bytes() == before["train/data.jsonl"]


def test_overwrite_replaces_a_plw_data_directory(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    out = tmp_path / "out"
    assert cli("prepare", src, "--tokenizer", tok(), *QA, "--output", out).exit_code == 0
    (out / "README.txt").write_text("a note beside the data")
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", out, "--max-length", "128")
    one_line_error(r, "another config")
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", out, "--max-length", "128", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["config"]["max_length"] == 128
    assert (out / "README.txt").read_text() == "a note beside the data"


def test_output_that_is_a_file_or_under_a_file_is_one_line(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    for target in (src, src / "sub"):
        r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", target)
        one_line_error(r, "is a file, not a directory")
    assert src.read_text().count("\n") == 6


def test_a_failed_run_removes_what_it_created(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", [*qa_rows(3), {"question": "no answer"}])
    out = tmp_path / "new"
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", out, "--on-error", "fail")
    one_line_error(r, "line 4", "answer")
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", tmp_path / "empty", "--on-error", "fail")
    assert r.exit_code == 2 and list((tmp_path / "empty").iterdir()) == []


def test_a_run_that_keeps_no_row_exits_2(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q"}, {"question": "r"}])
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--output", tmp_path / "out")
    one_line_error(r, "no row kept", "missing_field 2")
    assert not (tmp_path / "out").exists()


def test_inspect_without_manifest_or_with_a_negative_index_is_one_line(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    out = tmp_path / "out"
    assert cli("prepare", src, "--tokenizer", tok(), *QA, "--output", out).exit_code == 0
    one_line_error(cli("inspect", out, "--index", "-1"), "--index must be >= 0")
    one_line_error(cli("inspect", out, "--index", "99"), "out of range")
    (out / "manifest.json").unlink()
    one_line_error(cli("inspect", out), "manifest.json: missing")


def test_merge_verifies_each_part_first(tmp_path: Path) -> None:
    from plw_data.errors import PLWError
    from plw_data.prepare.merge import merge

    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, p in enumerate(parts):
        r = cli("prepare", src, "--tokenizer", tok(), *QA, "--num-shards", "2", "--shard-index", str(i), "--output", p)
        assert r.exit_code == 0, r.output
    shard = next((parts[1] / "train").glob("*.arrow"))
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    import pytest

    with pytest.raises(PLWError, match="sha256"):
        merge(parts, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_piped_summary_keeps_full_numbers(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--no-pack", "--output", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0
    assert "…" not in r.stderr and "encoding: 40 rows" in r.stderr
