"""`plw-data inspect`: one prepared row, coloured by what will be trained.

Text is decoded per run of same-category tokens (not per token), so multi-byte characters split
across byte-fallback tokens still read correctly; `--ids` lists the tokens one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import schema as S
from ..errors import ConfigError, PLWError
from ..schema import CATEGORY_NAMES, COMPLETION, PROMPT, REASONING, TEMPLATE

TOOL_CALL = -1  # display only: a completion run that holds a tool call
STYLES = {TEMPLATE: "dim magenta", PROMPT: "cyan", COMPLETION: "bold green", REASONING: "italic green", TOOL_CALL: "bold yellow"}
NAMES = {**dict(enumerate(CATEGORY_NAMES)), REASONING: "reasoning", TOOL_CALL: "tool call"}
#: Markers that chat templates put around a tool call; a completion run holding one is shown as a tool call.
TOOL_MARKERS = ("<tool_call>", "<｜tool▁calls▁begin｜>", "[TOOL_CALLS]", "<|python_tag|>", "<|tool_call|>", "functools[")


def read_row(directory: Path, split: str, index: int) -> dict[str, np.ndarray]:
    """Row `index` of a prepared split as numpy arrays."""
    folder = Path(directory) / split
    if not (folder / S.STATE).exists():
        raise ConfigError(f"{folder}: no such prepared split")
    if index < 0:
        raise ConfigError(f"--index must be >= 0 (rows are counted from 0), got {index}")
    seen = 0
    try:
        for batch in S.iter_record_batches(folder):
            if index < seen + batch.num_rows:
                row = batch.slice(index - seen, 1).to_pylist()[0]
                return {k: np.asarray(v) for k, v in row.items()}
            seen += batch.num_rows
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise PLWError(f"{folder}: unreadable ({type(e).__name__}: {e}); run plw-data verify {directory}") from None
    raise ConfigError(f"{folder}: --index {index} out of range (the split has {seen} rows)")


def _runs(cats: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of maximal runs of equal category."""
    cuts = np.flatnonzero(np.diff(cats)) + 1
    bounds = np.concatenate(([0], cuts, [len(cats)]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def render_row(directory: Path, split: str, index: int, *, show_ids: bool = False, tokenizer: str | None = None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ..tokenizer import load_tokenizer

    from .verify import load_manifest

    manifest = load_manifest(Path(directory))  # present and complete: no KeyError below
    tok = load_tokenizer(tokenizer or manifest["tokenizer"]["name_or_path"])
    row = read_row(directory, split, index)
    ids, cats = row[S.INPUT_IDS], S.categories(row[S.PROMPT_MASK], row[S.COMPLETION_MASK])
    if S.REASONING_MASK in row and row[S.REASONING_MASK] is not None and len(row[S.REASONING_MASK]) == len(ids):
        cats = np.where(row[S.REASONING_MASK].astype(bool), REASONING, cats)
    legend = Text.assemble(
        f"{split}[{index}]: {len(ids)} tokens, {len(row[S.SEQ_LENGTHS])} example(s)   ",
        *[(f" {NAMES[c]} ", STYLES[c] + " reverse") for c in (PROMPT, COMPLETION, REASONING, TOOL_CALL, TEMPLATE)],
    )
    parts: list[Any] = [legend]
    start = 0
    for length, example in zip(row[S.SEQ_LENGTHS].tolist(), row[S.EXAMPLE_INDEX].tolist()):
        end = start + length
        counts = np.bincount(cats[start:end], minlength=4)
        header = (
            f"── example {example}: tokens {start}..{end - 1}  "
            f"(prompt {counts[PROMPT]}, completion {counts[COMPLETION] + counts[REASONING]}"
            + (f" of which reasoning {counts[REASONING]}" if counts[REASONING] else "")
            + f", template {counts[TEMPLATE]}) ──"
        )
        body = Text()
        for a, b in _runs(cats[start:end]):
            text = tok.decode(ids[start + a : start + b].tolist())
            cat = int(cats[start + a])
            if cat == COMPLETION and any(m in text for m in TOOL_MARKERS):
                cat = TOOL_CALL
            body.append(text, style=STYLES[cat])
        parts += [Text(header, style="bold"), body]
        if show_ids:
            table = Table("pos", "id", "token", "category", box=None)
            for p in range(start, end):
                table.add_row(str(p), str(int(ids[p])), repr(tok.convert_ids_to_tokens(int(ids[p]))), NAMES[int(cats[p])])
            parts.append(table)
        start = end
    return Group(*parts)
