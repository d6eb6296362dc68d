"""The row invariants `verify` checks in each shard: schema, one category per token, example
lengths, ids in the vocabulary, optional columns; streamed batch by batch with vectorised numpy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import schema as S
from ..errors import PLWError

MASKS = (S.PROMPT_MASK, S.COMPLETION_MASK, S.TEMPLATE_MASK)
TOTALS = S.SPLIT_TOTALS

# -- rows --------------------------------------------------------------------------------------


def shard_columns(path: Path) -> tuple[str, ...]:
    """The optional columns of a shard, after checking its schema is the required columns plus
    optional ones in schema order, with their types."""
    try:
        with pa.memory_map(str(path), "r") as source:
            schema = pa.ipc.open_stream(source).schema
    except pa.ArrowException as e:
        raise PLWError(f"{path}: not a readable Arrow IPC stream: {e}") from None
    optional = tuple(n for n in schema.names[len(S.SCHEMA) :] if n in S.OPTIONAL_COLUMNS)
    expected = S.schema_with(optional)
    if schema.names != expected.names:
        allowed = [*S.SCHEMA.names, f"optional {', '.join(S.OPTIONAL_COLUMNS)}"]
        raise PLWError(f"{path}: columns {schema.names}, expected {allowed} in that order")
    for field in expected:
        got = schema.field(field.name).type
        if got != field.type:
            raise PLWError(f"{path}: column {field.name}: type {got}, expected {field.type}")
    return optional


def shard_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """One shard's record batches, memory-mapped (schema checked by :func:`shard_columns`)."""
    try:
        with pa.memory_map(str(path), "r") as source:
            yield from pa.ipc.open_stream(source)
    except pa.ArrowException as e:
        raise PLWError(f"{path}: not a readable Arrow IPC stream: {e}") from None


def _row_of(offsets: np.ndarray, position: int) -> tuple[int, int]:
    """(row, position within the row) of a flat value position."""
    row = int(np.searchsorted(offsets, position, side="right")) - 1
    return row, position - int(offsets[row])


def check_batch(batch: pa.RecordBatch, where: str, row0: int, *, max_length: int, packed: bool,
                vocab_size: int, n_sources: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row invariants of one record batch; returns (totals [tokens, p, c, t, reasoning], example_index)."""

    def fail(row: int, column: str, what: str) -> PLWError:
        return PLWError(f"{where}: row {row0 + row}, column {column}: {what}")

    lengths, flat = {}, {}
    for name in batch.schema.names:
        col = batch.column(name)
        values = col.flatten()
        offsets = col.offsets.to_numpy().astype(np.int64)
        if col.null_count and name != S.MESSAGE_WEIGHT:  # a null message_weight row means "all 1"
            raise fail(int(np.argmax(col.is_null().to_numpy(zero_copy_only=False))), name, "null list")
        if values.null_count:
            r, k = _row_of(offsets - offsets[0], int(np.argmax(values.is_null().to_numpy(zero_copy_only=False))))
            raise fail(r, name, f"value {k} is null")
        lengths[name] = np.diff(offsets)
        flat[name] = values.to_numpy(zero_copy_only=False)
    n_tok, n_seq = lengths[S.INPUT_IDS], lengths[S.SEQ_LENGTHS]
    for name in lengths:
        ref = S.INPUT_IDS if name in S.TOKEN_COLUMNS else S.SEQ_LENGTHS
        got = lengths[name]
        if name == S.MESSAGE_WEIGHT:  # null rows hold no values
            got = np.where(batch.column(name).is_null().to_numpy(zero_copy_only=False), lengths[ref], got)
        bad = np.flatnonzero(got != lengths[ref])
        if len(bad):
            r = int(bad[0])
            raise fail(r, name, f"{lengths[name][r]} values, {ref} has {lengths[ref][r]}")
    for bad, column, what in (
        (n_tok < 1, S.INPUT_IDS, "empty row"),
        (n_tok > max_length, S.INPUT_IDS, f"longer than max_length {max_length}"),
        (n_seq < 1, S.SEQ_LENGTHS, "no example"),
        ((n_seq > 1) & (not packed), S.SEQ_LENGTHS, "several examples in an unpacked split"),
    ):
        if bad.any():
            r = int(np.argmax(bad))
            raise fail(r, column, f"{what} ({n_tok[r]} tokens, {n_seq[r]} examples)")
    seq = flat[S.SEQ_LENGTHS].astype(np.int64)
    seq_off = np.concatenate(([0], np.cumsum(n_seq)))
    if (seq < 1).any():
        r, k = _row_of(seq_off, int(np.argmax(seq < 1)))
        raise fail(r, S.SEQ_LENGTHS, f"entry {k} is {seq[seq_off[r] + k]}; every example has at least one token")
    csum = np.concatenate(([0], np.cumsum(seq)))
    sums = csum[seq_off[1:]] - csum[seq_off[:-1]]
    bad = np.flatnonzero(sums != n_tok)
    if len(bad):
        r = int(bad[0])
        raise fail(r, S.SEQ_LENGTHS, f"sums to {sums[r]}, but the row has {n_tok[r]} tokens")
    tok_off = np.concatenate(([0], np.cumsum(n_tok)))
    p, c, t = (flat[name].astype(np.int16) for name in MASKS)
    bad = np.flatnonzero(p + c + t != 1)  # non-negative integers summing to 1: exactly one mask is 1
    if len(bad):
        pos = int(bad[0])
        r, k = _row_of(tok_off, pos)
        masks = ", ".join(f"{name}={v[pos]}" for name, v in zip(MASKS, (p, c, t)))
        raise fail(r, "/".join(MASKS), f"token {k} has {masks}; exactly one must be 1")
    ids = flat[S.INPUT_IDS]
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if len(bad):
        r, k = _row_of(tok_off, int(bad[0]))
        raise fail(r, S.INPUT_IDS, f"token {k} is id {ids[bad[0]]}, outside the vocabulary [0, {vocab_size})")
    reasoning = _check_optional(flat, tok_off, c, n_sources, fail)
    totals = np.array([len(ids), p.sum(), c.sum(), t.sum(), reasoning], np.int64)
    return totals, flat[S.EXAMPLE_INDEX].astype(np.int64)


def _check_optional(flat: dict[str, np.ndarray], tok_off: np.ndarray, completion: np.ndarray, n_sources: int,
                    fail: Any) -> int:
    """Invariants of the optional columns present; returns the number of reasoning tokens."""
    reasoning = 0
    if S.REASONING_MASK in flat:
        r = flat[S.REASONING_MASK].astype(np.int16)
        bad = np.flatnonzero((r > 1) | (r > completion))
        if len(bad):
            row, k = _row_of(tok_off, int(bad[0]))
            raise fail(row, S.REASONING_MASK, f"token {k} is {r[bad[0]]}: reasoning tokens are completion tokens (0/1)")
        reasoning = int(r.sum())
    if S.MESSAGE_WEIGHT in flat:
        w = flat[S.MESSAGE_WEIGHT]
        bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
        if len(bad):
            raise fail(0, S.MESSAGE_WEIGHT, f"value {w[bad[0]]} at position {int(bad[0])}: weights are finite and >= 0")
    if S.SOURCE_INDEX in flat:
        src = flat[S.SOURCE_INDEX].astype(np.int64)
        bad = np.flatnonzero((src < 0) | (src >= n_sources))
        if len(bad):
            raise fail(0, S.SOURCE_INDEX, f"source {src[bad[0]]} is not one of the manifest's {n_sources} sources")
    return reasoning


def check_split(folder: Path, split: dict[str, Any], vocab_size: int, *, n_sources: int = 0,
                columns: list[tuple[str, ...]] | None = None) -> np.ndarray:
    """Stream a split's shards through check_batch; totals must equal the manifest. Returns its example_index.

    ``columns``: the optional columns of the DIR's first shard seen so far (one schema per DIR)."""
    totals = np.zeros(5, np.int64)
    rows = 0
    indices: list[np.ndarray] = []
    columns = [] if columns is None else columns
    for sh in split["shards"]:
        path = folder / sh["file"]
        optional = shard_columns(path)
        if columns and optional != columns[0]:
            raise PLWError(f"{path}: optional columns {list(optional)}, but other shards have {list(columns[0])}")
        columns.append(optional)
        shard_rows = 0
        for batch in shard_batches(path):
            t, idx = check_batch(batch, str(path), shard_rows, max_length=split["max_length"], packed=split["packed"],
                                 vocab_size=vocab_size, n_sources=n_sources)
            totals += t
            indices.append(idx)
            shard_rows += batch.num_rows
        if shard_rows != sh["rows"]:
            raise PLWError(f"{path}: {shard_rows} rows, manifest says {sh['rows']}")
        rows += shard_rows
    example_index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    actual = dict(zip((*TOTALS, "reasoning_tokens"), [rows, len(example_index), *totals.tolist()]))
    for key in (*TOTALS, "reasoning_tokens"):
        if key in split and actual[key] != split[key]:
            raise PLWError(f"{folder}: {key} is {actual[key]}, manifest says {split[key]}")
    return example_index
