"""Multi-machine prepare: K slices (--num-shards K --shard-index i) merged equal one job's examples."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import REPO, require_shared, tokenizer_dir

from plw_data.config import DataConfig, build_config, load_recipe
from plw_data.errors import ConfigError
from plw_data.prepare.merge import merge
from plw_data.prepare.pipeline import prepare
from plw_data.prepare.verify import verify

K = 3


def cfg(**kw) -> DataConfig:
    over = {"tokenizer": str(tokenizer_dir("smollm2-135m-instruct")), "eval_fraction": 0.2, "max_length": 1024, **kw}
    return build_config(DataConfig, load_recipe(REPO / "recipes" / "race.yaml"), over)


def examples(d: Path) -> dict[int, tuple]:
    """example_index -> (ids, prompt, completion, template) unpacked from every split of d."""
    out = {}
    for split in ("train", "eval"):
        for row in datasets.load_from_disk(str(d / split)):
            pos = 0
            for n, idx in zip(row["seq_lengths"], row["example_index"]):
                out[idx] = tuple(tuple(row[c][pos : pos + n]) for c in ("input_ids", "prompt_mask", "completion_mask", "template_mask"))
                pos += n
    return out


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    tmp = tmp_path_factory.mktemp("merge")
    with gzip.open(require_shared("race/dev.jsonl.gz"), "rt") as f:
        lines = [next(f) for _ in range(60)]
    lines[7] = '{"article": "broken\n'
    src = tmp / "race.jsonl"
    src.write_text("".join(lines))
    parts = [tmp / f"part{i}" for i in range(K)]
    for i, p in enumerate(parts):
        prepare([str(src)], cfg(num_shards=K, shard_index=i), p, progress=False)
    single = tmp / "single"
    prepare([str(src)], cfg(), single, progress=False)
    return src, parts, single


def test_merged_slices_hold_every_example_once_and_verify(slices, tmp_path: Path) -> None:
    _, parts, single = slices
    out = tmp_path / "merged"
    m = merge(list(reversed(parts)), out, per_slice_eval=True)  # any order of the parts
    verify(out)
    assert m["counts"]["input_rows"] == 60 and m["counts"]["dropped"] == {"malformed_json": 1}
    assert [json.loads(x)["index"] for x in (out / "dropped.jsonl").read_text().splitlines()] == [7]
    # the same examples, token for token; only the train/eval assignment and the packing are per slice
    merged, whole = examples(out), examples(single)
    assert sorted(merged) == sorted(whole) == [i for i in range(60) if i != 7]
    assert merged == whole
    for name, split in m["splits"].items():
        assert split["rows"] == sum(json.loads((p / "manifest.json").read_text())["splits"][name]["rows"] for p in parts)
        assert m["merge"]["extra_rows"][name] == split["rows"] - split["lower_bound_rows"] >= 0


def test_merge_refuses_incomplete_or_foreign_parts(slices, tmp_path: Path) -> None:
    src, parts, single = slices
    with pytest.raises(ConfigError, match=r"slices 0\.\.K-1"):
        merge(parts[:2], tmp_path / "a", per_slice_eval=True)
    with pytest.raises(ConfigError, match="another config"):
        merge([*parts[:2], single], tmp_path / "b", per_slice_eval=True)
    other = tmp_path / "other"
    prepare([str(src)], cfg(num_shards=K, shard_index=2, max_length=900), other, progress=False)
    with pytest.raises(ConfigError, match="another config"):
        merge([*parts[:2], other], tmp_path / "c", per_slice_eval=True)


def test_cli_merge(slices, tmp_path: Path) -> None:
    _, parts, _ = slices
    exe = [sys.executable, "-m", "plw_data.cli.main"]
    r = subprocess.run([*exe, "merge", *map(str, parts), "--output", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 2 and "--eval-input" in r.stderr and "--per-slice-eval" in r.stderr  # the fix, named
    cmd = [*exe, "merge", *map(str, parts), "--output", str(tmp_path / "m"), "--per-slice-eval"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "merged 3 slices" in r.stdout
    before = (tmp_path / "m" / "manifest.json").stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True)  # a finished merge: a no-op
    assert r.returncode == 0 and (tmp_path / "m" / "manifest.json").stat().st_mtime_ns == before
