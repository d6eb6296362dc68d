"""`plw-data verify`: check a prepared directory against docs/format.md and name the first problem.

A DIR can be damaged after `prepare` wrote it (a copy cut short, a flipped bit, a hand edit), and
training on it would fail late or, worse, silently train on the wrong tokens. Every check below is
one that training relies on. Shards are streamed batch by batch and checked with vectorised numpy,
so a DIR larger than memory verifies in one pass per shard after its checksum.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import schema as S
from ..errors import ConfigError, PLWError
from ..schema import COUNT_KEYS, INPUT_KEYS, SHARD_KEYS, SPLIT_KEYS, TOKENIZER_KEYS, TOP_KEYS

MASKS = (S.PROMPT_MASK, S.COMPLETION_MASK, S.TEMPLATE_MASK)
TOTALS = S.SPLIT_TOTALS
INT_KEYS = {"vocab_size", "input_rows", "kept", "max_length", "lower_bound_rows", "bytes", *TOTALS}


def verify(directory: Path, *, tokenizer: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """Checks passed, one line each; raises PLWError naming the first problem (file, row, column).

    The tokenizer is checked when `tokenizer` is given, or when the manifest's one is a local path.
    Its own code runs only with ``trust_remote_code`` from the command line, never from the manifest
    (a data file anyone can edit)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"{d}: no such directory")
    m = load_manifest(d)
    done = [f"manifest: format_version {m['format_version']}, splits {', '.join(m['splits'])}, counts add up"]
    dropped = read_dropped(d, m)
    done.append(f"dropped.jsonl: {len(dropped):,} rows, reasons match the manifest")
    for name, split in m["splits"].items():
        check_files(d / name, split)
    n_shards = sum(len(s["shards"]) for s in m["splits"].values())
    done.append(f"files: {n_shards} shard(s) with the manifest's bytes and sha256; state.json lists them")
    indices, columns = [], []
    n_sources = len(m.get("sources") or {})
    for name, split in m["splits"].items():
        indices.append((name, check_split(d / name, split, m["tokenizer"]["vocab_size"], n_sources=n_sources,
                                          columns=columns)))
        done.append(
            f"{name}: {split['rows']:,} rows, {split['examples']:,} examples, {split['tokens']:,} tokens: "
            "schema, one mask per token, seq_lengths, max_length, token ids and totals"
        )
    indices.append((S.DROPPED, dropped))
    done.append(check_coverage(d, m, indices))
    done.append(check_tokenizer(d, m, tokenizer, trust_remote_code=trust_remote_code))  # last: the slowest
    return done


def verify_quick(directory: Path, *, checksums: bool = True) -> dict[str, Any]:
    """What a trainer checks before using a DIR, without reading every row: the manifest (present,
    complete, counts consistent), dropped.jsonl against its counts, every shard's size (and sha256
    unless ``checksums`` is off), schema and row count, state.json. Returns the manifest; raises
    PLWError with the message `plw-data verify` gives for the same problem."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"{d}: no such directory")
    m = load_manifest(d)
    read_dropped(d, m)
    for name, split in m["splits"].items():
        check_files(d / name, split, checksums=checksums)
        for sh in split["shards"]:
            path = d / name / sh["file"]
            rows = sum(batch.num_rows for batch in _batches(path))  # memory-mapped: headers only
            if rows != sh["rows"]:
                raise PLWError(f"{path}: {rows} rows, manifest says {sh['rows']}")
    return m


# -- manifest ----------------------------------------------------------------------------------


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise PLWError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise PLWError(f"{where}: missing key(s) {', '.join(missing)}")
    for k in keys:
        if k in INT_KEYS and (not isinstance(obj[k], int) or isinstance(obj[k], bool) or obj[k] < 0):
            raise PLWError(f"{where}: {k} must be a non-negative integer, got {obj[k]!r}")


def load_manifest(d: Path) -> dict[str, Any]:
    """The manifest: every key docs/format.md requires, with counts consistent with themselves."""
    path = d / S.MANIFEST
    m = S.read_manifest(d)
    _require(m, TOP_KEYS, str(path))
    if m["format_version"] != S.FORMAT_VERSION:
        raise PLWError(f"{path}: format_version {m['format_version']!r} is not {S.FORMAT_VERSION}")
    _require(m["config"], (), f"{path}: config")
    _require(m["tokenizer"], TOKENIZER_KEYS, f"{path}: tokenizer")
    if not isinstance(m["inputs"], list) or not m["inputs"]:
        raise PLWError(f"{path}: inputs must be a non-empty list")
    for k, item in enumerate(m["inputs"]):
        _require(item, INPUT_KEYS, f"{path}: inputs[{k}]")
    c = m["counts"]
    _require(c, COUNT_KEYS, f"{path}: counts")
    _require(c["dropped"], (), f"{path}: counts.dropped")
    if not all(isinstance(v, int) and v >= 0 for v in c["dropped"].values()):
        raise PLWError(f"{path}: counts.dropped values must be non-negative integers")
    _require(m["splits"], ("train",), f"{path}: splits")
    for name, s in m["splits"].items():
        _check_split_entry(path, name, s, m["config"])
    if c["input_rows"] != c["kept"] + sum(c["dropped"].values()):
        raise PLWError(
            f"{path}: counts.input_rows {c['input_rows']} != kept {c['kept']} + dropped {sum(c['dropped'].values())}"
        )
    examples = sum(s["examples"] for s in m["splits"].values())
    repeated = c.get("repeated", 0)  # a mixture's up-sampled copies (docs/mixtures.md)
    if not isinstance(repeated, int) or isinstance(repeated, bool) or repeated < 0:
        raise PLWError(f"{path}: counts.repeated must be a non-negative integer, got {repeated!r}")
    if c["kept"] + repeated != examples:
        extra = f" + repeated {repeated}" if repeated else ""
        raise PLWError(f"{path}: counts.kept {c['kept']}{extra} != examples over all splits {examples}")
    return m


def _check_split_entry(path: Path, name: str, s: Any, config: dict[str, Any]) -> None:
    where = f"{path}: splits.{name}"
    _require(s, SPLIT_KEYS, where)
    if not isinstance(s["shards"], list) or not s["shards"]:
        raise PLWError(f"{where}.shards must be a non-empty list")
    for k, sh in enumerate(s["shards"]):
        _require(sh, SHARD_KEYS, f"{where}.shards[{k}]")
        if not isinstance(sh["file"], str) or Path(sh["file"]).name != sh["file"] or sh["file"] in ("", ".", ".."):
            raise PLWError(f"{where}.shards[{k}].file must be a plain file name, got {sh['file']!r}")
    if s["max_length"] < 1:
        raise PLWError(f"{where}.max_length must be at least 1, got {s['max_length']}")
    checks = {
        "tokens": (s["tokens"], s["prompt_tokens"] + s["completion_tokens"] + s["template_tokens"], "prompt + completion + template tokens"),
        "rows": (s["rows"], sum(sh["rows"] for sh in s["shards"]), "the sum of its shards' rows"),
        "lower_bound_rows": (s["lower_bound_rows"], S.lower_bound_rows(s["tokens"], s["max_length"]), "ceil(tokens / max_length)"),
        "max_length": (s["max_length"], config.get("max_length", s["max_length"]), "config.max_length"),
        "packed": (s["packed"], config.get("pack", s["packed"]), "config.pack"),
    }
    for key, (got, want, what) in checks.items():
        if got != want:
            raise PLWError(f"{where}.{key} is {got!r}, but {what} is {want!r}")
    fill = S.fill(s["tokens"], s["rows"], s["max_length"])
    if not isinstance(s["fill"], (int, float)) or not math.isclose(s["fill"], fill, rel_tol=1e-9, abs_tol=1e-12):
        raise PLWError(f"{where}.fill is {s['fill']!r}, but tokens / (rows * max_length) is {fill!r}")


def read_dropped(d: Path, m: dict[str, Any]) -> np.ndarray:
    """Indices in dropped.jsonl; its reasons must count up to the manifest's counts.dropped."""
    path = d / S.DROPPED
    if not path.is_file():
        raise PLWError(f"{path}: missing")
    indices: list[int] = []
    reasons: Counter = Counter()
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise PLWError(f"{path}: line {n}: not valid JSON: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or not isinstance(rec.get("reason"), str):
                raise PLWError(f"{path}: line {n}: needs an integer 'index' and a string 'reason'")
            indices.append(rec["index"])
            reasons[rec["reason"]] += 1
    claimed = m["counts"]["dropped"]
    for reason in sorted(set(reasons) | set(claimed)):
        if reasons.get(reason, 0) != claimed.get(reason, 0):
            raise PLWError(
                f"{path}: {reasons.get(reason, 0)} line(s) with reason {reason!r}, "
                f"manifest counts.dropped says {claimed.get(reason, 0)}"
            )
    return np.asarray(indices, np.int64)


# -- tokenizer ---------------------------------------------------------------------------------


def check_tokenizer(d: Path, m: dict[str, Any], spec: str | None, *, trust_remote_code: bool = False) -> str:
    """The tokenizer's fingerprint must equal the manifest's (all keys but its name or path)."""
    from ..tokenizer import load_tokenizer, tokenizer_fingerprint, with_chat_template

    claimed = m["tokenizer"]
    trust = trust_remote_code  # never the manifest's config.trust_remote_code
    if spec is None:
        local = str(claimed["name_or_path"])
        if not Path(local).exists():  # a hub name: never go online just to verify
            return f"tokenizer: not checked ({local} is not a local path; give --tokenizer)"
        try:
            tok = load_tokenizer(local, trust_remote_code=trust)
        except PLWError as e:
            return f"tokenizer: not checked ({e})"
        spec = local
    else:
        tok = load_tokenizer(spec, trust_remote_code=trust)
    try:  # the fingerprint covers the chat template the run used (--chat-template-file)
        tok = with_chat_template(tok, m["config"].get("chat_template_file"))
    except PLWError as e:
        return f"tokenizer: not checked ({e})"
    actual = tokenizer_fingerprint(tok, spec)
    for key, want in claimed.items():
        if key != "name_or_path" and key in actual and actual[key] != want:
            raise PLWError(f"{d / S.MANIFEST}: tokenizer.{key} is {want!r}, but {spec} gives {actual[key]!r}")
    return f"tokenizer: {spec} matches the manifest's fingerprint (sha256 {claimed['sha256'][:12]}...)"


# -- files -------------------------------------------------------------------------------------


def check_files(folder: Path, split: dict[str, Any], *, checksums: bool = True) -> None:
    """Every listed shard has the listed size and sha256 (unless ``checksums`` is off), and state.json
    lists exactly those shards."""
    for sh in split["shards"]:
        path = folder / sh["file"]
        if not path.is_file():
            raise PLWError(f"{path}: missing (listed in manifest.json)")
        size = path.stat().st_size
        if size != sh["bytes"]:
            raise PLWError(f"{path}: {size} bytes, manifest says {sh['bytes']}")
        digest = S.sha256_file(path) if checksums else sh["sha256"]
        if digest != sh["sha256"]:
            raise PLWError(f"{path}: sha256 {digest} does not match the manifest's {sh['sha256']}")
    state = folder / S.STATE
    try:
        listed = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PLWError(f"{state}: unreadable ({type(e).__name__}: {e}); datasets.load_from_disk needs it") from None
    if listed != [sh["file"] for sh in split["shards"]]:
        raise PLWError(f"{state}: lists {listed}, manifest.json lists {[sh['file'] for sh in split['shards']]}")
    if not (folder / S.DATASET_INFO).is_file():
        raise PLWError(f"{folder / S.DATASET_INFO}: missing; datasets.load_from_disk needs it")


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


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
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
        for batch in _batches(path):
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


# -- coverage ----------------------------------------------------------------------------------


def check_coverage(d: Path, m: dict[str, Any], sources: list[tuple[str, np.ndarray]]) -> str:
    """example_index over all splits plus dropped.jsonl must be exactly this job's input rows, once each."""
    total = sum(i["rows"] for i in m["inputs"])
    k_shards = int(m["config"].get("num_shards", 1))
    k = int(m["config"].get("shard_index", 0))
    expected = np.arange(k, total, k_shards, dtype=np.int64)
    if len(expected) != m["counts"]["input_rows"]:
        raise PLWError(
            f"{d / S.MANIFEST}: counts.input_rows {m['counts']['input_rows']}, but inputs hold "
            f"{len(expected)} rows for this job"
        )
    for name, idx in sources:
        bad = np.flatnonzero((idx < 0) | (idx >= total) | (idx % k_shards != k))
        if len(bad):
            raise PLWError(f"{d / name}: index {idx[bad[0]]} is not one of this job's input rows (0..{total - 1})")
    repeated = int(m["counts"].get("repeated", 0))
    if repeated:  # an up-sampled mixture holds copies: each distinct row counts once, the copies add up
        kept = np.concatenate([idx for name, idx in sources if name != S.DROPPED])
        distinct = np.unique(kept)
        if len(kept) - len(distinct) != repeated:
            raise PLWError(f"{d}: {len(kept) - len(distinct)} repeated example(s), manifest counts.repeated says {repeated}")
        sources = [("splits", distinct), *[(name, idx) for name, idx in sources if name == S.DROPPED]]
    found = np.sort(np.concatenate([idx for _, idx in sources]))
    n = min(len(found), len(expected))
    diff = np.flatnonzero(found[:n] != expected[:n])
    if len(diff) or len(found) != len(expected):
        i = int(diff[0]) if len(diff) else n
        if i < len(found) and (i >= len(expected) or found[i] < expected[i]):
            dup = int(found[i])
            where = ", ".join(name for name, idx in sources if (idx == dup).any())
            raise PLWError(f"{d}: input row {dup} appears more than once (in {where})")
        raise PLWError(f"{d}: input row {int(expected[i])} is in no split and not in dropped.jsonl")
    return f"coverage: example_index over all splits plus dropped.jsonl is each of the {len(expected):,} input rows once"
