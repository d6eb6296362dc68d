"""Mixtures (`plw-data prepare --mix FILE.yaml`): parse the mixture file and choose what each source gives.

Everything here is a pure function of the mixture file, the encoded examples' lengths and the seed;
:mod:`plw_data.prepare.pipeline` encodes, stages and writes. The rules are in docs/mixtures.md:

- a source's share is ``rows: N`` (examples), ``tokens: N`` (tokens of whole examples) or
  ``fraction: F`` of the mixture's total in its ``unit`` (rows or tokens); without a share a source
  gives each of its examples once;
- taking more than a source holds repeats it: whole copies first, then a seeded sample without
  replacement for the remainder; taking less is that sample alone;
- a ``tokens`` share takes the sampled examples in seeded order while the running total stays
  within N, so it never exceeds N and falls short by less than one example.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import DataConfig, build_config, load_recipe, read_yaml
from ..errors import ConfigError

Unit = Literal["rows", "tokens"]
#: Options every source shares: one tokenizer, one row length, one packing and one seed per DIR.
SHARED_KEYS = ("tokenizer", "max_length", "pack", "seed", "shard_tokens", "num_shards", "shard_index",
               "trust_remote_code", "mix")
SHARE_KEYS = ("rows", "tokens", "fraction")
_SOURCE_KEYS = ("name", "inputs", "eval_inputs", *SHARE_KEYS)
_MIX_KEYS = ("sources", "unit", "total")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Share:
    """How much a source gives: ``kind`` all (each example once), rows, tokens or fraction."""

    kind: Literal["all", "rows", "tokens", "fraction"]
    value: float = 1.0

    def describe(self) -> dict[str, Any]:
        return {} if self.kind == "all" else {self.kind: self.value}


@dataclass(frozen=True)
class Source:
    name: str
    inputs: tuple[str, ...]
    share: Share
    options: dict[str, Any] = field(default_factory=dict)  # DataConfig keys of this source only

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": list(self.inputs), **self.share.describe(), "options": self.options}


@dataclass(frozen=True)
class Mixture:
    path: str
    sources: tuple[Source, ...]
    unit: Unit = "rows"
    total: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # top-level DataConfig keys: a recipe for all

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def describe(self) -> dict[str, Any]:
        """What the manifest records (and what decides whether a DIR already holds this mixture)."""
        return {"unit": self.unit, "total": self.total, "sources": [s.describe() for s in self.sources]}

    def source_config(self, base: DataConfig, k: int) -> DataConfig:
        """Source k's config: ``base`` (flags over the mixture's top-level keys), then its own keys."""
        src = self.sources[k]
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(DataConfig)}
        own_eval_files = "eval_input" in src.options
        values.update(mix=None, eval_input=[], eval_fraction=0.0 if own_eval_files else base.eval_fraction)
        return build_config(DataConfig, {**values, **src.options}, {}, source=f"{self.path}: source {src.name!r}")


def _where(path: str, k: int | None = None, name: str | None = None) -> str:
    if k is None:
        return path
    return f"{path}: sources[{k}]" + (f" ({name})" if name else "")


def _number(value: Any, what: str, *, integer: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and (value != int(value) or value < 0)):
        raise ConfigError(f"{what} must be a {'non-negative integer' if integer else 'number'}, got {value!r}")
    return int(value) if integer else float(value)


def _files(value: Any, what: str) -> tuple[str, ...]:
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ConfigError(f"{what} must be a file or a list of files, got {value!r}")
    return tuple(files)


def _share(raw: dict[str, Any], where: str) -> Share:
    given = [k for k in SHARE_KEYS if k in raw]
    if len(given) > 1:
        raise ConfigError(f"{where}: give one of rows, tokens, fraction; got {', '.join(given)}")
    if not given:
        return Share("all")
    kind = given[0]
    value = _number(raw[kind], f"{where}: {kind}", integer=kind != "fraction")
    if kind == "fraction" and not 0 < value <= 1:
        raise ConfigError(f"{where}: fraction must be in (0, 1], got {value}")
    return Share(kind, value)  # type: ignore[arg-type]


def parse_mixture(data: Any, path: str) -> Mixture:
    """A mixture from the parsed YAML mapping; every mistake is one line naming the file and source."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a mixture must be a mapping with a 'sources' list")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ConfigError(f"{path}: 'sources' must be a non-empty list")
    if len(raw_sources) > np.iinfo(np.int16).max:
        raise ConfigError(f"{path}: at most {np.iinfo(np.int16).max} sources")
    defaults = {k: v for k, v in data.items() if k not in _MIX_KEYS}
    names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}")
    if defaults.get("eval_input"):
        raise ConfigError(f"{path}: eval_input belongs to a source (eval_inputs), not to the whole mixture")
    unit = data.get("unit", "rows")
    if unit not in ("rows", "tokens"):
        raise ConfigError(f"{path}: unit must be rows or tokens, got {unit!r}")
    total = data.get("total")
    if total is not None:
        total = _number(total, f"{path}: total", integer=True)
    sources, seen = [], set()
    for k, raw in enumerate(raw_sources):
        if not isinstance(raw, dict):
            raise ConfigError(f"{_where(path, k)}: expected a mapping with name and inputs")
        raw = {str(key).replace("-", "_"): v for key, v in raw.items()}
        name = raw.get("name")
        where = _where(path, k, name if isinstance(name, str) else None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: name must be letters, digits, '_', '-', '.', got {name!r}")
        if name in seen:
            raise ConfigError(f"{where}: source name {name!r} is used twice")
        seen.add(name)
        if "inputs" not in raw:
            raise ConfigError(f"{where}: inputs are missing")
        options = {key: v for key, v in raw.items() if key not in _SOURCE_KEYS}
        shared = sorted(set(options) & set(SHARED_KEYS))
        if shared:
            raise ConfigError(f"{where}: {', '.join(shared)} is shared by all sources: set it at the top level or as a flag")
        bad = sorted(set(options) - names)
        if bad:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(bad)}")
        if "eval_input" in options:
            raise ConfigError(f"{where}: use eval_inputs for a source's eval files")
        if "eval_inputs" in raw:
            options["eval_input"] = list(_files(raw["eval_inputs"], f"{where}: eval_inputs"))
        sources.append(Source(name, _files(raw["inputs"], f"{where}: inputs"), _share(raw, where), options))
    fractions = [s.share.value for s in sources if s.share.kind == "fraction"]
    if sum(fractions) > 1 + 1e-9:
        raise ConfigError(f"{path}: the fractions add up to {sum(fractions):g} > 1")
    if fractions and total is None and len(fractions) == len(sources) and abs(sum(fractions) - 1) > 1e-9:
        raise ConfigError(f"{path}: every source is a fraction, so they must add up to 1 (or give total)")
    if fractions and total is None and len(fractions) < len(sources) and abs(sum(fractions) - 1) <= 1e-9:
        raise ConfigError(f"{path}: the fractions add up to 1 but other sources take rows or tokens too; give total")
    return Mixture(path, tuple(sources), unit, total, defaults)


def load_mixture(path: str | Path) -> Mixture:
    """Read and check a mixture file (safe YAML); the sources' configs are checked by :meth:`Mixture.source_config`."""
    return parse_mixture(read_yaml(path, "mixture"), str(path))


def mixture_recipe(path: str | Path | None, recipe: str | Path | None) -> dict[str, Any]:
    """The recipe `prepare --mix` runs with: the mixture's top-level options, then ``--recipe``'s."""
    top = load_mixture(path).defaults if path else {}
    return {**top, **load_recipe(recipe)}


# -- what each source gives -----------------------------------------------------------------------


@dataclass(frozen=True)
class Take:
    """Positions (into a source's pool of examples) that go into the mixture, with how they were chosen."""

    members: np.ndarray  # int64, sorted: each position `copies` or `copies + 1` times
    copies: int  # whole copies of the pool
    sampled: int  # examples of the seeded sample on top of the copies

    @property
    def rows(self) -> int:
        return len(self.members)


def _rng(seed: int, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x6D6978, k])  # one stream per (seed, source)


def take_rows(n_pool: int, n: int, rng: np.random.Generator) -> Take:
    """n examples from a pool of n_pool: n // n_pool whole copies, then a seeded sample of the rest."""
    if n and not n_pool:
        raise ConfigError(f"cannot take {n} rows from a source with no examples")
    copies, rest = divmod(n, n_pool) if n_pool else (0, 0)
    sample = np.sort(rng.permutation(n_pool)[:rest])
    return Take(np.sort(np.concatenate([np.tile(np.arange(n_pool), copies), sample])), copies, rest)


def take_tokens(lengths: np.ndarray, n_tokens: int, rng: np.random.Generator) -> Take:
    """Whole examples worth at most n_tokens: whole copies of the pool, then the longest prefix of a
    seeded permutation whose tokens fit in what is left."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if n_tokens and not total:
        raise ConfigError(f"cannot take {n_tokens} tokens from a source with no tokens")
    copies = n_tokens // total if total else 0
    left = n_tokens - copies * total
    perm = rng.permutation(len(lengths))
    k = int(np.searchsorted(np.cumsum(lengths[perm]), left, side="right"))
    members = np.concatenate([np.tile(np.arange(len(lengths)), copies), perm[:k]])
    return Take(np.sort(members), copies, k)


def plan_mixture(mix: Mixture, pools: list[np.ndarray], seed: int) -> list[Take]:
    """What each source gives, from its pool's example lengths (tokens); see docs/mixtures.md.

    Sources with rows/tokens (or no share) are taken first. A fraction F then takes round(F * total)
    in the mixture's unit, where total is ``mix.total`` when given; otherwise, with other sources,
    what they took divided by (1 - sum of fractions); with fractions only, the largest total that
    needs no source repeated: floor(min over sources of pool / F)."""
    if len(pools) != len(mix.sources):
        raise ValueError("one pool per source")
    takes: list[Take | None] = [None] * len(pools)
    measure = (lambda t, k: t.rows) if mix.unit == "rows" else (lambda t, k: int(pools[k][t.members].sum()))
    for k, (src, lengths) in enumerate(zip(mix.sources, pools)):
        if src.share.kind == "fraction":
            continue
        if src.share.kind == "tokens":
            takes[k] = take_tokens(lengths, int(src.share.value), _rng(seed, k))
        else:
            n = len(lengths) if src.share.kind == "all" else int(src.share.value)
            takes[k] = take_rows(len(lengths), n, _rng(seed, k))
    frac = [k for k, s in enumerate(mix.sources) if s.share.kind == "fraction"]
    if frac:
        total = mix.total
        if total is None:
            fsum = sum(mix.sources[k].share.value for k in frac)
            if len(frac) < len(pools):
                taken = sum(measure(t, k) for k, t in enumerate(takes) if t is not None)
                total = round(taken / (1 - fsum))
            else:
                size = (lambda k: len(pools[k])) if mix.unit == "rows" else (lambda k: int(pools[k].sum()))
                total = int(min(math.floor(size(k) / mix.sources[k].share.value + 1e-9) for k in frac))
        for k in frac:
            n = round(mix.sources[k].share.value * total)
            rng = _rng(seed, k)
            takes[k] = take_rows(len(pools[k]), n, rng) if mix.unit == "rows" else take_tokens(pools[k], n, rng)
    return [t for t in takes if t is not None]


def eval_members(n: int, fraction: float, seed: int, k: int) -> np.ndarray:
    """Source k's seeded eval subset of its n examples (positions, sorted): round(n * fraction),
    at least 1 and at most n - 1 when a fraction is asked for and n > 1."""
    m = round(n * fraction)
    if fraction and n > 1:
        m = min(max(m, 1), n - 1)
    return np.sort(np.random.default_rng([seed, 1, k]).permutation(n)[:m])


# -- per-source totals --------------------------------------------------------------------------


def rg(tokens: dict[str, int]) -> float | None:
    """Ratio of sums: completion / (prompt + template) tokens; None without prompt or template tokens."""
    denom = tokens["prompt"] + tokens["template"]
    return tokens["completion"] / denom if denom else None


def source_ranges(manifest: dict[str, Any]) -> tuple[list[str], np.ndarray] | None:
    """(names in mixture order, start of each source's example_index range plus the end), or None
    for a DIR that is not a mixture."""
    sources = manifest.get("sources")
    if not sources:
        return None
    names = list(sources)
    bounds = [sources[n]["index_range"][0] for n in names] + [sources[names[-1]]["index_range"][1]]
    return names, np.asarray(bounds, np.int64)


def source_of(example_index: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Source position of each example_index, from :func:`source_ranges`' bounds."""
    return np.searchsorted(bounds, np.asarray(example_index, np.int64), side="right") - 1
