"""Read raw rows from local files (or a hub dataset), streaming, in the given order.

Every row gets a global 0-based index over all inputs in order. A row that cannot even be parsed
(malformed JSON, invalid UTF-8) still gets its index, as a RowError, so the manifest's counts add up.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RowError
from ..schema import sha256_file

SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv", ".arrow")


@dataclass(frozen=True)
class RawRow:
    index: int  # global, over all inputs in order
    file: str
    row: int  # 0-based within its file
    record: dict[str, Any] | RowError


def input_kind(spec: str) -> str:
    """The reader for a spec: a file suffix, or 'hub' for a name that is not a local path."""
    p = Path(spec)
    name = p.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            if not p.is_file():
                raise ConfigError(f"{spec}: input file not found")
            return suffix
    if p.exists():
        raise ConfigError(f"{spec}: unsupported input (expected one of {', '.join(SUFFIXES)})")
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return "hub"
    raise ConfigError(f"{spec}: input file not found")


def file_sha256(spec: str) -> str | None:
    """A local input's checksum; None for a hub dataset."""
    return sha256_file(spec) if Path(spec).is_file() else None


def _json_lines(lines: Iterator[bytes]) -> Iterator[dict[str, Any] | RowError]:
    for raw in lines:
        if not raw.strip():
            continue  # a blank line is not a row
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RowError("invalid_utf8", f"byte {e.start} is not UTF-8")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield RowError("malformed_json", f"{e.msg} (column {e.colno})")
            continue
        yield obj if isinstance(obj, dict) else RowError("not_an_object", f"a row must be a JSON object, got {type(obj).__name__}")


def _read_json(path: Path) -> Iterator[dict[str, Any] | RowError]:
    """A .json file holds one array of objects (Alpaca style), or JSON lines."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith(b"["):
        with opener(path, "rb") as f:
            yield from _json_lines(f)
        return
    try:
        with opener(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    for obj in data:
        yield obj if isinstance(obj, dict) else RowError("not_an_object", f"a row must be a JSON object, got {type(obj).__name__}")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any] | RowError]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from _json_lines(f)


def _read_parquet(path: Path) -> Iterator[dict[str, Any] | RowError]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _read_csv(path: Path) -> Iterator[dict[str, Any] | RowError]:
    # csv rows are strings: no type inference that turns "0123" into 123.
    with path.open("r", encoding="utf-8", errors="strict", newline="") as f:
        try:
            yield from csv.DictReader(f)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _read_arrow(path: Path) -> Iterator[dict[str, Any] | RowError]:
    import pyarrow as pa

    with path.open("rb") as f:
        magic = f.read(6)
    source = pa.memory_map(str(path), "r")
    reader = pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if magic == b"ARROW1" else reader
    for batch in batches:
        yield from batch.to_pylist()


def _read_hub(name: str, split: str) -> Iterator[dict[str, Any] | RowError]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, gated...
        raise ConfigError(f"{name}: cannot load hub dataset (split {split!r}): {str(e).splitlines()[0]}") from None
    yield from ds


READERS = {
    ".json": _read_json,
    ".json.gz": _read_json,
    ".jsonl": _read_jsonl,
    ".jsonl.gz": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
    ".arrow": _read_arrow,
}


def iter_file(spec: str, split: str = "train") -> Iterator[dict[str, Any] | RowError]:
    kind = input_kind(spec)
    if kind == "hub":
        return _read_hub(spec, split)
    return READERS[kind](Path(spec))


def iter_rows(inputs: list[str], *, start_index: int = 0, split: str = "train") -> Iterator[RawRow]:
    """All rows of all inputs, in order, with global indices starting at start_index."""
    for spec in inputs:
        input_kind(spec)  # fail fast on a missing file before reading earlier ones
    index = start_index
    for spec in inputs:
        for row, record in enumerate(iter_file(spec, split)):
            yield RawRow(index, spec, row, record)
            index += 1
