"""Shared by tests/test_hostile_*.py: tiny inputs, an in-process CLI run, and the one-line-error check."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tokenizer_dir
from typer.testing import CliRunner

TOK = "smollm2-135m-instruct"


def tok() -> str:
    return str(tokenizer_dir(TOK))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int = 6) -> list[dict]:
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]


QA = ["--prompt-template", "{question}", "--completion-template", "{answer}", "--max-length", "256"]


def cli(*args: str, app: str = "main"):
    """Run `plw-data ARGS` (or plw-train with app='train') in-process; returns click's Result."""
    if app == "main":
        from plw_data.cli.main import app as typer_app
    else:
        from plw_data.cli.train import app as typer_app
    return CliRunner().invoke(typer_app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """Assert exit 2 with exactly one `error:` line on stderr containing every needle; no traceback."""
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def read_dropped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
