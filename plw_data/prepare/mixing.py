"""`plw-data prepare --mix`: several sources, each with its own recipe and share, into one DIR.

Each source is encoded with its own options into one stage (every example keeps its source), the
shares are taken by the seed (:mod:`plw_data.prepare.mixture`), and all examples are packed
together globally. See docs/mixtures.md for the rules the manifest and ``verify`` follow.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, PLWError, RowError
from ..tokenizer import load_tokenizer, tokenizer_fingerprint
from . import output as out
from .encode import Encoder
from .encoded import EncodedBatch
from .encoding import encoded_batches
from .mixture import eval_members, load_mixture, plan_mixture, rg
from .pipeline import Progress, already_prepared, manifest_core, nothing_kept, plan_split, run_info, write_dropped
from .sources import row_label
from .shards import Stage, StagedExamples, write_split


def _category_counts(batch: EncodedBatch) -> np.ndarray:
    """[n, 3] template/prompt/completion tokens per example (reasoning tokens are completion)."""
    c = batch.counts()
    return np.stack([c.template, c.prompt, c.completion], 1)


def _tokens(counts: np.ndarray) -> dict[str, int]:
    t, p, c = (int(x) for x in counts.sum(0)) if len(counts) else (0, 0, 0)
    return {"prompt": p, "completion": c, "template": t}


class _MixStage:
    """Every source's examples in one stage, in mixture order, with what the manifest needs per example."""

    def __init__(self, stage: Stage, bar: Progress):
        self.stage, self.bar = stage, bar
        self.counts: list[np.ndarray] = []
        self.n = 0  # examples staged so far
        self.next_index = 0  # global example_index of the next input row
        self.dropped: list = []
        self.truncated = 0
        self.file_rows: list[int] = []  # rows of every file read, in order

    def add(self, files: tuple[str, ...] | list[str], cfg: DataConfig, tok: Any, source: int) -> int:
        """Encode and stage ``files`` as source ``source``; returns the number of examples staged."""
        n0, per_file = self.n, Counter()
        for batch in encoded_batches(list(files), cfg, tok, start_index=self.next_index, per_file=per_file):
            if batch.dropped and cfg.on_error == "fail":
                _, file, row, err = batch.dropped[0]
                raise PLWError(err.located(file, row_label(file, row)))
            batch.source = np.full(len(batch.lengths), source, np.int16)
            self.stage.append(batch)
            self.counts.append(_category_counts(batch))
            self.dropped.extend(batch.dropped)
            self.truncated += batch.truncated
            self.n += len(batch.lengths)
            self.bar.update(batch)
        self.file_rows += [per_file.get(f, 0) for f in files]
        self.next_index += sum(per_file.values())
        return self.n - n0


def _not_sampled(positions: np.ndarray, staged: StagedExamples, files: list[str], file_rows: list[int]) -> list:
    """dropped.jsonl entries for examples a source's share left out (they are accounted for, not lost)."""
    starts = np.concatenate(([0], np.cumsum(file_rows)))
    index = staged.example_index[positions]
    where = np.searchsorted(starts, index, side="right") - 1
    err = RowError("not_sampled", "left out by the source's share in the mixture")
    return [(int(i), files[w], int(i - starts[w]), err) for i, w in zip(index, where)]


def prepare_mixture(
    inputs: list[str],
    cfg: DataConfig,
    output: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Prepare the sources of the mixture file ``cfg.mix`` into one DIR: each source encoded with its
    own options, its share taken by the seed, all packed together; every example keeps its source."""
    if inputs:
        raise ConfigError("with --mix the inputs come from the mixture file; give no INPUT")
    if cfg.tokenizer is None:
        raise ConfigError("--tokenizer is required")
    if cfg.eval_input:
        raise ConfigError("--eval-input does not apply to --mix: give eval_inputs per source in the mixture file")
    if cfg.num_shards > 1:
        raise ConfigError("--mix cannot be split with --num-shards")
    t0 = time.perf_counter()
    mix = load_mixture(cfg.mix)
    cfgs = [mix.source_config(cfg, k) for k in range(len(mix.sources))]
    tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    for c in cfgs:
        Encoder(tok, c)
    files = [f for src, c in zip(mix.sources, cfgs) for f in (*src.inputs, *c.eval_input)]
    core = {**manifest_core(files, cfg, tokenizer_fingerprint(tok, cfg.tokenizer)), "mixture": mix.describe()}
    output = Path(output)
    done = already_prepared(output, core, cfg, overwrite, log)
    if done is not None:
        return done
    fresh = not output.exists()
    work = out.begin(output)
    try:
        return _run(mix, cfg, cfgs, tok, files, core, work, output, t0, progress, log)
    except PLWError:
        out.discard(work, output, remove_output=fresh)
        raise


def _run(mix: Any, cfg: DataConfig, cfgs: list[DataConfig], tok: Any, files: list[str], core: dict[str, Any],
         work: Path, output: Path, t0: float, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Encode, take the shares, pack and write: the part of a mixture run that has a work folder."""
    bar = Progress(progress)
    mst = _MixStage(Stage(work / "stage-train"), bar)
    layout = []  # per source: (first staged position, train-input examples, eval-input examples, index range)
    try:
        for k, (src, c) in enumerate(zip(mix.sources, cfgs)):
            first, index0 = mst.n, mst.next_index
            n_train = mst.add(src.inputs, c, tok, k)
            n_eval = mst.add(c.eval_input, c, tok, k) if c.eval_input else 0
            layout.append((first, n_train, n_eval, (index0, mst.next_index)))
    finally:
        bar.close()
    staged = mst.stage.close()
    if not len(staged.lengths):
        raise ConfigError(nothing_kept(mst.next_index, mst.dropped))
    counts = np.concatenate(mst.counts) if mst.counts else np.zeros((0, 3), np.int64)

    pools, evals = [], []
    for k, ((first, n_train, n_eval, _), c) in enumerate(zip(layout, cfgs)):
        train_pos = first + np.arange(n_train)
        if c.eval_fraction:
            ev = eval_members(n_train, c.eval_fraction, cfg.seed, k)
            evals.append(train_pos[ev])
            train_pos = np.delete(train_pos, ev)
        else:
            evals.append(first + n_train + np.arange(n_eval))
        pools.append(train_pos)
    takes = plan_mixture(mix, [staged.lengths[p] for p in pools], cfg.seed)

    dropped, sources, train_members = list(mst.dropped), {}, []
    for k, (src, (first, n_train, n_eval, (i0, i1)), pool, take) in enumerate(zip(mix.sources, layout, pools, takes)):
        members = pool[take.members]
        distinct = np.unique(members)
        left_out = _not_sampled(np.setdiff1d(pool, distinct), staged, files, mst.file_rows)
        dropped.extend(left_out)
        reasons = Counter(e.reason for i, *_, e in dropped if i0 <= i < i1)
        tokens = _tokens(counts[members])
        train_members.append(members)
        sources[src.name] = {
            "inputs": list(src.inputs),
            "eval_inputs": list(cfgs[k].eval_input),
            "index_range": [i0, i1],
            "input_rows": i1 - i0,
            "kept": int(len(distinct) + len(evals[k])),
            "dropped": dict(sorted(reasons.items())),
            "share": src.share.describe(),
            "available": len(pool),
            "taken": len(members),
            "copies": take.copies,
            "sampled": take.sampled,
            "eval": len(evals[k]),
            "tokens": tokens,
            "eval_tokens": _tokens(counts[evals[k]]),
            "rg": rg(tokens),
        }
        log(f"{src.name}: {len(members):,} of {len(pool):,} examples ({take.copies} whole copies + {take.sampled:,} "
            f"sampled), {len(left_out):,} left out, {len(evals[k]):,} eval; Rg {_fmt_rg(rg(tokens))}")
    splits = {"train": np.concatenate(train_members)}
    if any(len(e) for e in evals):
        splits["eval"] = np.concatenate(evals)
    optional = staged.optional_columns()
    split_entries = {}
    for name, members in splits.items():
        plan = plan_split(staged, members, cfg)
        split_entries[name] = write_split(
            work / name, staged, members, plan, max_length=cfg.max_length, packed=cfg.pack, shard_tokens=cfg.shard_tokens,
            optional=optional,
        )
    reasons = write_dropped(work, dropped)
    kept = sum(s["kept"] for s in sources.values())
    manifest = {
        **core,
        "inputs": [{**i, "rows": n} for i, n in zip(core["inputs"], mst.file_rows)],
        "counts": {
            "input_rows": mst.next_index,
            "kept": kept,
            "dropped": dict(sorted(reasons.items())),
            "truncated": mst.truncated,
            "repeated": sum(e["examples"] for e in split_entries.values()) - kept,
        },
        "splits": split_entries,
        "sources": sources,
    }
    shutil.rmtree(work / "stage-train", ignore_errors=True)
    out.install(work, output, manifest, run_info(cfg, t0, mst.next_index, split_entries, bar.renders))
    return manifest


def _fmt_rg(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
