"""Encode raw rows chunk by chunk, in input order, in one process or N.

One process overlaps work: chunk k is tokenized in a thread while Python renders chunk k+1 and masks
chunk k-1. N processes (``--num-proc``) encode chunks in spawned workers; results come back in
input order either way, so the output is the same bytes whatever the parallelism.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any

from ..config import DataConfig
from ..errors import PLWError
from ..tokenizer import load_tokenizer
from .encode import Encoder
from .encoded import EncodedBatch
from .formats import convert
from .sources import RawRow, iter_rows

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
