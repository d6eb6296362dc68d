"""`plw-data verify`: a real prepared DIR passes; each kind of damage fails, naming the first problem."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import REPO, require_shared, tokenizer_dir

from plw_data.errors import PLWError
from plw_data.schema import sha256_file
from plw_data.prepare.verify import verify

BAD_ROW = 50  # a malformed JSON line at this index, so dropped.jsonl is not empty
N_ROWS = 101


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 real RACE dev rows plus one malformed row, SmolLM2, 10% eval, small shards (several per split)."""
    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare.pipeline import prepare

    tmp = tmp_path_factory.mktemp("verify")
    with gzip.open(require_shared("race/dev.jsonl.gz"), "rt") as f:
        lines = [next(f) for _ in range(N_ROWS - 1)]
    lines.insert(BAD_ROW, '{"article": "broken\n')
    src = tmp / "race.jsonl"
    src.write_text("".join(lines))
    over = {"tokenizer": str(tokenizer_dir("smollm2-135m-instruct")), "eval_fraction": 0.1, "shard_tokens": 20_000}
    cfg = build_config(DataConfig, load_recipe(REPO / "recipes" / "race.yaml"), over)
    out = tmp / "out"
    prepare([str(src)], cfg, out, progress=False)
    return out


@pytest.fixture
def copy(prepared: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    return out


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def write_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def shard(d: Path, split: str = "train", k: int = 0) -> Path:
    return d / split / manifest(d)["splits"][split]["shards"][k]["file"]


def rewrite_shard(d: Path, mutate: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]) -> None:
    """Rewrite train shard 0 as a valid Arrow stream with mutated values, and re-sign it in the manifest,
    so only the row invariants can catch the change. mutate(values, offsets) edits values in place."""
    path = shard(d)
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        schema, table = reader.schema, reader.read_all()
    cols = {f.name: table.column(f.name).combine_chunks() for f in schema}
    values = {n: c.flatten().to_numpy(zero_copy_only=False).copy() for n, c in cols.items()}
    offsets = {n: c.offsets.to_numpy() for n, c in cols.items()}
    mutate(values, offsets)
    arrays = [pa.ListArray.from_arrays(pa.array(offsets[f.name]), pa.array(values[f.name], f.type.value_type)) for f in schema]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    m = manifest(d)
    entry = m["splits"]["train"]["shards"][0]
    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    write_manifest(d, m)


def fails(d: Path, pattern: str, **kw) -> str:
    with pytest.raises(PLWError, match=pattern) as e:
        verify(d, **kw)
    return str(e.value)


def test_valid_directory_passes_every_check(prepared: Path) -> None:
    m = manifest(prepared)
    assert m["counts"] == {"input_rows": N_ROWS, "kept": N_ROWS - 1, "dropped": {"malformed_json": 1}, "truncated": 0}
    assert len(m["splits"]["train"]["shards"]) >= 2 and "eval" in m["splits"]
    checks = verify(prepared)
    assert checks[0].startswith("manifest:") and checks[-1].startswith("tokenizer: ") and "matches" in checks[-1]
    assert checks[-2] == f"coverage: example_index over all splits plus dropped.jsonl is each of the {N_ROWS} input rows once"
    assert verify(prepared, tokenizer=str(tokenizer_dir("smollm2-135m-instruct"))) == checks


def test_flipped_byte_fails_the_checksum(copy: Path) -> None:
    path = shard(copy, "train", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fails(copy, rf"{path}: sha256 [0-9a-f]{{64}} does not match the manifest's")


def test_deleted_shard_and_missing_manifest(copy: Path) -> None:
    path = shard(copy, "eval", 0)
    path.unlink()
    fails(copy, rf"{path}: missing \(listed in manifest.json\)")
    (copy / "manifest.json").unlink()
    fails(copy, rf"{copy / 'manifest.json'}: missing: not a prepared directory, or prepare did not finish")


def test_changed_manifest_counts_fail(copy: Path) -> None:
    m = manifest(copy)
    m["counts"]["kept"] += 1
    write_manifest(copy, m)
    fails(copy, rf"counts.input_rows {N_ROWS} != kept {N_ROWS} \+ dropped 1")
    # Consistent with itself, but not with the shards: only streaming the rows can tell.
    m["counts"]["kept"] -= 1
    train = m["splits"]["train"]
    train["prompt_tokens"] += 1
    train["tokens"] += 1
    train["fill"] = train["tokens"] / (train["rows"] * train["max_length"])
    train["lower_bound_rows"] = -(-train["tokens"] // train["max_length"])
    write_manifest(copy, m)
    fails(copy, rf"{copy / 'train'}: tokens is {train['tokens'] - 1}, manifest says {train['tokens']}")


def test_removed_dropped_line_fails(copy: Path) -> None:
    (copy / "dropped.jsonl").write_text("")
    fails(copy, r"dropped.jsonl: 0 line\(s\) with reason 'malformed_json', manifest counts.dropped says 1")
    # The same with the manifest's counts edited to match: only coverage of the input rows can tell.
    m = manifest(copy)
    m["counts"].update(input_rows=N_ROWS - 1, dropped={})
    write_manifest(copy, m)
    fails(copy, rf"manifest.json: counts.input_rows {N_ROWS - 1}, but inputs hold {N_ROWS} rows for this job")
    m["inputs"][0]["rows"] = N_ROWS - 1
    write_manifest(copy, m)
    fails(copy, rf"{copy}/(train|eval): index {N_ROWS - 1} is not one of this job's input rows \(0..{N_ROWS - 2}\)")


def test_duplicated_index_fails_coverage(copy: Path) -> None:
    line = json.loads((copy / "dropped.jsonl").read_text())
    (copy / "dropped.jsonl").write_text(json.dumps({**line, "index": 7}) + "\n")
    fails(copy, rf"{copy}: input row 7 appears more than once \(in (train|eval), dropped.jsonl\)")


def test_renumbered_example_fails_coverage(copy: Path) -> None:
    where = {}

    def renumber(values: dict, offsets: dict) -> None:
        idx = values["example_index"]
        k = int(np.argmax(~np.isin(idx + 1, [*idx, BAD_ROW])))  # an example whose successor is elsewhere
        where["row"] = int(idx[k])
        idx[k] += 1

    rewrite_shard(copy, renumber)
    fails(copy, rf"{copy}: input row {where['row']} is in no split and not in dropped.jsonl")


def test_two_masks_on_one_token_fails_with_row_token_and_columns(copy: Path) -> None:
    where = {}

    def both_template_and_completion(values: dict, offsets: dict) -> None:
        # Row 1, first token of its second example: a template token (<|im_start|>).
        seq = values["seq_lengths"][offsets["seq_lengths"][1] :]
        k = int(seq[0])
        pos = offsets["input_ids"][1] + k
        assert values["template_mask"][pos] == 1
        values["completion_mask"][pos] = 1
        where["token"] = k

    rewrite_shard(copy, both_template_and_completion)
    fails(
        copy,
        rf"{shard(copy)}: row 1, column prompt_mask/completion_mask/template_mask: token {where['token']} has "
        r"prompt_mask=0, completion_mask=1, template_mask=1; exactly one must be 1",
    )


def test_seq_lengths_and_ids_are_checked_per_row(copy: Path) -> None:
    def longer_first_example(values: dict, offsets: dict) -> None:
        values["seq_lengths"][offsets["seq_lengths"][2]] += 1

    rewrite_shard(copy, longer_first_example)
    fails(copy, rf"{shard(copy)}: row 2, column seq_lengths: sums to \d+, but the row has \d+ tokens")

    def undo_and_out_of_vocab(values: dict, offsets: dict) -> None:
        values["seq_lengths"][offsets["seq_lengths"][2]] -= 1
        values["input_ids"][offsets["input_ids"][3] + 5] = 49152

    rewrite_shard(copy, undo_and_out_of_vocab)
    fails(copy, rf"{shard(copy)}: row 3, column input_ids: token 5 is id 49152, outside the vocabulary \[0, 49152\)")


def test_wrong_tokenizer_fingerprint_fails(copy: Path) -> None:
    fails(copy, r"tokenizer.sha256 is '[0-9a-f]{64}', but .*llama-2-chat gives", tokenizer=str(tokenizer_dir("llama-2-chat")))
    m = manifest(copy)
    m["tokenizer"]["chat_template_sha256"] = "0" * 64
    write_manifest(copy, m)
    fails(copy, r"manifest.json: tokenizer.chat_template_sha256 is '0{64}', but .*smollm2-135m-instruct gives")
    # A hub name is never fetched just to verify: that check is reported as skipped.
    m["tokenizer"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    write_manifest(copy, m)
    assert "tokenizer: not checked (HuggingFaceTB/SmolLM2-135M-Instruct is not a local path; give --tokenizer)" in verify(copy)


def test_cli_exit_status(copy: Path) -> None:
    cmd = [sys.executable, "-m", "plw_data.cli.main", "verify", str(copy)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == f"OK: {copy}"
    path = shard(copy, "train", 0)
    path.write_bytes(path.read_bytes()[:-10])
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"error: {path}: {path.stat().st_size} bytes, manifest says {path.stat().st_size + 10}"]
