"""Arrow shards: staged examples in, `datasets.load_from_disk`-compatible split folders out.

Examples are first staged on disk (flat int32 ids + uint8 categories, memory-mapped), so a split
never needs all its token ids in memory: packing plans on lengths, then each shard gathers its
tokens with one vectorised index. Shards are Arrow IPC streams written under a temporary name,
fsynced and renamed, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import schema as S
from ..schema import COMPLETION, PROMPT, REASONING, TEMPLATE
from .encoded import CountsBatch, EncodedBatch
from .pack import PackPlan

ROWS_PER_BATCH = 256  # rows per Arrow record batch; also bounds the staging pages one gather maps


class Stage:
    """Append-only on-disk store of encoded examples; read back memory-mapped.

    Per-message weights are staged only once some example has them (earlier tokens get weight 1
    then), so data without weights pays nothing for them."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._ids = (folder / "ids.bin").open("wb")
        self._cats = (folder / "cats.bin").open("wb")
        self._weights = None  # opened at the first weighted batch
        self._tokens = 0
        self._lengths: list[np.ndarray] = []
        self._index: list[np.ndarray] = []
        self._sources: list[np.ndarray] = []
        self.has_reasoning = False

    def append(self, batch: EncodedBatch) -> None:
        self._ids.write(batch.input_ids.astype(np.int32, copy=False).tobytes())
        self._cats.write(batch.category.astype(np.uint8, copy=False).tobytes())
        if batch.weight is not None and self._weights is None:
            self._weights = (self.folder / "weights.bin").open("wb")
            self._weights.write(np.ones(self._tokens, np.float32).tobytes())
        if self._weights is not None:
            w = batch.weight if batch.weight is not None else np.ones(len(batch.input_ids), np.float32)
            self._weights.write(w.astype(np.float32, copy=False).tobytes())
        self.has_reasoning = self.has_reasoning or bool((batch.category == REASONING).any())
        self._tokens += len(batch.input_ids)
        self._lengths.append(batch.lengths)
        self._index.append(batch.example_index)
        if batch.source is not None:
            self._sources.append(batch.source)
        elif self._sources:
            raise ValueError("a batch without sources after batches with them")

    def close(self) -> StagedExamples:
        for f in (self._ids, self._cats, self._weights):
            if f is not None:
                f.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        index = np.concatenate(self._index) if self._index else np.zeros(0, np.int64)
        total = int(lengths.sum())
        mm = lambda name, dt: np.memmap(self.folder / name, dt, "r", shape=(total,)) if total else np.zeros(0, dt)
        return StagedExamples(
            mm("ids.bin", np.int32),
            mm("cats.bin", np.uint8),
            lengths,
            index,
            weight=mm("weights.bin", np.float32) if self._weights is not None else None,
            source=np.concatenate(self._sources).astype(np.int16) if self._sources else None,
            has_reasoning=self.has_reasoning,
        )


@dataclass
class StagedExamples:
    input_ids: np.ndarray  # int32 [T], memory-mapped
    category: np.ndarray  # uint8 [T], memory-mapped: schema codes, REASONING included
    lengths: np.ndarray  # int64 [n]
    example_index: np.ndarray  # int64 [n]
    weight: np.ndarray | None = None  # float32 [T], memory-mapped: per-message weight multipliers
    source: np.ndarray | None = None  # int16 [n]
    has_reasoning: bool = False

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths)))

    def optional_columns(self) -> tuple[str, ...]:
        """The optional columns these examples need (schema order)."""
        need = {S.REASONING_MASK: self.has_reasoning, S.MESSAGE_WEIGHT: self.weight is not None,
                S.SOURCE_INDEX: self.source is not None}
        return tuple(name for name in S.OPTIONAL_COLUMNS if need[name])


def _drop_pages(a: np.ndarray) -> None:
    """Unmap the pages a memory-mapped array has touched (they stay in the page cache): without
    this, writing a shuffled split touches every page of the staging files and the process's RSS
    grows with the data."""
    mm = getattr(a, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for all (s, l), without a Python loop."""
    total = int(lengths.sum())
    run_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - run_starts, lengths) + np.arange(total, dtype=np.int64)


#: numpy dtype of each Arrow type the shards hold
_NUMPY = {pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64, pa.uint8(): np.uint8, pa.float32(): np.float32}


def _array(values: np.ndarray, t: pa.DataType) -> pa.Array:
    """An Arrow array over ``values``' buffer, built from buffers: ``pa.array`` on a numpy array imports
    pandas (0.2 s of start-up) to ask whether it is a pandas object."""
    if t == pa.bool_():
        return pa.Array.from_buffers(t, len(values), [None, pa.py_buffer(np.packbits(values, bitorder="little"))])
    return pa.Array.from_buffers(t, len(values), [None, pa.py_buffer(np.ascontiguousarray(values, dtype=_NUMPY[t]))])


def _list(offsets: np.ndarray, values: np.ndarray, t: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(_array(offsets, pa.int32()), _array(values, t))


def _weight_list(token_offsets: np.ndarray, weights: np.ndarray) -> pa.Array:
    """message_weight: one float per token, or a null row where every weight is 1 (costs a bit)."""
    row_len = np.diff(token_offsets)
    not_one = np.add.reduceat((weights != 1).astype(np.int64), token_offsets[:-1]) if len(weights) else row_len * 0
    unit = (not_one == 0) & (row_len > 0)
    keep = np.repeat(~unit, row_len)
    offsets = np.concatenate(([0], np.cumsum(np.where(unit, 0, row_len))))
    return pa.ListArray.from_arrays(
        _array(offsets, pa.int32()), _array(weights[keep], pa.float32()), mask=_array(unit, pa.bool_())
    )


def _record_batch(
    staged: StagedExamples, starts: np.ndarray, items: np.ndarray, row_starts: np.ndarray, optional: tuple[str, ...]
) -> tuple[pa.RecordBatch, np.ndarray]:
    """Rows built from staged examples `items` (positions), split into rows by row_starts; with the
    batch's token count per category (counted here so no pass ever gathers a whole split)."""
    lengths = staged.lengths[items]
    gather = _gather_index(starts[items], lengths)
    ids = np.asarray(staged.input_ids[gather])
    cats = np.asarray(staged.category[gather])
    item_ends = np.concatenate(([0], np.cumsum(lengths)))
    token_offsets = item_ends[row_starts]
    reasoning = cats == REASONING
    columns = {
        S.INPUT_IDS: _list(token_offsets, ids, pa.int32()),
        S.PROMPT_MASK: _list(token_offsets, (cats == PROMPT).view(np.uint8), pa.uint8()),
        S.COMPLETION_MASK: _list(token_offsets, ((cats == COMPLETION) | reasoning).view(np.uint8), pa.uint8()),
        S.TEMPLATE_MASK: _list(token_offsets, (cats == TEMPLATE).view(np.uint8), pa.uint8()),
        S.SEQ_LENGTHS: _list(row_starts, lengths.astype(np.int32), pa.int32()),
        S.EXAMPLE_INDEX: _list(row_starts, staged.example_index[items], pa.int64()),
    }
    if S.REASONING_MASK in optional:
        columns[S.REASONING_MASK] = _list(token_offsets, reasoning.view(np.uint8), pa.uint8())
    if S.MESSAGE_WEIGHT in optional:
        weights = np.asarray(staged.weight[gather]) if staged.weight is not None else np.ones(len(ids), np.float32)
        columns[S.MESSAGE_WEIGHT] = _weight_list(token_offsets, weights)
    if S.SOURCE_INDEX in optional:
        sources = staged.source[items] if staged.source is not None else np.zeros(len(items), np.int16)
        columns[S.SOURCE_INDEX] = _list(row_starts, sources, pa.int16())
    schema = S.schema_with(optional)
    batch = pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)
    counts = np.bincount(cats, minlength=REASONING + 1)
    return batch, np.array([counts[TEMPLATE], counts[PROMPT], counts[COMPLETION] + counts[REASONING], counts[REASONING]])


def write_split(folder: Path, staged: StagedExamples, members: np.ndarray, plan: PackPlan, *, max_length: int,
                packed: bool, shard_tokens: int, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write one split; `plan` indexes into `members` (positions in `staged`). Returns its manifest entry.

    ``optional``: the optional columns every split of the DIR carries (one schema per DIR, so splits
    and the slices of a multi-machine job merge)."""
    folder.mkdir(parents=True, exist_ok=True)
    starts = staged.offsets[:-1]
    items = members[plan.order]
    row_tokens = np.add.reduceat(staged.lengths[items], plan.row_starts[:-1]) if plan.n_rows else np.zeros(0, np.int64)
    # Shard boundaries on cumulative tokens: shard k holds rows whose start falls in [k*S, (k+1)*S).
    cum = np.concatenate(([0], np.cumsum(row_tokens)))
    n_shards = max(1, int(np.ceil(cum[-1] / shard_tokens))) if plan.n_rows else 1
    bounds = np.searchsorted(cum[:-1], np.arange(n_shards + 1) * shard_tokens, side="left")
    bounds[-1] = plan.n_rows
    features, metadata = S.features_json(optional)
    schema = S.schema_with(optional).with_metadata(metadata)
    shards, per_cat = [], np.zeros(REASONING + 1, np.int64)
    for k in range(n_shards):
        name = f"data-{k:05d}-of-{n_shards:05d}.arrow"
        tmp = folder / (name + ".tmp")
        r0, r1 = int(bounds[k]), int(bounds[k + 1])
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for b0 in range(r0, r1, ROWS_PER_BATCH):
                b1 = min(b0 + ROWS_PER_BATCH, r1)
                rs = plan.row_starts[b0 : b1 + 1]
                batch, counts = _record_batch(staged, starts, items[rs[0] : rs[-1]], rs - rs[0], optional)
                writer.write_batch(batch.cast(schema))
                per_cat += counts
                for staged_array in (staged.input_ids, staged.category, staged.weight):
                    _drop_pages(staged_array)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
        path = folder / name
        shards.append({"file": name, "rows": r1 - r0, "bytes": path.stat().st_size, "sha256": S.sha256_file(path)})
    S.write_split_metadata(folder, shards, features)
    tokens = int(cum[-1])
    rows = plan.n_rows
    extra = {"reasoning_tokens": int(per_cat[REASONING])} if S.REASONING_MASK in optional else {}
    return {
        "rows": rows,
        "examples": int(len(members)),
        "tokens": tokens,
        "prompt_tokens": int(per_cat[PROMPT]),
        "completion_tokens": int(per_cat[COMPLETION]),
        "template_tokens": int(per_cat[TEMPLATE]),
        "max_length": max_length,
        "packed": packed,
        "fill": S.fill(tokens, rows, max_length),
        "lower_bound_rows": S.lower_bound_rows(tokens, max_length),
        "shards": shards,
        **extra,
    }


def iter_split_counts(folder: Path, split: str = "train") -> Iterator[CountsBatch]:
    """Per-example template/prompt/completion token counts of a prepared split, from its masks."""
    cols = [*S.MASK_COLUMNS, S.SEQ_LENGTHS, S.EXAMPLE_INDEX]
    for batch in S.iter_record_batches(Path(folder) / split, cols):
        seq = S.flat_values(batch, S.SEQ_LENGTHS).astype(np.int64)
        if not len(seq):
            continue
        starts = np.concatenate(([0], np.cumsum(seq)[:-1]))
        count = lambda name: np.add.reduceat(S.flat_values(batch, name).astype(np.int64), starts)
        yield CountsBatch(S.flat_values(batch, S.EXAMPLE_INDEX), *(count(m) for m in S.MASK_COLUMNS))
