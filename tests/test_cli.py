"""The CLI is generated from the config dataclasses: every field has its flag, and help stays cheap."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from conftest import REPO, require_shared, tokenizer_dir
from plw_data.config import DataConfig
from plw_data.rg.report import RgOptions
from plw_data.train.config import TrainConfig


def _flags(command) -> dict[str, list[str]]:
    """Parameter name -> its option strings (both spellings of a bool switch), from the click command."""
    return {p.name: [*p.opts, *p.secondary_opts] for p in command.params}


def _expected(cls: type, skip=lambda f: False) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not skip(f)]


def _assert_every_field_has_its_flag(command, names: list[str]) -> None:
    flags = _flags(command)
    missing = [n for n in names if "--" + n.replace("_", "-") not in flags.get(n, [])]
    assert not missing, f"{command.name}: fields without a flag: {missing}"


def _data_commands():
    from plw_data.cli.main import app

    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_prepare_has_a_flag_for_every_data_config_field():
    _assert_every_field_has_its_flag(_data_commands()["prepare"], _expected(DataConfig))


def test_rg_stats_has_a_flag_for_every_rendering_field_and_every_rg_option():
    rg = _data_commands()["rg-stats"]
    rendering = _expected(DataConfig, skip=lambda f: f.metadata.get("group") == "prepare" or f.name == "split")
    _assert_every_field_has_its_flag(rg, rendering + _expected(RgOptions))
    # prepare-only fields (packing, splits, sharding) are not rg-stats options
    assert not {f.name for f in dataclasses.fields(DataConfig) if f.metadata.get("group") == "prepare"} & set(_flags(rg))


def test_plw_train_has_a_flag_for_every_train_config_field():
    from plw_data.cli.train import app

    _assert_every_field_has_its_flag(typer.main.get_command(app), _expected(TrainConfig))


def test_prepare_help_names_the_argument_and_shows_only_real_defaults():
    from plw_data.cli.main import app

    result = CliRunner().invoke(app, ["prepare", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "INPUTS" in result.output and "{inputs}" not in result.output
    (line,) = [line for line in result.output.splitlines() if "--chat-template" in line and "--chat-template-file" not in line]
    assert "default: off" not in line and "default: on" not in line  # None: when the tokenizer has one
    (line,) = [line for line in result.output.splitlines() if "--pack " in line]
    assert "[default: on]" in line


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)


def test_python_m_plw_data_version():
    from plw_data import __version__

    proc = _run(["-m", "plw_data", "--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"plw-data {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["prepare", "--help"], ["rg-stats", "--help"]])
def test_help_imports_no_torch(args):
    """Help must stay instant: the heavy libraries are imported only when a command runs."""
    code = (
        "import sys\n"
        "from plw_data.cli.main import app\n"
        f"try:\n    app({args!r}, prog_name='plw-data')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_optional_value_flags_follow_the_documented_spelling(tmp_path):
    """`--chat-template FILE|DIR` and a bare `--ray` (docs/prepare.md, docs/ray.md) reach the config."""
    from plw_data.cli.main import optional_values

    assert optional_values(["prepare", "x.jsonl", "--chat-template", "t.jinja", "-o", "o"]) == [
        "prepare", "x.jsonl", "--chat-template-file", "t.jinja", "-o", "o"]
    assert optional_values(["--chat-template", "x.jsonl"]) == ["--chat-template", "x.jsonl"]  # the switch, then an input
    assert optional_values(["--chat-template", str(tmp_path)]) == ["--chat-template-file", str(tmp_path)]
    assert optional_values(["--ray", "--num-shards", "2"]) == ["--ray", "local", "--num-shards", "2"]
    assert optional_values(["--num-shards", "2", "--ray"]) == ["--num-shards", "2", "--ray", "local"]
    assert optional_values(["--ray", "10.0.0.1:6379"]) == ["--ray", "10.0.0.1:6379"]


def test_chat_template_file_on_the_command_line(tmp_path):
    import json

    template = require_shared("chat_templates/chujiezheng/zephyr.jinja")
    rows = [{"messages": [{"role": "user", "content": f"Say {k}."}, {"role": "assistant", "content": f"{k}."}]} for k in range(4)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = _run(["-m", "plw_data", "prepare", str(src), "--format", "messages", "--tokenizer", str(tokenizer_dir("smollm2-135m-instruct")),
              "--chat-template", str(template), "--output", str(out), "-q"])
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["chat_template_file"] == str(template) and m["counts"]["kept"] == 4
    assert _run(["-m", "plw_data", "verify", str(out)]).returncode == 0


def test_plw_train_asks_for_huge_page_tensors_before_torch_loads():
    """PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: the command must set it before
    anything imports torch, and keep a value the user set."""
    code = (
        "import os, sys\n"
        "import plw_data.config as c\n"
        "def stop(*args, **kwargs):\n"
        "    print('THP', os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch loaded' if 'torch' in sys.modules else 'no torch')\n"
        "    raise SystemExit(0)\n"
        "c.load_recipe = stop\n"
        "from plw_data.cli.train import app\n"
        "app(['--model', 'm', '--data', 'd', '--output', 'o'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for extra, want in (({}, "THP 1 no torch"), ({"THP_MEM_ALLOC_ENABLE": "0"}, "THP 0 no torch")):
        proc = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert want in proc.stdout, proc.stdout + proc.stderr[-2000:]
