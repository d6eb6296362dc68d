"""`plw-data prepare`: read -> convert -> render/tokenize/mask -> stage -> split -> pack -> shards -> manifest.

Crash safety: see :mod:`plw_data.prepare.output` (built in DIR/.plw-tmp, manifest written last).
Determinism: encoding is ordered whatever the number of processes, the eval split and the packing
depend only on the seed, and the manifest holds no timestamps (run.json does).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .. import schema as S
from ..config import DataConfig
from ..errors import ConfigError, PLWError
from ..tokenizer import load_tokenizer, tokenizer_fingerprint
from . import output as out
from .encode import Encoder
from .encoded import EncodedBatch
from .encoding import encoded_batches
from .pack import plan_packing, plan_unpacked
from .shards import Stage, StagedExamples, write_split
from .sources import file_sha256, row_label

# -- the command ------------------------------------------------------------------------------


class Progress:
    """Rows/s and tokens/s on stderr: a live rich line on a terminal; otherwise (piped, or
    ``live`` off) a plain log line with full numbers every ``every`` seconds and at the end."""

    def __init__(self, enabled: bool, log: Callable[[str], None] = lambda s: None, *, live: bool = True,
                 every: float = 30.0):
        self.enabled = enabled
        self.rows = self.tokens = 0
        self.renders: Counter = Counter()  # how chat rows were rendered (fast, checked, mismatch, jinja): run.json
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
        self.renders.update(batch.renders)
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


def stage_inputs(
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


def eval_members_by_row(example_index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The eval subset (positions): whole input rows, so the several examples one row can give
    (a reasoning conversation per trained turn) never straddle train and eval."""
    rows, first = np.unique(example_index, return_index=True)
    if len(rows) == len(example_index):  # one example per row: the plain seeded subset
        return _eval_members(len(example_index), fraction, seed)
    chosen = rows[_eval_members(len(rows), fraction, seed)]
    return np.flatnonzero(np.isin(example_index, chosen))


def nothing_kept(n_rows: int, dropped: list) -> str:
    """The error of a run that kept no row: the reasons, and the first dropped row located."""
    if not dropped:
        return f"no row kept: the inputs hold {n_rows} rows"
    reasons = ", ".join(f"{r} {n}" for r, n in Counter(e.reason for *_, e in dropped).most_common())
    _, file, row, err = min(dropped, key=lambda d: d[0])
    return f"no row kept: all {n_rows} input rows were dropped ({reasons}); first: {err.located(file, row_label(file, row))}"


def plan_split(staged: StagedExamples, members: np.ndarray, cfg: DataConfig):
    lengths = staged.lengths[members]
    if cfg.pack:
        return plan_packing(lengths, cfg.max_length, seed=cfg.seed)
    return plan_unpacked(len(lengths), seed=cfg.seed)


def manifest_core(inputs: list[str], cfg: DataConfig, tok_fp: dict[str, Any]) -> dict[str, Any]:
    """The manifest's identity keys: what the data were made from."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("num_proc", "ray", "check_render")}
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


def already_prepared(
    output: Path, core: dict[str, Any], cfg: DataConfig, overwrite: bool, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The manifest of a DIR that already holds exactly this data, else None once the DIR may be
    (re)built; a DIR holding other data needs --overwrite, and one plw-data did not write is refused."""
    out.check_target(output, overwrite=overwrite)
    if (output / S.MANIFEST).exists() and not overwrite:
        old = S.read_manifest(output)
        if _same_data(old, core, cfg):
            log(f"{output}: already prepared with this config, tokenizer and inputs; nothing to do")
            return old
        raise ConfigError(f"{output}: holds data prepared with another config, tokenizer or inputs; use --overwrite")
    return None


def write_dropped(work: Path, dropped: list) -> Counter:
    """dropped.jsonl in index order; returns the count per reason."""
    dropped.sort(key=lambda d: d[0])
    lines = "".join(
        json.dumps({"index": i, "reason": e.reason, "detail": e.detail, "file": f, "row": r, "field": e.field}) + "\n"
        for i, f, r, e in dropped
    )
    S.fsync_write(work / S.DROPPED, lines.encode())
    return Counter(err.reason for *_, err in dropped)


def run_info(
    cfg: DataConfig, t0: float, input_rows: int, split_entries: dict[str, Any], renders: Counter | None = None
) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    return {"num_proc": cfg.num_proc, "seconds": round(seconds, 3), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rows_per_s": round(input_rows / seconds, 1),
            "tokens_per_s": round(sum(e["tokens"] for e in split_entries.values()) / seconds, 1),
            **({"renders": dict(sorted(renders.items()))} if renders else {})}


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
        from .mixing import prepare_mixture  # it builds on this module's pieces

        return prepare_mixture(inputs, cfg, output, overwrite=overwrite, progress=progress, log=log)
    if not inputs:
        raise ConfigError("no input given")
    if cfg.tokenizer is None:
        raise ConfigError("--tokenizer is required")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    encoder = Encoder(tok, cfg)  # fail fast on a config the tokenizer cannot serve
    core = manifest_core(inputs, cfg, tokenizer_fingerprint(encoder.tok, cfg.tokenizer))  # the template in use
    output = Path(output)
    done = already_prepared(output, core, cfg, overwrite, log)
    if done is not None:
        return done
    if cfg.ray is not None:
        from .distributed import prepare_on_ray  # Ray is an optional extra: imported only here

        return prepare_on_ray(inputs, cfg, output, overwrite=overwrite, log=log)
    fresh = not output.exists()
    work = out.begin(output)

    bar = Progress(progress, log, live=live)
    dropped: list = []
    per_file: Counter = Counter()
    try:
        train, n_train_rows, truncated = stage_inputs(inputs, cfg, tok, Stage(work / "stage-train"), dropped, bar, 0, per_file)
        splits: dict[str, tuple[StagedExamples, np.ndarray]] = {}
        if cfg.eval_input:
            start = sum(per_file.values())  # eval indices follow every train row, whatever the slice
            ev, n_eval_rows, t_eval = stage_inputs(
                cfg.eval_input, cfg, tok, Stage(work / "stage-eval"), dropped, bar, start, per_file
            )
            truncated += t_eval
            splits["train"] = (train, np.arange(len(train.lengths)))
            splits["eval"] = (ev, np.arange(len(ev.lengths)))
        else:
            n_eval_rows = 0
            members = np.arange(len(train.lengths))
            if cfg.eval_fraction:
                ev_members = eval_members_by_row(train.example_index, cfg.eval_fraction, cfg.seed)
                splits["train"] = (train, np.setdiff1d(members, ev_members))
                splits["eval"] = (train, ev_members)
            else:
                splits["train"] = (train, members)
        if not any(len(staged.lengths) for staged, _ in splits.values()):
            raise ConfigError(nothing_kept(n_train_rows + n_eval_rows, dropped))
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
        plan = plan_split(staged, members, cfg)
        log(f"{name}: planned {plan.n_rows:,} rows for {len(members):,} examples in {time.perf_counter() - t_plan:.2f}s")
        split_entries[name] = write_split(
            work / name, staged, members, plan, max_length=cfg.max_length, packed=cfg.pack, shard_tokens=cfg.shard_tokens,
            optional=optional,
        )

    reasons = write_dropped(work, dropped)
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
    out.install(work, output, manifest, run_info(cfg, t0, n_train_rows + n_eval_rows, split_entries, bar.renders))
    return manifest
