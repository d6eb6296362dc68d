"""prepare --ray: the K slices as Ray tasks + merge equal the K slices run by hand + merge, byte for byte,
also when a Ray worker dies in the middle of a slice. One local 2-CPU Ray instance for the module."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import REPO, require_shared, tokenizer_dir

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'plw-data[ray]'); not installed")

from plw_data.config import DataConfig, build_config, load_recipe  # noqa: E402
from plw_data.errors import ConfigError  # noqa: E402
from plw_data.prepare.distributed import prepare_on_ray, prepare_slice, slice_dirs  # noqa: E402
from plw_data.prepare.merge import merge  # noqa: E402
from plw_data.prepare.pipeline import prepare  # noqa: E402
from plw_data.prepare.verify import verify  # noqa: E402

K = 2


def cfg(**kw) -> DataConfig:
    over = {"tokenizer": str(tokenizer_dir("smollm2-135m-instruct")), "eval_fraction": 0.2, "max_length": 1024, "num_shards": K, **kw}
    return build_config(DataConfig, load_recipe(REPO / "recipes" / "race.yaml"), over)


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file of a prepared DIR but run.json (timings), by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    """(input, output path, the bytes of running the K slices by hand into OUTPUT/.plw-slices/i + merge)."""
    tmp = tmp_path_factory.mktemp("ray")
    with gzip.open(require_shared("race/dev.jsonl.gz"), "rt") as f:
        lines = [next(f) for _ in range(24)]
    lines[5] = '{"article": "broken\n'  # a dropped row travels through the slices too
    src = tmp / "race.jsonl"
    src.write_text("".join(lines))
    out = tmp / "out"
    parts = slice_dirs(out, K)
    for i, part in enumerate(parts):
        prepare([str(src)], cfg(shard_index=i), part, progress=False)
    merge(parts, out, overwrite=True, per_slice_eval=True)  # the slices draw their eval splits
    shutil.rmtree(parts[0].parent)
    expected = snapshot(out)
    shutil.rmtree(out)
    return src, out, expected


def test_ray_equals_manual_slices_and_merge(cluster, job) -> None:
    src, out, expected = job
    lines: list[str] = []
    m = prepare([str(src)], cfg(ray="local"), out, progress=False, log=lines.append)  # joins the module's instance
    assert snapshot(out) == expected
    verify(out)
    assert m["merge"]["num_shards"] == K and m["counts"]["input_rows"] == 24 and m["counts"]["dropped"] == {"malformed_json": 1}
    assert sum(line.startswith("slice ") and "rows/s over the cluster" in line for line in lines) == K
    assert not (out / ".plw-slices").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["num_shards"] == K and sum(s["rows"] for s in run["slices"]) == 24
    # the same command again: already prepared (ray is not part of the data's identity)
    again: list[str] = []
    prepare([str(src)], cfg(ray="local"), out, progress=False, log=again.append)
    assert any("already prepared" in line for line in again)
    shutil.rmtree(out)


def test_killed_worker_is_retried_and_gives_the_same_bytes(cluster, job, tmp_path: Path) -> None:
    src, out, expected = job
    marker = tmp_path / "killed"

    def dying_slice(inputs, c, output, cwd):
        """Slice 1's first attempt: SIGKILL its own worker after staging, before any shard is written."""
        if c.shard_index == 1 and not marker.exists():
            marker.touch()
            prepare(inputs, c, output, progress=False, log=lambda line: os.kill(os.getpid(), signal.SIGKILL))
        return prepare_slice(inputs, c, output, cwd)

    prepare_on_ray([str(src)], cfg(ray="local"), out, task=dying_slice)
    assert marker.exists()  # the first attempt ran and died; the retry finished the slice
    assert snapshot(out) == expected
    verify(out)
    shutil.rmtree(out)


def test_cli_ray(cluster, job) -> None:
    from typer.testing import CliRunner

    from plw_data.cli.main import app

    src, out, expected = job
    base = ["prepare", str(src), "--recipe", str(REPO / "recipes" / "race.yaml"), "--tokenizer", str(tokenizer_dir("smollm2-135m-instruct")),
            "--eval-fraction", "0.2", "--max-length", "1024", "--output", str(out), "--quiet"]
    r = CliRunner().invoke(app, [*base, "--num-shards", "2", "--ray", "local"])
    assert r.exit_code == 0, r.output
    assert snapshot(out) == expected
    r = CliRunner().invoke(app, [*base, "--ray", "local"])
    assert r.exit_code == 2 and "--num-shards K (K >= 2)" in r.output


def test_ray_option_needs_a_value() -> None:
    with pytest.raises(ConfigError, match="--ray needs a value"):
        cfg(ray="--num-shards")
    with pytest.raises(ConfigError, match="positive number of CPUs"):
        cfg(ray="local:x")
    assert cfg(ray="local").fingerprint_dict() == cfg().fingerprint_dict()
