"""Bounded work: a killed encoding process is reported (exit 2, nothing written), a chat template
that loops or builds a huge string drops its row as template_error within the time limit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_helpers import QA, qa_rows, read_dropped, tok, write_jsonl

from plw_data.config import DataConfig
from plw_data.prepare import limits
from plw_data.prepare.pipeline import prepare

REPO = Path(__file__).resolve().parents[1]
BOMBS = (
    "{% if messages[0]['content'] == 'LOOP' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}{% endif %}"
    "{% if messages[0]['content'] == 'HUGE' %}{{ 'x' * 1000000000 }}{% endif %}"
    "{% if messages[0]['content'] == 'WIDE' %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endif %}"
    "{% if messages[0]['content'] == 'POW' %}{{ 10 ** 100000000 }}{% endif %}"
)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_a_killed_worker_is_reported_and_nothing_is_written(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20_000))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "plw_data", "prepare", str(src), "--tokenizer", tok(), *QA, "--num-proc", "2",
           "--batch-size", "50", "--output", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
        workers = [k for k in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        time.sleep(0.05)
    time.sleep(0.5)  # while they start or encode: a death at either point breaks the pool
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("prepare hung after a worker was killed")
    assert proc.returncode == 2, err
    assert "encoding process died" in err and "Traceback" not in err
    assert not out.exists()


def _bomb_tokenizer(tmp_path: Path) -> Path:
    folder = tmp_path / "bomb-tokenizer"
    shutil.copytree(tok(), folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = BOMBS + cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_template_bombs_drop_their_row_within_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "TEMPLATE_SECONDS", 1.0)
    rows = [{"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "ok"}]}
            for c in ("hello", "LOOP", "HUGE", "WIDE", "POW", "bye")]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(tokenizer=str(_bomb_tokenizer(tmp_path)), format="messages", max_length=128)
    t0 = time.perf_counter()
    m = prepare([str(src)], cfg, tmp_path / "out", progress=False)
    assert time.perf_counter() - t0 < 60
    dropped = {d["index"]: d for d in read_dropped(tmp_path / "out")}
    assert {i: d["reason"] for i, d in dropped.items()} == {1: "template_error", 2: "template_error",
                                                            3: "template_error", 4: "template_error"}
    assert "took over 1s" in dropped[1]["detail"] and "characters" in dropped[2]["detail"]
    assert m["counts"]["kept"] == 2


def test_limits_change_nothing_for_ordinary_rendering() -> None:
    from conftest import load_tokenizer

    t = load_tokenizer("smollm2-135m-instruct")
    msgs = [{"role": "user", "content": "x" * 3}, {"role": "assistant", "content": "y" * 1000}]
    cfg = DataConfig(max_length=64)
    assert limits.render_chat_template(t, msgs, cfg) == t.apply_chat_template(msgs, tokenize=False)
    assert t.apply_chat_template([{"role": "user", "content": "z" * 100_000}], tokenize=False).count("z") == 100_000
