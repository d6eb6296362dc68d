"""Kept / refused rows per shared chat template on the shared multi-turn data (docs/chat.md).

Every template under ../shared/data/chat_templates is set on one tokenizer (its special tokens only
change token boundaries, not whether a row renders) and the rows are encoded as `plw-data prepare`
would; the report counts kept rows and drop reasons per template, on three sets:
- shared: the first 200 rows of uniner_eval_multiturn_by_passage and the 500 fastchat rows (sharegpt);
- shared+tools: the same rows with one tool list for every row (--tools; only where the code has it);
- crafted: CRAFTED below, written for this report: one row per case the issue names.

    PYTHONPATH=. python analysis/templates_report.py --json after.json
    python analysis/templates_report.py --compare before.json after.json   # markdown table
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INPUTS = [("conversations/uniner_eval_multiturn_by_passage.jsonl.gz", 200), ("conversations/fastchat_dummy_conversation.json", None)]
TOKENIZER = "llama-3-instruct"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}}]
U = lambda text: {"role": "user", "content": text}
A = lambda text, **kw: {"role": "assistant", "content": text, **kw}
CRAFTED = [
    {"messages": [U("Hi"), A("Hello!"), U("And?"), A("Bye.")]},  # plain
    {"messages": [U("para one\n\npara two"), A("ans one\n\nans two")]},  # blank lines
    {"messages": [{"role": "system", "content": ""}, U("Q"), A("A")]},  # empty system prompt
    {"messages": [U("Q1"), U("Q2"), A("A")]},  # consecutive user turns
    {"messages": [{"role": "system", "content": "S\n"}, U("\nU"), A("A")]},  # whitespace-only separator
    {"messages": [U("2+2?"), A("<think>\nAdd.\n</think>\n\n4."), U("3+3?"), A("<think>\nAgain.\n</think>\n\n6.")]},
    {"messages": [U("Capital of France?"), A("Paris.", reasoning_content="It is Paris.")]},  # reasoning field
    {"tools": TOOLS, "messages": [U("Weather in Paris?"), A(None, tool_calls=[{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]),
     {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"}, A("21 degrees.")]},
]  # fmt: skip


def measure(tmp: Path) -> dict[str, dict]:
    import dataclasses

    from plw_data.config import DataConfig
    from plw_data.prepare.encode import Encoder
    from plw_data.prepare.formats import convert, iter_conversations
    from plw_data.prepare.sources import RawRow
    from plw_data.tokenizer import load_tokenizer

    base = load_tokenizer(str(DATA / "tokenizers" / TOKENIZER))
    sets: dict[str, list] = {}
    for name, extra in (("shared", {}), ("shared+tools", {"tools": str(tmp)})):
        if any(k not in {f.name for f in dataclasses.fields(DataConfig)} for k in extra):
            continue  # this version of the code has no such option
        cfg = DataConfig(tokenizer=TOKENIZER, format="sharegpt", max_length=1_000_000, **extra)
        items: list = []
        for rel, n in INPUTS:
            rows = itertools.islice(iter_conversations([str(DATA / rel)], cfg, start_index=len(items)), n)
            items += [(raw.index, raw.file, raw.row, conv) for raw, conv in rows]
        sets[name] = [cfg, items]
    cfg = DataConfig(tokenizer=TOKENIZER, format="messages", max_length=1_000_000)
    sets["crafted"] = [cfg, [(i, "crafted", i, convert(RawRow(i, "crafted", i, row), cfg)) for i, row in enumerate(CRAFTED)]]
    report: dict[str, dict] = {}
    for path in sorted((DATA / "chat_templates").rglob("*.jinja")):
        tok = copy.copy(base)
        tok.chat_template = path.read_text(encoding="utf-8")
        entry = report[str(path.relative_to(DATA / "chat_templates"))] = {}
        for name, (cfg, items) in sets.items():
            encoder = Encoder(tok, cfg)
            batch = encoder.encode(items)
            reasons = Counter(err.reason for *_, err in batch.dropped)
            entry[name] = {"rows": len(items), "kept": len(set(batch.example_index.tolist())), "dropped": dict(reasons),
                           "inexact": _inexact(encoder, items, batch)}
    return report


def _inexact(encoder, items: list, batch) -> int:
    try:
        from plw_data.prepare.skeleton import fixed_clock
    except ImportError:  # older code: no fixed clock
        fixed_clock = None
    """Kept rows (one example each) whose ids differ from apply_chat_template(messages, tools=...)."""
    convs = {i: conv for i, _, _, conv in items}
    index = batch.example_index.tolist()
    bounds = np.concatenate(([0], np.cumsum(batch.lengths)))
    clock = getattr(encoder, "day", None) if fixed_clock else None
    bad = 0
    for k, i in enumerate(index):
        if index.count(i) > 1:
            continue  # per-turn examples: not one rendering of the whole conversation
        conv = convs[i]
        kw = {"tools": conv.tools} if getattr(conv, "tools", None) is not None else {}
        with fixed_clock(clock) if clock else contextlib.nullcontext():
            text = encoder.tok.apply_chat_template(list(conv.messages), tokenize=False, **kw)
        ids = encoder.backend.encode(text, add_special_tokens=False).ids
        bad += ids != batch.input_ids[bounds[k] : bounds[k + 1]].tolist()
    return bad


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    why = ", ".join(f"{r} {n}" for r, n in sorted(entry["dropped"].items(), key=lambda x: -x[1]))
    inexact = f", {entry['inexact']} kept not equal to apply_chat_template" if entry.get("inexact") else ""
    return f"{entry['kept']}/{entry['rows']}" + (f" ({why}{inexact})" if why or inexact else "")


def compare(before: dict, after: dict) -> str:
    names = ("shared", "shared+tools", "crafted")
    head = " | ".join(f"{n} before | {n} after" for n in names)
    lines = [f"| template | {head} |", "|---" * (1 + 2 * len(names)) + "|"]
    for t in sorted(set(before) | set(after)):
        cells = " | ".join(f"{_cell(before.get(t, {}).get(n))} | {_cell(after.get(t, {}).get(n))}" for n in names)
        lines.append(f"| {t} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the per-template counts here")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="print a markdown table of two reports")
    args = ap.parse_args()
    if args.compare:
        print(compare(*(json.loads(p.read_text()) for p in args.compare)))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tools = Path(d) / "tools.json"
        tools.write_text(json.dumps(TOOLS))
        report = measure(tools)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
