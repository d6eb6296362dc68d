"""`plw-data prepare` end to end: shards, manifest, drops, errors, truncation, splits, determinism."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, require_shared, tokenizer_dir

from plw_data.config import DataConfig
from plw_data.errors import ConfigError, PLWError
from plw_data.prepare.pipeline import prepare

RACE_RECIPE = REPO / "recipes" / "race.yaml"
GOOD = {"article": "Tom has a red bike. He rides it to school.", "question": "What colour is the bike?",
        "options": ["Blue", "Red", "Green", "Black"], "answer": "B"}


def race_cfg(**kw) -> DataConfig:
    from plw_data.config import build_config, load_recipe

    base = {"tokenizer": str(tokenizer_dir("smollm2-135m-instruct")), "max_length": 512}
    return build_config(DataConfig, load_recipe(RACE_RECIPE), {**base, **kw})


def write_broken(path: Path) -> dict[int, str]:
    """A RACE-schema JSONL with one bad row of each kind; returns index -> expected drop reason."""
    lines: list[bytes] = []
    expected: dict[int, str] = {}

    def add(obj=None, raw: bytes | None = None, reason: str | None = None):
        if reason:
            expected[len(lines)] = reason
        lines.append(raw if raw is not None else json.dumps(obj).encode())

    add(GOOD)
    add(raw=b'{"article": "broken', reason="malformed_json")
    add({k: v for k, v in GOOD.items() if k != "answer"}, reason="missing_field")
    add({**GOOD, "question": {"text": "?"}}, reason="wrong_type")
    add({**GOOD, "answer": "   "}, reason="empty_completion")
    add(raw=b'{"article": "caf\xe9", "question": "q", "options": ["a"], "answer": "A"}', reason="invalid_utf8")
    add({**GOOD, "article": "a\x00b"}, reason="nul_byte")
    add({**GOOD, "article": "word " * 2000})  # over-long prompt: truncated, kept
    add({**GOOD, "answer": "answer " * 2000}, reason="completion_too_long")
    add({**GOOD, "options": [1, 2, 3, 4]}, reason="wrong_type")
    add(raw=b"[1, 2]", reason="not_an_object")
    add({**GOOD, "answer": None}, reason="missing_field")
    add(GOOD)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def load_split(out: Path, split: str = "train"):
    import datasets

    return datasets.load_from_disk(str(out / split))


def test_broken_rows_are_dropped_with_reasons_and_counts_add_up(tmp_path: Path) -> None:
    src = tmp_path / "broken.jsonl"
    expected = write_broken(src)
    out = tmp_path / "out"
    m = prepare([str(src)], race_cfg(), out, progress=False)
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert {d["index"]: d["reason"] for d in dropped} == expected
    assert all(d["file"] == str(src) and d["row"] == d["index"] for d in dropped)
    c = m["counts"]
    assert c["input_rows"] == 13 and c["kept"] == 13 - len(expected) and c["truncated"] == 1
    assert c["input_rows"] == c["kept"] + sum(c["dropped"].values())
    ds = load_split(out)
    seen = sorted(i for row in ds["example_index"] for i in row)
    assert sorted(seen + [d["index"] for d in dropped]) == list(range(13))
    for row in ds:
        assert len(row["input_ids"]) <= 512 and sum(row["seq_lengths"]) == len(row["input_ids"])
        masks = np.array([row["prompt_mask"], row["completion_mask"], row["template_mask"]])
        assert (masks.sum(0) == 1).all()


@pytest.mark.timeout(120)
def test_dropped_rows_cross_worker_processes(tmp_path: Path) -> None:
    """Workers send RowErrors to the parent: --num-proc 2 must record the same drops, not hang."""
    src = tmp_path / "broken.jsonl"
    expected = write_broken(src)
    m = prepare([str(src)], race_cfg(batch_size=2, num_proc=2), tmp_path / "out", progress=False)
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert {d["index"]: d["reason"] for d in dropped} == expected
    assert all(d["file"] == str(src) and d["row"] == d["index"] for d in dropped)
    assert m["counts"]["kept"] == 13 - len(expected)


def test_on_error_fail_names_file_row_and_field(tmp_path: Path) -> None:
    src = tmp_path / "broken.jsonl"
    write_broken(src)
    with pytest.raises(PLWError, match=rf"{src}: line 2: malformed_json"):
        prepare([str(src)], race_cfg(on_error="fail"), tmp_path / "o1", progress=False)
    src.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "question": {"a": 1}}) + "\n")
    with pytest.raises(PLWError, match=r"line 2, field 'question': wrong_type"):
        prepare([str(src)], race_cfg(on_error="fail"), tmp_path / "o2", progress=False)


def test_cli_exit_status_and_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "broken.jsonl"
    write_broken(src)
    tok = str(tokenizer_dir("smollm2-135m-instruct"))
    base = [sys.executable, "-m", "plw_data.cli.main", "prepare", str(src), "--tokenizer", tok, "--recipe", str(RACE_RECIPE), "-q"]
    bad = subprocess.run(base + ["--output", str(tmp_path / "o"), "--on-error", "fail"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [f"error: {src}: line 2: malformed_json: Unterminated string starting at (column 13)"]
    missing = subprocess.run(base[:4] + [str(tmp_path / "nope.jsonl"), "--tokenizer", tok, "--output", str(tmp_path / "o")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "nope.jsonl: input file not found" in missing.stderr
    ok = subprocess.run(base + ["--output", str(tmp_path / "ok")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # at the recipe's max_length 2048 the two over-long rows fit once their prompt is cut
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["counts"]["kept"] == 4


def race_subset(tmp_path: Path, n: int) -> Path:
    src = require_shared("race/dev.jsonl.gz")
    dst = tmp_path / "race.jsonl"
    with gzip.open(src, "rt") as f:
        dst.write_text("".join(next(f) for _ in range(n)))
    return dst


def test_manifest_schema_and_real_race(tmp_path: Path) -> None:
    src = race_subset(tmp_path, 300)
    out = tmp_path / "out"
    m = prepare([str(src)], race_cfg(eval_fraction=0.1, max_length=2048), out, progress=False)
    assert m["format_version"] == 1 and m["created_by"].startswith("plw-data ")
    assert set(m["tokenizer"]) >= {"name_or_path", "sha256", "vocab_size", "chat_template_sha256"}
    assert m["inputs"][0]["rows"] == 300 and len(m["inputs"][0]["sha256"]) == 64
    assert m["counts"] == {"input_rows": 300, "kept": 300, "dropped": {}, "truncated": 0}
    assert m["splits"]["eval"]["examples"] == 30 and m["splits"]["train"]["examples"] == 270
    for name, s in m["splits"].items():
        ds = load_split(out, name)
        assert len(ds) == s["rows"] and s["packed"]
        assert s["tokens"] == sum(len(r) for r in ds["input_ids"]) == s["prompt_tokens"] + s["completion_tokens"] + s["template_tokens"]
        assert s["lower_bound_rows"] == -(-s["tokens"] // 2048)
        assert s["fill"] == pytest.approx(s["tokens"] / (s["rows"] * 2048))
        assert ds.features["input_ids"].feature.dtype == "int32"
        assert all(sh["rows"] > 0 and len(sh["sha256"]) == 64 for sh in s["shards"])
    idx = [i for name in ("train", "eval") for r in load_split(out, name)["example_index"] for i in r]
    assert sorted(idx) == list(range(300))


def test_packed_rows_hold_the_unpacked_examples_unchanged(tmp_path: Path) -> None:
    src = race_subset(tmp_path, 120)
    prepare([str(src)], race_cfg(max_length=2048), tmp_path / "p", progress=False)
    prepare([str(src)], race_cfg(pack=False, max_length=2048), tmp_path / "u", progress=False)
    packed, unpacked = load_split(tmp_path / "p"), load_split(tmp_path / "u")
    assert len(unpacked) == 120 and len(packed) < 120
    by_index = {r["example_index"][0]: r for r in unpacked}
    cols = ("input_ids", "prompt_mask", "completion_mask", "template_mask")
    for row in packed:
        start = 0
        for length, idx in zip(row["seq_lengths"], row["example_index"]):
            for c in cols:
                assert row[c][start : start + length] == by_index[idx][c]
            start += length


def test_eval_input_indices_follow_train_rows(tmp_path: Path) -> None:
    src = race_subset(tmp_path, 40)
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "answer": ""}) + "\n")
    m = prepare([str(src)], race_cfg(eval_input=[str(ev)]), tmp_path / "o", progress=False)
    assert m["counts"]["input_rows"] == 42 and m["counts"]["dropped"] == {"empty_completion": 1}
    assert [i for r in load_split(tmp_path / "o", "eval")["example_index"] for i in r] == [40]
    assert json.loads((tmp_path / "o" / "dropped.jsonl").read_text())["index"] == 41


def test_rerun_is_a_noop_and_other_config_is_refused(tmp_path: Path) -> None:
    src = race_subset(tmp_path, 30)
    out = tmp_path / "o"
    prepare([str(src)], race_cfg(), out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    prepare([str(src)], race_cfg(num_proc=1), out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == before
    with pytest.raises(ConfigError, match="another config"):
        prepare([str(src)], race_cfg(max_length=1024), out, progress=False)
    prepare([str(src)], race_cfg(max_length=1024), out, overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["config"]["max_length"] == 1024


@pytest.mark.slow
def test_one_and_two_processes_give_identical_bytes(tmp_path: Path) -> None:
    src = race_subset(tmp_path, 400)
    m1 = prepare([str(src)], race_cfg(batch_size=64, eval_fraction=0.1), tmp_path / "a", progress=False)
    m2 = prepare([str(src)], race_cfg(batch_size=64, eval_fraction=0.1, num_proc=2), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert m1 == m2
