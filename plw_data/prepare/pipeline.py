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
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .. import schema as S
from ..config import DataConfig
from ..errors import ConfigError, PLWError
from ..tokenizer import load_tokenizer, tokenizer_fingerprint
from . import output as out
from .encode import EncodedBatch, Encoder
from .formats import convert
from .pack import plan_packing, plan_unpacked
from .shards import Stage, StagedExamples, write_split
from .sources import RawRow, file_sha256, iter_rows

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
    ctx = mp.get_context("spawn")  # fork after the Rust tokenizer spun up threads can deadlock
    with ctx.Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap(_encode_chunk, chunks, chunksize=1)


# -- the command ------------------------------------------------------------------------------


class Progress:
    """Rows/s and tokens/s on stderr (rich), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.rows = self.tokens = 0
        self.t0 = time.perf_counter()
        self._bar = None
        if enabled:
            from rich.progress import Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
            self._task = self._bar.add_task("encoding")
            self._bar.start()

    def update(self, batch: EncodedBatch) -> None:
        self.rows += len(batch.lengths) + len(batch.dropped)
        self.tokens += int(batch.lengths.sum())
        if self._bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self._bar.update(
                self._task,
                description=f"encoding: {self.rows:,} rows  {self.rows / dt:,.0f} rows/s  {self.tokens / dt:,.0f} tokens/s",
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _stage_inputs(
    inputs: list[str], cfg: DataConfig, tok: Any, stage: Stage, dropped: list, progress: Progress, start_index: int,
    per_file: Counter,
) -> tuple[StagedExamples, int, int]:
    """Encode inputs into `stage`; returns the staged examples, rows of this slice and examples truncated."""
    rows = truncated = 0
    for batch in encoded_batches(inputs, cfg, tok, start_index=start_index, per_file=per_file):
        if batch.dropped and cfg.on_error == "fail":
            index, file, row, err = batch.dropped[0]
            raise PLWError(err.located(file, row))
        stage.append(batch)
        dropped.extend(batch.dropped)
        rows += len(batch.lengths) + len(batch.dropped)
        truncated += batch.truncated
        progress.update(batch)
    return stage.close(), rows, truncated


def _eval_members(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded, exact-size eval subset of n staged examples (positions, sorted)."""
    k = int(round(n * fraction))
    if fraction and n > 1:
        k = min(max(k, 1), n - 1)
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:k])


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
            and inputs(old) == inputs(core) and old_cfg == cfg.fingerprint_dict())


def prepare(
    inputs: list[str],
    cfg: DataConfig,
    output: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Prepare `inputs` into `output`; returns the manifest."""
    if not inputs:
        raise ConfigError("no input given")
    if cfg.tokenizer is None:
        raise ConfigError("--tokenizer is required")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    Encoder(tok, cfg)  # fail fast on a config the tokenizer cannot serve
    core = _manifest_core(inputs, cfg, tokenizer_fingerprint(tok, cfg.tokenizer))
    output = Path(output)
    if (output / S.MANIFEST).exists() and not overwrite:
        old = S.read_manifest(output)
        if _same_data(old, core, cfg):
            log(f"{output}: already prepared with this config, tokenizer and inputs; nothing to do")
            return old
        raise ConfigError(f"{output}: holds data prepared with another config, tokenizer or inputs; use --overwrite")
    out.check_target(output, overwrite=overwrite)
    if cfg.ray is not None:
        from .distributed import prepare_on_ray  # Ray is an optional extra: imported only here

        return prepare_on_ray(inputs, cfg, output, overwrite=overwrite, log=log)
    work = out.begin(output)

    bar = Progress(progress)
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
                ev_members = _eval_members(len(members), cfg.eval_fraction, cfg.seed)
                splits["train"] = (train, np.setdiff1d(members, ev_members))
                splits["eval"] = (train, ev_members)
            else:
                splits["train"] = (train, members)
    finally:
        bar.close()

    split_entries = {}
    for name, (staged, members) in splits.items():
        t_plan = time.perf_counter()
        plan = _plan(staged, members, cfg)
        log(f"{name}: planned {plan.n_rows:,} rows for {len(members):,} examples in {time.perf_counter() - t_plan:.2f}s")
        split_entries[name] = write_split(
            work / name, staged, members, plan, max_length=cfg.max_length, packed=cfg.pack, shard_tokens=cfg.shard_tokens
        )

    dropped.sort(key=lambda d: d[0])
    reasons = Counter(err.reason for *_, err in dropped)
    lines = "".join(
        json.dumps({"index": i, "reason": e.reason, "detail": e.detail, "file": f, "row": r, "field": e.field}) + "\n"
        for i, f, r, e in dropped
    )
    S.fsync_write(work / S.DROPPED, lines.encode())
    kept = sum(e["examples"] for e in split_entries.values())
    manifest = {
        **core,
        "inputs": [{**i, "rows": per_file.get(i["path"], 0)} for i in core["inputs"]],
        "counts": {
            "input_rows": n_train_rows + n_eval_rows,
            "kept": kept,
            "dropped": dict(sorted(reasons.items())),
            "truncated": truncated,
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
