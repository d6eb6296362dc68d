"""The rg-stats engine: per-example token (or char/word) counts of datasets, raw or prepared.

Raw inputs are rendered exactly as `prepare` renders them (same formats, templates, chat template,
truncation: the same encoder), so the counts are the prepared masks' counts; a prepared DIR is read
from its masks. :func:`measure` feeds them batch by batch into a :class:`plw_data.rg.stats.RgAccumulator`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import schema as S
from ..errors import ConfigError, PLWError
from ..prepare.sources import SUFFIXES, row_label

UNITS = ("tokens", "chars", "words")
DEFAULT_PLWS = "0,0.01,0.1,1"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str

    @property
    def prepared(self) -> bool:
        return Path(self.path).is_dir()


@dataclass
class Measured:
    """One dataset's accumulated counts and how fast they were read."""

    spec: DatasetSpec
    acc: Any  # plw_data.rg.stats.RgAccumulator
    rows: int  # input rows (raw) or examples (prepared) read
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def parse_dataset(spec: str) -> DatasetSpec:
    """`name=path`, or a path named after its file stem (`race/dev.jsonl.gz` -> `dev`)."""
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
        if not name or not path:
            raise ConfigError(f"{spec}: expected NAME=PATH")
        return DatasetSpec(name, path)
    p = Path(spec)
    name = p.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return DatasetSpec(name or spec, spec)


def parse_plws(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--plw must be comma-separated numbers, got {text!r}") from None
    if any(v < 0 or v != v for v in values):
        raise ConfigError(f"--plw values must be >= 0, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------
# Counting: each source yields (rows read, prompt + template, completion, template | None, dropped)

Counts = tuple[int, Any, Any, Any, dict[str, int]]


def _counts(b: Any, keep: Any = slice(None), dropped: dict[str, int] | None = None) -> Counts:
    """One CountsBatch (rows `keep`) as (rows read, prompt + template, completion, template, dropped)."""
    import numpy as np

    template = np.asarray(b.template)[keep]
    prompt = np.asarray(b.prompt)[keep] + template
    dropped = dict(b.dropped) if dropped is None else dropped
    return int(prompt.size) + sum(dropped.values()), prompt, np.asarray(b.completion)[keep], template, dropped


def _raw_token_counts(spec: DatasetSpec, cfg: Any, tok: Any, limit: int | None) -> Iterator[Counts]:
    """Encoded exactly as prepare encodes (same renderer, truncation, drop reasons); rows below limit."""
    from collections import Counter

    import numpy as np

    from ..prepare.encoding import encoded_batches

    for batch in encoded_batches([spec.path], cfg, tok):
        dropped = [d for d in batch.dropped if limit is None or d[0] < limit]
        if dropped and cfg.on_error == "fail":
            _, file, row, err = dropped[0]
            raise PLWError(err.located(file, row_label(file, row)))
        counts = batch.counts()
        keep = slice(None) if limit is None else counts.example_index < limit
        yield _counts(counts, keep, dict(Counter(err.reason for *_, err in dropped)))
        seen = np.concatenate([counts.example_index, [d[0] for d in batch.dropped]])
        if limit is not None and seen.size and seen.max() >= limit - 1:
            return  # rows are encoded in order: nothing further is below the limit


def _prepared_counts(spec: DatasetSpec, split: str, limit: int | None) -> Iterator[Counts]:
    """From the split's masks; with limit, the first N examples in shard order (packing shuffles).

    Rows prepare dropped (manifest counts) are reported as skipped with the train split, as they
    are for raw inputs; not with --limit, where they could not be attributed to the first N.
    """
    import numpy as np

    from ..prepare.shards import iter_split_counts

    split_dir = Path(spec.path) / split
    if not split_dir.is_dir():
        raise ConfigError(f"{spec.path}: has no {split!r} split")
    if split == "train" and limit is None:
        dropped = _manifest(spec).get("counts", {}).get("dropped", {})
        if dropped:
            empty = np.zeros(0, np.int64)
            yield 0, empty, empty, empty, {str(k): int(v) for k, v in dropped.items()}
    left = limit
    for b in iter_split_counts(Path(spec.path), split):
        if left is None:
            yield _counts(b)
            continue
        yield _counts(b, slice(0, left))
        left -= min(left, len(b.prompt))
        if not left:
            return


def _text_counts(spec: DatasetSpec, cfg: Any, unit: str, limit: int | None, batch: int = 10_000) -> Iterator[Counts]:
    """chars/words of untrained turns (prompt) vs trained turns (completion); no tokenizer."""
    import itertools

    import numpy as np

    from ..errors import RowError
    from ..prepare.formats import iter_conversations

    size: Callable[[str], int] = len if unit == "chars" else (lambda s: len(s.split()))
    rows = itertools.islice(iter_conversations([spec.path], cfg), limit)
    while True:
        chunk = list(itertools.islice(rows, batch))
        if not chunk:
            return
        prompt, completion, dropped = [], [], {}
        for raw, conv in chunk:
            if isinstance(conv, RowError):
                if cfg.on_error == "fail":
                    raise PLWError(conv.located(raw.file, row_label(raw.file, raw.row)))
                dropped[conv.reason] = dropped.get(conv.reason, 0) + 1
                continue
            p = c = 0
            for m, trained in zip(conv.messages, conv.trained):
                if trained:
                    c += size(m["content"])
                else:
                    p += size(m["content"])
            prompt.append(p)
            completion.append(c)
        yield len(chunk), np.asarray(prompt, np.int64), np.asarray(completion, np.int64), None, dropped


def measure(
    spec: DatasetSpec,
    cfg: Any,
    tok: Any,
    *,
    unit: str = "tokens",
    split: str = "train",
    limit: int | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Measured:
    """Accumulate one dataset's counts (raw or prepared) batch by batch."""
    from .stats import RgAccumulator

    if spec.prepared:
        if not (Path(spec.path) / S.MANIFEST).is_file():
            raise ConfigError(f"{spec.path}: a directory but not a prepared one (no manifest.json)")
        if unit != "tokens":
            raise ConfigError(f"{spec.path}: a prepared directory holds tokens; --unit {unit} needs raw inputs")
        source = _prepared_counts(spec, split, limit)
    elif unit == "tokens":
        if limit is not None and limit < cfg.batch_size:  # encode no more rows than asked for
            cfg = dataclasses.replace(cfg, batch_size=limit)
        source = _raw_token_counts(spec, cfg, tok, limit)
    else:
        source = _text_counts(spec, cfg, unit, limit)
    acc = RgAccumulator()
    rows = 0
    start = time.perf_counter()
    for n, prompt, completion, template, dropped in source:
        acc.update(prompt, completion, template=template)
        for reason, k in dropped.items():
            acc.skip(reason, k)
        rows += n
        if on_rows:
            on_rows(n)
    return Measured(spec, acc, rows, time.perf_counter() - start)


def _manifest(spec: DatasetSpec) -> dict[str, Any]:
    return S.read_manifest(spec.path)


def expected_rows(spec: DatasetSpec, split: str, limit: int | None) -> int | None:
    """Progress total: a prepared split's example count from its manifest; unknown for raw files."""
    total = None
    if spec.prepared and (Path(spec.path) / S.MANIFEST).is_file():
        try:
            total = int(_manifest(spec)["splits"][split]["examples"])
        except (PLWError, KeyError, TypeError, ValueError):
            total = None
    return total if limit is None or total is None else min(total, limit)


def measure_sources(spec: DatasetSpec, split: str = "train", limit: int | None = None) -> list[tuple[str, Any]] | None:
    """Each source of a prepared mixture DIR (docs/mixtures.md), in one pass over the split's masks:
    (name, RgAccumulator) in mixture order; None when the DIR is not a mixture. Examples repeated by
    a source's share count once per copy: these are the counts training sees."""
    import numpy as np

    from ..prepare.mixture import source_of, source_ranges
    from ..prepare.shards import iter_split_counts
    from .stats import RgAccumulator

    manifest = _manifest(spec)
    ranges = source_ranges(manifest)
    if ranges is None:
        return None
    names, bounds = ranges
    accs = [RgAccumulator() for _ in names]
    if split == "train" and limit is None:
        for name, acc in zip(names, accs):
            for reason, n in manifest["sources"][name].get("dropped", {}).items():
                acc.skip(str(reason), int(n))
    left = limit
    for b in iter_split_counts(Path(spec.path), split):
        take = slice(None) if left is None else slice(0, left)
        src = source_of(np.asarray(b.example_index)[take], bounds)
        for k, acc in enumerate(accs):
            keep = np.flatnonzero(src == k)
            if keep.size:
                _, prompt, completion, template, _ = _counts(b, keep, {})
                acc.update(prompt, completion, template=template)
        if left is not None:
            left -= min(left, len(b.prompt))
            if not left:
                break
    return list(zip(names, accs))
