"""Read raw rows from local files (or a hub dataset), streaming, in the given order.

Every row gets a global 0-based index over all inputs in order. A row that cannot even be parsed
(malformed JSON, invalid UTF-8, a lone surrogate, NaN, a number over Python's digit limit, nesting
too deep) still gets its index, as a RowError, so the manifest's counts add up. A file that cannot be
read on (truncated gzip, not parquet/arrow, an unterminated CSV quote) is one ConfigError naming it.

Rows in messages (docs/guarantees.md): "line N" (1-based, as an editor counts) in line files
(.jsonl, .jsonl.gz, .csv, JSON-lines .json); "row N" (0-based) in the others. dropped.jsonl's "row"
is always the 0-based row within the file.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RowError
from ..schema import sha256_file

#: csv's own limit is 131,072 characters per field; larger fields are read (up to this bound) and then
#: dropped as row_too_large by `formats.row_too_large`, whose limit is configurable.
CSV_FIELD_LIMIT = 1 << 28
csv.field_size_limit(CSV_FIELD_LIMIT)
BOM = b"\xef\xbb\xbf"
_NEWLINE = re.compile(rb"\r\n|\r|\n")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

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


def _lines(f: Any, block: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary file with universal newlines (LF, CRLF or CR alone), BOM removed; a long
    line is gathered in pieces, never re-scanned."""
    pieces: list[bytes] = []
    cr = False
    for chunk in chain([f.read(len(BOM)).removeprefix(BOM)], iter(lambda: f.read(block), b"")):
        if cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split between two blocks
        cr = chunk.endswith(b"\r")
        parts = _NEWLINE.split(chunk)
        pieces.append(parts[0])
        if len(parts) > 1:
            yield b"".join(pieces)
            yield from parts[1:-1]
            pieces = [parts[-1]]
    if any(pieces):
        yield b"".join(pieces)


class _NonFinite(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NonFinite(name)


def _has_surrogate(obj: Any) -> str | None:
    """The first string (or key) of a parsed row that holds a lone surrogate (it cannot become UTF-8)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return x[:40]
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


def _parse_json(raw: bytes) -> Any:
    """One JSON value, or the RowError naming why it cannot be a row's data."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError("invalid_utf8", f"byte {e.start} is not UTF-8")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except _NonFinite as e:
        return RowError("non_finite_number", f"{e} is not a JSON number (NaN/Infinity are not accepted)")
    except json.JSONDecodeError as e:
        return RowError("malformed_json", f"{e.msg} (column {e.colno})")
    except ValueError as e:  # int digits over sys.get_int_max_str_digits()
        return RowError("number_too_large", str(e).split(":")[0])
    except RecursionError:
        return RowError("nesting_too_deep", "JSON nested deeper than Python can parse")
    if _SURROGATE_ESCAPE.search(raw) and (bad := _has_surrogate(obj)) is not None:
        return RowError("lone_surrogate", f"a string holds an unpaired UTF-16 surrogate: {bad!r}")
    return obj


def _as_row(obj: Any) -> dict[str, Any] | RowError:
    if isinstance(obj, (dict, RowError)):
        return obj
    return RowError("not_an_object", f"a row must be a JSON object, got {type(obj).__name__}")


def _json_lines(lines: Iterator[bytes]) -> Iterator[dict[str, Any] | RowError]:
    for raw in lines:
        if not raw.strip():
            continue  # a blank line is not a row
        yield _as_row(_parse_json(raw))


def _opener(path: Path) -> Any:
    return gzip.open if path.name.lower().endswith(".gz") else open


def _read_json(path: Path) -> Iterator[dict[str, Any] | RowError]:
    """A .json file holds one array of objects (Alpaca style), or JSON lines."""
    with _opener(path)(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        with _opener(path)(path, "rb") as f:
            yield from _json_lines(_lines(f))
        return
    with _opener(path)(path, "rb") as f:
        data = _parse_json(f.read().removeprefix(BOM))
    if isinstance(data, RowError):
        raise ConfigError(f"{path}: not valid JSON: {data.reason}: {data.detail}")
    for obj in data:
        yield _as_row(obj)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any] | RowError]:
    with _opener(path)(path, "rb") as f:
        yield from _json_lines(_lines(f))


def _non_finite(row: dict[str, Any]) -> RowError | dict[str, Any]:
    """Columnar float NaN/inf would render as the text "nan"/"inf": a named drop instead."""
    stack: list[Any] = list(row.values())
    while stack:
        x = stack.pop()
        if isinstance(x, float) and not math.isfinite(x):
            return RowError("non_finite_number", f"{x} is not a finite number")
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return row


def _read_parquet(path: Path) -> Iterator[dict[str, Any] | RowError]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from map(_non_finite, batch.to_pylist())


def _read_csv(path: Path) -> Iterator[dict[str, Any] | RowError]:
    # csv rows are strings: no type inference that turns "0123" into 123. strict: an unterminated
    # quote is an error at the line its record starts on, not a field that swallows the rest.
    with path.open("r", encoding="utf-8-sig", errors="strict", newline="") as f:
        reader = csv.DictReader(f, strict=True)
        start = 1
        try:
            for record in reader:
                yield record
                start = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise ConfigError(f"{path}: line {start}: CSV error: {e} (an unterminated quote?)") from None


def _read_arrow(path: Path) -> Iterator[dict[str, Any] | RowError]:
    import pyarrow as pa

    with path.open("rb") as f:
        magic = f.read(6)
    source = pa.memory_map(str(path), "r")
    reader = pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if magic == b"ARROW1" else reader
    for batch in batches:
        yield from map(_non_finite, batch.to_pylist())


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


def row_label(spec: str, row: int) -> str:
    """How a message names row ``row`` (0-based within ``spec``): "line N" (1-based) in a line file,
    found by re-reading it (only on the error path), else "row N" (0-based)."""
    try:
        kind = input_kind(spec)
        if kind == ".csv":
            with open(spec, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                next(reader, None)  # the header
                start = reader.line_num + 1
                for i, _ in enumerate(reader):
                    if i == row:
                        return f"line {start}"
                    start = reader.line_num + 1
        elif kind in (".jsonl", ".jsonl.gz") or (kind in (".json", ".json.gz") and not _is_array(Path(spec))):
            with _opener(Path(spec))(spec, "rb") as f:
                seen = -1
                for n, raw in enumerate(_lines(f), 1):
                    seen += bool(raw.strip())
                    if seen == row:
                        return f"line {n}"
    except (OSError, EOFError, zlib.error, csv.Error, UnicodeDecodeError, ConfigError):
        pass
    return f"row {row}"


def _is_array(path: Path) -> bool:
    with _opener(path)(path, "rb") as f:
        return f.read(1 << 16).removeprefix(BOM).lstrip().startswith(b"[")


def _file_error(spec: str, rows: int, e: BaseException) -> ConfigError:
    what = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"{spec}: cannot read (truncated, corrupt or not this format?) after {rows} rows: {what}")


def iter_rows(inputs: list[str], *, start_index: int = 0, split: str = "train") -> Iterator[RawRow]:
    """All rows of all inputs, in order, with global indices starting at start_index.

    A file that fails part-way (truncated gzip, corrupt parquet, unreadable) is one ConfigError."""
    import pyarrow as pa

    for spec in inputs:
        input_kind(spec)  # fail fast on a missing file before reading earlier ones
    index = start_index
    for spec in inputs:
        row = 0
        try:
            for record in iter_file(spec, split):
                yield RawRow(index, spec, row, record)
                index += 1
                row += 1
        except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
            raise _file_error(spec, row, e) from None
