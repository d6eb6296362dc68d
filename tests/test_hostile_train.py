"""plw-train refuses a prepared DIR that `plw-data verify` refuses, with the same message; nothing
taken from a manifest runs code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hostile_helpers import QA, cli, one_line_error, qa_rows, tok, write_jsonl


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("prepared")
    src = write_jsonl(base / "qa.jsonl", [*qa_rows(12), {"question": "no answer"}])
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--eval-fraction", "0.25", "--output", base / "dir")
    assert r.exit_code == 0, r.output
    return base / "dir"


def _shard(d: Path) -> Path:
    return next((d / "train").glob("*.arrow"))


def _flip_byte(d: Path) -> None:
    p = _shard(d)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _killed_mid_install(d: Path) -> None:
    (d / "manifest.json").unlink()
    (d / ".plw-tmp").mkdir()


TAMPERINGS = {
    "flipped byte": (_flip_byte, "sha256"),
    "cut shard": (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-10]), "bytes, manifest says"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
    "killed mid-install": (_killed_mid_install, "manifest.json: missing"),
    "edited counts": (lambda d: _edit_manifest(d, lambda m: m["counts"].update(kept=m["counts"]["kept"] + 1)), "counts"),
    "edited dropped.jsonl": (lambda d: (d / "dropped.jsonl").write_text(""), "dropped.jsonl"),
    "edited shard rows": (lambda d: _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][0].update(rows=99)), "rows"),
}


def _train(d: Path, tmp_path: Path, *extra: str):
    return cli("--model", tmp_path / "no-model-needed", "--data", d, "--output", tmp_path / "run", "--no-progress",
               *extra, app="train")


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_train_refuses_tampered_data_with_the_verify_message(prepared: Path, tmp_path: Path, case: str) -> None:
    d = tmp_path / "dir"
    shutil.copytree(prepared, d)
    tamper, needle = TAMPERINGS[case]
    tamper(d)
    expected = one_line_error(cli("verify", d), needle)
    assert one_line_error(_train(d, tmp_path)) == expected
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_verify_data_skips_sha256_but_not_sizes(prepared: Path, tmp_path: Path) -> None:
    d = tmp_path / "dir"
    shutil.copytree(prepared, d)
    r = _train(d, tmp_path, "--no-verify-data")  # clean data: gets past the data, fails on the model
    assert r.exit_code != 0 and "no-model-needed" in r.output and "manifest" not in r.output
    _flip_byte(d)
    r = _train(d, tmp_path, "--no-verify-data")
    assert "sha256" not in r.output and "no-model-needed" in r.output
    _shard(d).write_bytes(_shard(d).read_bytes()[:-1])
    one_line_error(_train(d, tmp_path, "--no-verify-data"), "bytes, manifest says")


def test_eval_data_of_another_dir_is_verified_too(prepared: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    (other / "manifest.json").unlink()
    one_line_error(_train(prepared, tmp_path, "--eval-data", other / "eval"), f"{other}/manifest.json: missing")


def test_verify_never_runs_code_named_by_the_manifest(prepared: Path, tmp_path: Path) -> None:
    evil = tmp_path / "evil-tokenizer"
    shutil.copytree(tok(), evil)
    marker = tmp_path / "code-ran"
    (evil / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((evil / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    (evil / "tokenizer_config.json").write_text(json.dumps(cfg))
    d = tmp_path / "dir"
    shutil.copytree(prepared, d)
    _edit_manifest(d, lambda m: (m["config"].update(trust_remote_code=True), m["tokenizer"].update(name_or_path=str(evil))))
    cli("verify", d)
    _train(d, tmp_path)
    assert not marker.exists()
