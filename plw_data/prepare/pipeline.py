"""`plw-data prepare`: read -> convert -> render/tokenize/mask -> stage -> split -> pack -> shards -> manifest.

Crash safety: see :mod:`plw_data.prepare.output` (built in DIR/.plw-tmp, manifest written last).
Determinism: encoding is ordered whatever the number of processes, the eval split and the packing
depend only on the seed, and the manifest holds no timestamps (run.json does).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .. import schema as S
from ..config import DataConfig
from ..errors import ConfigError, PLWError, RowError
from ..tokenizer import load_tokenizer, tokenizer_fingerprint
from . import output as out
from .encode import EncodedBatch, Encoder
from .formats import convert
from .mixture import eval_members, load_mixture, plan_mixture, rg
from .pack import plan_packing, plan_unpacked
from .shards import Stage, StagedExamples, write_split
from .sources import RawRow, file_sha256, iter_rows, row_label

# -- encoding, in order, in 1 or N processes ----------------------------------------------------

_WORKER: Encoder | None = None


def _init_worker(cfg: DataConfig) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = Encoder(load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code), cfg)


def _encode_chunk(chunk: list[RawRow]) -> EncodedBatch:
    assert _WORKER is not None
    return _encode_with(_WORKER, chunk)


def _items(encoder: Encoder, chunk: list[RawRow]) -> list:
    return [(r.index, r.file, r.row, convert(r, encoder.cfg)) for r in chunk]


def _encode_with(encoder: Encoder, chunk: list[RawRow]) -> EncodedBatch:
    return encoder.encode(_items(encoder, chunk))


def _pipelined(encoder: Encoder, chunks: Iterable[list[RawRow]]) -> Iterator[EncodedBatch]:
    """One process, two stages at once: chunk k is tokenized in a thread (the Rust call releases the
    GIL) while Python reads, converts and renders chunk k+1 and masks chunk k-1; output order is
    input order, so results are identical to encoding chunk by chunk."""
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        pending = None
        for chunk in chunks:
            job = encoder.render(_items(encoder, chunk))
            future = pool.submit(encoder.tokenize, job)
            if pending is not None:
                yield encoder.finish(pending[0], pending[1].result())
            pending = (job, future)
        if pending is not None:
            yield encoder.finish(pending[0], pending[1].result())


def _chunks(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def _counted(rows: Iterable[RawRow], per_file: Counter) -> Iterator[RawRow]:
    for r in rows:
        per_file[r.file] += 1
        yield r


def encoded_batches(
    inputs: list[str], cfg: DataConfig, tok: Any, *, start_index: int = 0, per_file: Counter | None = None
) -> Iterator[EncodedBatch]:
    """Encoded chunks in input order; rows outside this job's slice (--num-shards) are skipped.

    per_file, when given, counts every row read per input file (all slices)."""
    rows: Iterable[RawRow] = iter_rows(inputs, start_index=start_index, split=cfg.split)
    if per_file is not None:
        rows = _counted(rows, per_file)
    if cfg.num_shards > 1:
        rows = (r for r in rows if r.index % cfg.num_shards == cfg.shard_index)
    chunks = _chunks(rows, cfg.batch_size)
    if cfg.num_proc == 1:
        yield from _pipelined(Encoder(tok, cfg), chunks)
        return
    yield from _in_processes(chunks, cfg)


def _in_processes(chunks: Iterable[list[RawRow]], cfg: DataConfig) -> Iterator[EncodedBatch]:
    """Encode in cfg.num_proc processes, in input order, at most 2 chunks per process in flight.

    A worker that dies (killed, out of memory) breaks the pool: that is a PLWError naming the cause,
    never a wait for a result that cannot come (and the run's DIR is left as it was)."""
    ctx = mp.get_context("spawn")  # fork after the Rust tokenizer spun up threads can deadlock
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(cfg.num_proc, mp_context=ctx, initializer=_init_worker, initargs=(cfg,)) as pool:
        try:
            for chunk in chunks:
                pending.append(pool.submit(_encode_chunk, chunk))
                if len(pending) >= 2 * cfg.num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise PLWError(
                f"an encoding process died (killed, or out of memory?) with --num-proc {cfg.num_proc}; "
                "nothing was written: run again, with fewer processes or a smaller --batch-size"
            ) from None
        finally:
            for future in pending:
                future.cancel()


# -- the command ------------------------------------------------------------------------------


class Progress:
    """Rows/s and tokens/s on stderr: a live rich line on a terminal; otherwise (piped, or
    ``live`` off) a plain log line with full numbers every ``every`` seconds and at the end."""

    def __init__(self, enabled: bool, log: Callable[[str], None] = lambda s: None, *, live: bool = True,
                 every: float = 30.0):
        self.enabled = enabled
        self.rows = self.tokens = 0
        self.t0 = self._last = time.perf_counter()
        self._log, self._every = log, every
        self._bar = None
        if enabled and live and sys.stderr.isatty():
            from rich.progress import Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
            self._task = self._bar.add_task("encoding")
            self._bar.start()

    def _line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return f"encoding: {self.rows:,} rows  {self.rows / dt:,.0f} rows/s  {self.tokens / dt:,.0f} tokens/s"

    def update(self, batch: EncodedBatch) -> None:
        self.rows += batch.rows
        self.tokens += int(batch.lengths.sum())
        if self._bar is not None:
            self._bar.update(self._task, description=self._line())
        elif self.enabled and time.perf_counter() - self._last >= self._every:
            self._last = time.perf_counter()
            self._log(self._line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def finish(self) -> None:
        """The closing plain line of a run that encoded everything."""
        if self.enabled and self._bar is None:
            self._log(f"{self._line()}  ({time.perf_counter() - self.t0:.1f}s)")


def _stage_inputs(
    inputs: list[str], cfg: DataConfig, tok: Any, stage: Stage, dropped: list, progress: Progress, start_index: int,
    per_file: Counter,
) -> tuple[StagedExamples, int, int]:
    """Encode inputs into `stage`; returns the staged examples, rows of this slice and examples truncated."""
    rows = truncated = 0
    for batch in encoded_batches(inputs, cfg, tok, start_index=start_index, per_file=per_file):
        if batch.dropped and cfg.on_error == "fail":
            index, file, row, err = batch.dropped[0]
            raise PLWError(err.located(file, row_label(file, row)))
        stage.append(batch)
        dropped.extend(batch.dropped)
        rows += batch.rows
        truncated += batch.truncated
        progress.update(batch)
    return stage.close(), rows, truncated


def _eval_members(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded, exact-size eval subset of n staged examples (positions, sorted)."""
    k = int(round(n * fraction))
    if fraction and n > 1:
        k = min(max(k, 1), n - 1)
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:k])


def _eval_members_by_row(example_index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The eval subset (positions): whole input rows, so the several examples one row can give
    (a reasoning conversation per trained turn) never straddle train and eval."""
    rows, first = np.unique(example_index, return_index=True)
    if len(rows) == len(example_index):  # one example per row: the plain seeded subset
        return _eval_members(len(example_index), fraction, seed)
    chosen = rows[_eval_members(len(rows), fraction, seed)]
    return np.flatnonzero(np.isin(example_index, chosen))


def _nothing_kept(n_rows: int, dropped: list) -> str:
    """The error of a run that kept no row: the reasons, and the first dropped row located."""
    if not dropped:
        return f"no row kept: the inputs hold {n_rows} rows"
    reasons = ", ".join(f"{r} {n}" for r, n in Counter(e.reason for *_, e in dropped).most_common())
    _, file, row, err = min(dropped, key=lambda d: d[0])
    return f"no row kept: all {n_rows} input rows were dropped ({reasons}); first: {err.located(file, row_label(file, row))}"


def _plan(staged: StagedExamples, members: np.ndarray, cfg: DataConfig):
    lengths = staged.lengths[members]
    if cfg.pack:
        return plan_packing(lengths, cfg.max_length, seed=cfg.seed)
    return plan_unpacked(len(lengths), seed=cfg.seed)


def _manifest_core(inputs: list[str], cfg: DataConfig, tok_fp: dict[str, Any]) -> dict[str, Any]:
    """The manifest's identity keys: what the data were made from."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("num_proc", "ray")}
    return {
        "format_version": S.FORMAT_VERSION,
        "created_by": f"plw-data {__version__}",
        "config": config,
        "tokenizer": tok_fp,
        "inputs": [{"path": p, "sha256": file_sha256(p)} for p in [*inputs, *cfg.eval_input]],
    }


def _same_data(old: dict[str, Any], core: dict[str, Any], cfg: DataConfig) -> bool:
    """Whether a finished DIR already holds what this run would write: same inputs, tokenizer and
    every option that changes bytes (``DataConfig.fingerprint_dict``); batching and error policy do not.
    A --ray run writes what merging its K slices writes: a merged DIR whose ``merge.num_shards`` is K."""
    inputs = lambda m: [{"path": i.get("path"), "sha256": i.get("sha256")} for i in m.get("inputs", [])]
    if ("merge" in old) != (cfg.ray is not None):
        return False
    try:
        sliced = {"num_shards": old["merge"]["num_shards"]} if "merge" in old else {}
        old_cfg = DataConfig(**{**old["config"], **sliced}).fingerprint_dict()
    except (KeyError, TypeError):
        return False
    return (old.get("format_version") == core["format_version"] and old.get("tokenizer") == core["tokenizer"]
            and inputs(old) == inputs(core) and old_cfg == cfg.fingerprint_dict()
            and old.get("mixture") == core.get("mixture"))


def _already_prepared(
    output: Path, core: dict[str, Any], cfg: DataConfig, overwrite: bool, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The manifest of a DIR that already holds exactly this data, else None once the DIR may be
    (re)built; a DIR holding other data needs --overwrite."""
    if (output / S.MANIFEST).exists() and not overwrite:
        old = S.read_manifest(output)
        if _same_data(old, core, cfg):
            log(f"{output}: already prepared with this config, tokenizer and inputs; nothing to do")
            return old
        raise ConfigError(f"{output}: holds data prepared with another config, tokenizer or inputs; use --overwrite")
    out.check_target(output, overwrite=overwrite)
    return None


def _write_dropped(work: Path, dropped: list) -> Counter:
    """dropped.jsonl in index order; returns the count per reason."""
    dropped.sort(key=lambda d: d[0])
    lines = "".join(
        json.dumps({"index": i, "reason": e.reason, "detail": e.detail, "file": f, "row": r, "field": e.field}) + "\n"
        for i, f, r, e in dropped
    )
    S.fsync_write(work / S.DROPPED, lines.encode())
    return Counter(err.reason for *_, err in dropped)


def _run_info(cfg: DataConfig, t0: float, input_rows: int, split_entries: dict[str, Any]) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    return {"num_proc": cfg.num_proc, "seconds": round(seconds, 3), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rows_per_s": round(input_rows / seconds, 1),
            "tokens_per_s": round(sum(e["tokens"] for e in split_entries.values()) / seconds, 1)}


def prepare(
    inputs: list[str],
    cfg: DataConfig,
    output: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
    live: bool = True,
) -> dict[str, Any]:
    """Prepare `inputs` (or the mixture ``cfg.mix``) into `output`; returns the manifest. ``progress``:
    report encoding speed, live on a terminal unless ``live`` is off, else as plain ``log`` lines."""
    if cfg.mix:
        return prepare_mixture(inputs, cfg, output, overwrite=overwrite, progress=progress, log=log)
    if not inputs:
        raise ConfigError("no input given")
    if cfg.tokenizer is None:
        raise ConfigError("--tokenizer is required")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    encoder = Encoder(tok, cfg)  # fail fast on a config the tokenizer cannot serve
    core = _manifest_core(inputs, cfg, tokenizer_fingerprint(encoder.tok, cfg.tokenizer))  # the template in use
    output = Path(output)
    out.check_target(output, overwrite=overwrite)
    if (output / S.MANIFEST).exists() and not overwrite:
        old = S.read_manifest(output)
        if _same_data(old, core, cfg):
            log(f"{output}: already prepared with this config, tokenizer and inputs; nothing to do")
            return old
        raise ConfigError(f"{output}: holds data prepared with another config, tokenizer or inputs; use --overwrite")
    if cfg.ray is not None:
        from .distributed import prepare_on_ray  # Ray is an optional extra: imported only here

        return prepare_on_ray(inputs, cfg, output, overwrite=overwrite, log=log)
    fresh = not output.exists()
    work = out.begin(output)

    bar = Progress(progress, log, live=live)
    dropped: list = []
    per_file: Counter = Counter()
    try:
        train, n_train_rows, truncated = _stage_inputs(inputs, cfg, tok, Stage(work / "stage-train"), dropped, bar, 0, per_file)
        splits: dict[str, tuple[StagedExamples, np.ndarray]] = {}
        if cfg.eval_input:
            start = sum(per_file.values())  # eval indices follow every train row, whatever the slice
            ev, n_eval_rows, t_eval = _stage_inputs(
                cfg.eval_input, cfg, tok, Stage(work / "stage-eval"), dropped, bar, start, per_file
            )
            truncated += t_eval
            splits["train"] = (train, np.arange(len(train.lengths)))
            splits["eval"] = (ev, np.arange(len(ev.lengths)))
        else:
            n_eval_rows = 0
            members = np.arange(len(train.lengths))
            if cfg.eval_fraction:
                ev_members = _eval_members_by_row(train.example_index, cfg.eval_fraction, cfg.seed)
                splits["train"] = (train, np.setdiff1d(members, ev_members))
                splits["eval"] = (train, ev_members)
            else:
                splits["train"] = (train, members)
        if not any(len(staged.lengths) for staged, _ in splits.values()):
            raise ConfigError(_nothing_kept(n_train_rows + n_eval_rows, dropped))
    except PLWError:
        out.discard(work, output, remove_output=fresh)
        raise
    finally:
        bar.close()
    bar.finish()

    needed = {c for staged, _ in splits.values() for c in staged.optional_columns()}
    optional = tuple(c for c in S.OPTIONAL_COLUMNS if c in needed)
    split_entries = {}
    for name, (staged, members) in splits.items():
        t_plan = time.perf_counter()
        plan = _plan(staged, members, cfg)
        log(f"{name}: planned {plan.n_rows:,} rows for {len(members):,} examples in {time.perf_counter() - t_plan:.2f}s")
        split_entries[name] = write_split(
            work / name, staged, members, plan, max_length=cfg.max_length, packed=cfg.pack, shard_tokens=cfg.shard_tokens,
            optional=optional,
        )

    dropped.sort(key=lambda d: d[0])
    reasons = Counter(err.reason for *_, err in dropped)
    lines = "".join(
        json.dumps({"index": i, "reason": e.reason, "detail": e.detail, "file": f, "row": r, "field": e.field}) + "\n"
        for i, f, r, e in dropped
    )
    S.fsync_write(work / S.DROPPED, lines.encode())
    examples = sum(e["examples"] for e in split_entries.values())
    kept = len(np.unique(np.concatenate([staged.example_index[m] for staged, m in splits.values()])))
    repeated = {"repeated": examples - kept} if examples > kept else {}  # several examples of one row
    manifest = {
        **core,
        "inputs": [{**i, "rows": per_file.get(i["path"], 0)} for i in core["inputs"]],
        "counts": {
            "input_rows": n_train_rows + n_eval_rows,
            "kept": kept,
            "dropped": dict(sorted(reasons.items())),
            "truncated": truncated,
            **repeated,
        },
        "splits": split_entries,
    }
    for leftover in ("stage-train", "stage-eval"):
        shutil.rmtree(work / leftover, ignore_errors=True)
    seconds = time.perf_counter() - t0
    run = {"num_proc": cfg.num_proc, "seconds": round(seconds, 3), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "rows_per_s": round((n_train_rows + n_eval_rows) / seconds, 1),
           "tokens_per_s": round(sum(e["tokens"] for e in split_entries.values()) / seconds, 1)}
    out.install(work, output, manifest, run)
    return manifest


# -- mixtures (docs/mixtures.md) ------------------------------------------------------------------


def _category_counts(batch: EncodedBatch) -> np.ndarray:
    """[n, 3] template/prompt/completion tokens per example (reasoning tokens are completion)."""
    if not len(batch.lengths):
        return np.zeros((0, 3), np.int64)
    starts = np.concatenate(([0], np.cumsum(batch.lengths)[:-1]))
    cat = np.minimum(batch.category, S.COMPLETION)
    return np.stack([np.add.reduceat((cat == c).astype(np.int64), starts) for c in (S.TEMPLATE, S.PROMPT, S.COMPLETION)], 1)


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
                raise PLWError(err.located(file, row))
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
    core = {**_manifest_core(files, cfg, tokenizer_fingerprint(tok, cfg.tokenizer)), "mixture": mix.describe()}
    output = Path(output)
    done = _already_prepared(output, core, cfg, overwrite, log)
    if done is not None:
        return done
    work = out.begin(output)

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
    needed = staged.optional_columns()
    optional = tuple(c for c in S.OPTIONAL_COLUMNS if c in needed)
    split_entries = {}
    for name, members in splits.items():
        plan = _plan(staged, members, cfg)
        split_entries[name] = write_split(
            work / name, staged, members, plan, max_length=cfg.max_length, packed=cfg.pack, shard_tokens=cfg.shard_tokens,
            optional=optional,
        )
    reasons = _write_dropped(work, dropped)
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
    out.install(work, output, manifest, _run_info(cfg, t0, mst.next_index, split_entries))
    return manifest


def _fmt_rg(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
