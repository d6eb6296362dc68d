"""Crash safety of `plw-data prepare`: a run killed at any point leaves no manifest, and re-running the
same command finishes with exactly the bytes of an uninterrupted run.

Kills are real SIGKILLs of a `plw-data prepare` process. One comes from outside, timed by watching the
staging file grow; the others are deterministic: run as a script, this file installs a hook that
SIGKILLs its own process at an exact point of the pipeline (between moves of the final install, just
before the manifest), then runs the CLI. A faster in-process test crashes (by exception) an --overwrite
run inside a shard write and inside the install, where the old DIR must stay usable or be marked
incomplete.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

TMP = ".plw-tmp"
N_ROWS = 300
RECIPE = """\
format: prompt-completion
prompt_template: "Choose the correct option based on the context.\\nContext:{article}\\nQuestion:{question}\\nOptions:{options}"
completion_template: "{answer}"
max_length: 2048
eval_fraction: 0.1
batch_size: 100
shard_tokens: 30000
"""


def _installing(src: str | Path, dst: str | Path) -> bool:
    """Whether an os.replace is one of the final install's moves out of .plw-tmp into DIR."""
    return Path(src).parent.name == TMP and Path(dst).parent.name != TMP


def _at_call(nth: int, fn: Callable, action: Callable[[], None], when: Callable[..., bool] = lambda *a: True) -> Callable:
    """fn, except that action() runs first on its nth call whose arguments satisfy `when`."""
    count = 0

    def wrapper(*args, **kwargs):
        nonlocal count
        if when(*args):
            count += 1
            if count == nth:
                action()
        return fn(*args, **kwargs)

    return wrapper


def _kill_hook(point: str) -> None:
    """Make this process SIGKILL itself at `point`: 'install:N' (before the N-th move out of .plw-tmp into
    DIR) or 'manifest' (before it is written)."""
    from plw_data import schema

    name, _, nth = point.partition(":")
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if name == "install":
        os.replace = _at_call(int(nth), os.replace, die, _installing)
    elif name == "manifest":
        schema.fsync_write = _at_call(1, schema.fsync_write, die, lambda path, data: path.name == "manifest.json")
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":  # python tests/test_crash.py POINT prepare ARGS...
    _kill_hook(sys.argv[1])
    from plw_data.cli.main import app

    sys.argv = ["plw-data", *sys.argv[2:]]
    app()


from conftest import require_shared, tokenizer_dir  # noqa: E402  (the script above needs none of this)

from plw_data.errors import ConfigError, PLWError  # noqa: E402
from plw_data.prepare.verify import verify  # noqa: E402


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """(prepare arguments without --output, reference DIR from an uninterrupted in-process run)."""
    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare.pipeline import prepare

    tmp = tmp_path_factory.mktemp("crash")
    src = tmp / "race.jsonl"
    with gzip.open(require_shared("race/train.jsonl.gz"), "rt") as f:
        src.write_text("".join(next(f) for _ in range(N_ROWS)))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE)
    tok = str(tokenizer_dir("smollm2-135m-instruct"))
    ref = tmp / "ref"
    prepare([str(src)], build_config(DataConfig, load_recipe(recipe), {"tokenizer": tok}), ref, progress=False)
    return ["prepare", str(src), "--tokenizer", tok, "--recipe", str(recipe), "-q"], ref


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "plw_data.cli.main", *args]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != "run.json"}


def _kill_while_staging(cmd: list[str], out: Path) -> subprocess.CompletedProcess:
    """SIGKILL from outside once the first encoded batch reached the staging file."""
    staged = out / TMP / "stage-train" / "ids.bin"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if staged.exists() and staged.stat().st_size > 0:
            proc.kill()
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_killed_prepare_reruns_to_identical_bytes(job: tuple[list[str], Path], tmp_path: Path) -> None:
    args, ref = job
    out = tmp_path / "out"
    cmd = [*args, "--output", str(out)]
    script = str(Path(__file__).resolve())
    # Each run starts from the wreck the previous kill left, so each must also recover from it.
    kills = {
        "staging (external)": (lambda: _kill_while_staging(_cli(*cmd), out),
                               lambda: (out / TMP / "stage-train" / "ids.bin").stat().st_size > 0),
        "between install moves": (lambda: subprocess.run([sys.executable, script, "install:2", *cmd], capture_output=True, text=True),
                                  lambda: len({p.name for p in out.iterdir()} - {TMP}) == 1),
        "before the manifest": (lambda: subprocess.run([sys.executable, script, "manifest", *cmd], capture_output=True, text=True),
                                lambda: {p.name for p in out.iterdir()} >= {"train", "eval", "dropped.jsonl", "run.json"}),
    }
    for point, (run, left_as_expected) in kills.items():
        killed = run()
        assert killed.returncode == -signal.SIGKILL, f"kill {point}: exit {killed.returncode}: {killed.stderr}"
        assert not (out / "manifest.json").exists(), f"kill {point}: a manifest marks an incomplete DIR complete"
        assert left_as_expected(), f"kill {point}: DIR holds {sorted(str(p.relative_to(out)) for p in out.rglob('*'))}"
    done = subprocess.run(_cli(*cmd), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _files(out).keys() == _files(ref).keys() and not (out / TMP).exists()
    assert _files(out) == _files(ref)
    assert verify(out)[-2].startswith(f"coverage: example_index over all splits plus dropped.jsonl is each of the {N_ROWS}")


def test_crashed_overwrite_keeps_the_old_dir_or_marks_it_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite with another config, crashed: before the install the old DIR is intact and verifies;
    during the install its manifest is gone, so nothing trusts the mix, and a plain re-run rebuilds it."""
    from plw_data.prepare import shards
    from plw_data.config import DataConfig, build_config
    from plw_data.prepare.pipeline import prepare

    src = tmp_path / "race.jsonl"
    with gzip.open(require_shared("race/train.jsonl.gz"), "rt") as f:
        src.write_text("".join(next(f) for _ in range(40)))
    base = {"tokenizer": str(tokenizer_dir("smollm2-135m-instruct")), "prompt_template": "{article}\n{question}\n{options}",
            "completion_template": "{answer}", "eval_fraction": 0.1, "shard_tokens": 4000}
    old, new = (build_config(DataConfig, {}, {**base, "max_length": n}) for n in (2048, 1024))
    out = tmp_path / "out"
    prepare([str(src)], old, out, progress=False)
    before = _files(out)

    class Crash(Exception):
        pass

    def crash() -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(shards, "_record_batch", _at_call(3, shards._record_batch, crash))  # inside the 3rd shard
        with pytest.raises(Crash):
            prepare([str(src)], new, out, overwrite=True, progress=False)
    assert any(p.name.endswith(".arrow.tmp") for p in (out / TMP / "train").iterdir())
    assert {k: v for k, v in _files(out).items() if not k.startswith(TMP)} == before
    verify(out)  # the old data, untouched and still complete
    with pytest.raises(ConfigError, match="another config"):
        prepare([str(src)], new, out, progress=False)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", _at_call(2, os.replace, crash, _installing))
        with pytest.raises(Crash):
            prepare([str(src)], new, out, overwrite=True, progress=False)
    assert not (out / "manifest.json").exists() and (out / TMP).is_dir()
    with pytest.raises(PLWError, match="manifest.json: missing"):
        verify(out)
    prepare([str(src)], new, out, progress=False)  # the same command, without --overwrite: rebuilt
    prepare([str(src)], new, tmp_path / "clean", progress=False)
    assert _files(out) == _files(tmp_path / "clean") and not (out / TMP).exists()
    verify(out)
