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
from pathlib import Path
from typing import Any

import numpy as np

from .. import schema as S
from ..errors import ConfigError, PLWError
from ..schema import COUNT_KEYS, INPUT_KEYS, SHARD_KEYS, SPLIT_KEYS, TOKENIZER_KEYS, TOP_KEYS
from .verify_rows import check_split, shard_batches

INT_KEYS = {"vocab_size", "input_rows", "kept", "max_length", "lower_bound_rows", "bytes", *S.SPLIT_TOTALS}


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
            rows = sum(batch.num_rows for batch in shard_batches(path))  # memory-mapped: headers only
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
