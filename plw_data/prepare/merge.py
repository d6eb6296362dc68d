"""`plw-data merge`: combine the K slice outputs of `prepare --num-shards K --shard-index i` into one DIR.

Shard files are linked (or copied) unchanged, so their checksums carry over; each slice was packed on its
own, and the manifest records what that cost against a global packing bound (`merge.extra_rows`).
The merged DIR is installed like a prepare output (built in DIR/.plw-tmp, manifest last) and passes
`plw-data verify` as if one job had prepared every row.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from .. import schema as S
from ..errors import ConfigError
from . import output as out

def _read_part(path: Path) -> dict[str, Any]:
    if not (path / S.MANIFEST).is_file():
        raise ConfigError(f"{path}: no {S.MANIFEST} (not a finished plw-data prepare output)")
    return S.read_manifest(path)


def _check_parts(parts: list[Path], manifests: list[dict[str, Any]]) -> int:
    """All parts are slices of one job (same config but shard_index, same tokenizer and inputs), each once."""
    k = int(manifests[0]["config"]["num_shards"])
    same = lambda m: ({**m["config"], "shard_index": None}, m["tokenizer"], m["inputs"], m["format_version"])
    for path, m in zip(parts, manifests):
        if same(m) != same(manifests[0]):
            raise ConfigError(f"{path}: prepared with another config, tokenizer or inputs than {parts[0]}")
    seen = sorted(int(m["config"]["shard_index"]) for m in manifests)
    if k < 2 or seen != list(range(k)):
        raise ConfigError(f"merge needs the {k if k > 1 else 'K'} slices 0..K-1 of one --num-shards K job, got shard indices {seen}")
    return k


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: no bytes copied
    except OSError:
        shutil.copyfile(src, dst)


def _merge_split(name: str, parts: list[Path], entries: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    folder = work / name
    folder.mkdir(parents=True)
    sources = [(p / name / s["file"], s) for p, e in zip(parts, entries) for s in e["shards"]]
    shards = []
    for j, (src, s) in enumerate(sources):
        file = f"data-{j:05d}-of-{len(sources):05d}.arrow"
        _place(src, folder / file)
        shards.append({**s, "file": file})
    infos = [json.loads((p / name / S.DATASET_INFO).read_text())["features"] for p in parts]
    if any(info != infos[0] for info in infos):  # e.g. one slice had reasoning tokens and another none
        bad = next(p for p, info in zip(parts, infos) if info != infos[0])
        raise ConfigError(f"{bad / name}: its columns differ from {parts[0] / name}'s; prepare the job in one run")
    S.write_split_metadata(folder, shards, infos[0])
    entry = {key: sum(e[key] for e in entries) for key in S.SPLIT_TOTALS}
    length = entries[0]["max_length"]
    entry.update(max_length=length, packed=entries[0]["packed"], fill=S.fill(entry["tokens"], entry["rows"], length),
                 lower_bound_rows=S.lower_bound_rows(entry["tokens"], length), shards=shards)  # fmt: skip
    if all("reasoning_tokens" in e for e in entries):
        entry["reasoning_tokens"] = sum(e["reasoning_tokens"] for e in entries)
    return entry


def merge(parts: list[str | Path], output: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Merge slice outputs `parts` into `output`; returns the merged manifest."""
    parts = [Path(p) for p in parts]
    output = Path(output)
    if not parts:
        raise ConfigError("no part directory given")
    if any(output.resolve() == p.resolve() for p in parts):
        raise ConfigError(f"{output}: the output must not be one of the parts")
    manifests = [_read_part(p) for p in parts]
    k = _check_parts(parts, manifests)
    order = sorted(range(k), key=lambda i: manifests[i]["config"]["shard_index"])
    parts, manifests = [parts[i] for i in order], [manifests[i] for i in order]
    if (output / S.MANIFEST).exists() and not overwrite:
        raise ConfigError(f"{output}: exists and is not empty; use --overwrite")
    out.check_target(output, overwrite=overwrite)
    work = out.begin(output)

    splits = {}
    for name in manifests[0]["splits"]:
        splits[name] = _merge_split(name, parts, [m["splits"][name] for m in manifests], work)
    dropped = sorted(
        (json.loads(line) for p in parts for line in (p / S.DROPPED).read_text().splitlines() if line.strip()),
        key=lambda d: d["index"],
    )
    S.fsync_write(work / S.DROPPED, "".join(json.dumps(d) + "\n" for d in dropped).encode())
    reasons: Counter = Counter()
    for m in manifests:
        reasons.update(m["counts"]["dropped"])
    first = manifests[0]
    manifest = {
        **first,
        "config": {**first["config"], "num_shards": 1, "shard_index": 0},
        "counts": {
            "input_rows": sum(m["counts"]["input_rows"] for m in manifests),
            "kept": sum(m["counts"]["kept"] for m in manifests),
            "dropped": dict(sorted(reasons.items())),
            "truncated": sum(m["counts"].get("truncated", 0) for m in manifests),
        },
        "splits": splits,
        "merge": {
            "num_shards": k,
            "parts": [{"path": str(p), "manifest_sha256": S.sha256_file(p / S.MANIFEST)} for p in parts],
            # packing within each slice: rows above the merged split's global lower bound
            "extra_rows": {n: s["rows"] - s["lower_bound_rows"] for n, s in splits.items()},
        },
    }
    out.install(work, output, manifest)
    return manifest
