"""`plw-data prepare --ray [ADDRESS] --num-shards K`: the K slices as Ray tasks, then one merge.

Each task prepares slice i exactly as `prepare --num-shards K --shard-index i` does by hand, into
``OUTPUT/.plw-slices/i``. Ray reruns a task whose worker died (``MAX_RETRIES``); the rerun finds the
slice's unfinished ``.plw-tmp`` and rebuilds it from scratch (see output.py), and a slice finished
by an earlier, failed run of the same command is reused. The driver then merges the slices into
OUTPUT (merge.py), so OUTPUT is byte for byte what running the K slices by hand into those folders
and merging them gives. Paths are used as given, in the driver's working directory: on a multi-node
cluster every node must see the inputs, the tokenizer and OUTPUT at the same paths (docs/ray.md).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import schema as S
from ..config import DataConfig
from ..errors import ConfigError, PLWError
from .merge import merge

#: Reruns of a slice whose Ray worker died (a crash, a lost node, the OOM killer); a slice that
#: raises an error (a bad option, --on-error fail) is not rerun: it would fail the same way.
MAX_RETRIES = 3

#: What a Ray task runs: (inputs, slice config, slice folder, driver's working directory) -> stats.
SliceTask = Callable[[list[str], DataConfig, Path, str], dict[str, Any]]


def prepare_slice(inputs: list[str], cfg: DataConfig, output: Path, cwd: str) -> dict[str, Any]:
    """One slice, as a Ray task runs it: the plain `prepare` of ``--shard-index i``, in the driver's
    working directory where this node has it (a local cluster does), so relative paths mean the same."""
    from .pipeline import prepare

    if os.path.isdir(cwd):
        os.chdir(cwd)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tasks are the parallelism
    t0 = time.perf_counter()
    manifest = prepare(inputs, cfg, output, progress=False)
    return {"rows": manifest["counts"]["input_rows"], "seconds": round(time.perf_counter() - t0, 3)}


def slice_dirs(output: Path, k: int) -> list[Path]:
    """Where slice i of a --ray run is written: the parts the merge reads (and records)."""
    return [output / S.SLICES_NAME / str(i) for i in range(k)]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'plw-data[ray]'") from None
    return ray


def _connect(ray: Any, where: str) -> bool:
    """Join the Ray instance already running in this process, or start/join the one `where` names
    (``local``, ``local:N`` CPUs, or a cluster address); True when this call started the connection."""
    if ray.is_initialized():
        return False
    if where == "local" or where.startswith("local:"):  # N checked by DataConfig.validate
        n = where.partition(":")[2]
        ray.init(num_cpus=int(n) if n else None, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=where, log_to_driver=False)
    return True


def _failure(ray: Any, i: int, e: Exception) -> PLWError:
    """One clear line for a slice that failed for good."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, PLWError):
        return type(e.cause)(f"slice {i}: {e.cause}")
    if isinstance(e, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return PLWError(f"slice {i}: its Ray worker died on every one of {MAX_RETRIES + 1} attempts ({type(e).__name__})")
    return PLWError(f"slice {i}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def run_slices(inputs: list[str], cfg: DataConfig, parts: list[Path], *, task: SliceTask = prepare_slice,
               log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Run slice i into parts[i] as Ray tasks (connected already); per-slice stats, in slice order.

    Logs a line per finished slice: slices done and rows/s over the cluster since the start."""
    ray = _import_ray()
    remote = ray.remote(num_cpus=cfg.num_proc, max_retries=MAX_RETRIES)(task)
    cwd = os.getcwd()
    t0 = time.perf_counter()
    pending = {
        remote.remote(inputs, dataclasses.replace(cfg, shard_index=i, ray=None), part, cwd): i for i, part in enumerate(parts)
    }
    stats: dict[int, dict[str, Any]] = {}
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        try:
            stats[i] = ray.get(ref)
        except Exception as e:  # a Ray error wrapping whatever the task raised
            for other in pending:
                ray.cancel(other, force=True)
            raise _failure(ray, i, e) from None
        rows = sum(s["rows"] for s in stats.values())
        log(f"slice {i} done: {stats[i]['rows']:,} rows in {stats[i]['seconds']:.1f}s; {len(stats)}/{len(parts)} slices, "
            f"{rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s over the cluster")
    return [stats[i] for i in range(len(parts))]


def prepare_on_ray(inputs: list[str], cfg: DataConfig, output: Path, *, overwrite: bool = False,
                   task: SliceTask = prepare_slice, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Prepare `inputs` into `output` as ``cfg.num_shards`` Ray tasks plus a merge; returns the manifest.

    The caller (pipeline.prepare) has checked the config, the tokenizer and the output folder."""
    ray = _import_ray()
    assert cfg.ray is not None and cfg.num_shards >= 2
    output = Path(output)
    if overwrite:
        shutil.rmtree(output / S.SLICES_NAME, ignore_errors=True)  # no reuse of slices from another config
    parts = slice_dirs(output, cfg.num_shards)
    t0 = time.perf_counter()
    started = _connect(ray, cfg.ray)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        log(f"ray: {len(parts)} slices as tasks of {cfg.num_proc} CPU on a cluster of {cpus} CPUs")
        stats = run_slices(inputs, cfg, parts, task=task, log=log)
    finally:
        if started:
            ray.shutdown()
    if cfg.eval_fraction:
        log("ray: each slice drew its own eval split (--eval-fraction), as merge --per-slice-eval records")
    # The parts are ours; the output was checked by the caller.
    manifest = merge(parts, output, overwrite=True, per_slice_eval=bool(cfg.eval_fraction))
    shutil.rmtree(output / S.SLICES_NAME)  # the merged shards are hard links (or copies) of the slices'
    seconds = time.perf_counter() - t0
    rows = manifest["counts"]["input_rows"]
    S.write_json(output / S.RUN, {"ray": cfg.ray, "num_shards": len(parts), "num_proc": cfg.num_proc,
                                  "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1), "slices": stats})
    extra = ", ".join(f"{n} {r:+d} rows" for n, r in manifest["merge"]["extra_rows"].items())
    log(f"merged {len(parts)} slices into {output} in {seconds:.1f}s; per-slice packing vs the global bound: {extra}")
    return manifest
