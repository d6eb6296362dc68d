"""What preparing on K machines costs in packing: RACE train in K slices (`--num-shards K`), merged.

Each slice is packed on its own, so the merged DIR can hold a few more rows than one global packing
would. The merged manifest's `merge.extra_rows` counts them against the global lower bound
ceil(tokens / max_length); one job reaches that bound on RACE train (see bench_pack), so extra_rows
is the whole cost. Slices run one after another here (on K machines they run side by side).

    python analysis/benchmarks/bench_merge.py --slices 4 --json results/merge.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_memory import RACE, REPO, TOKENIZER, race_args  # this folder is on sys.path when run as a script


def _plw_data(*args: str) -> float:
    cmd = [str(Path(sys.executable).parent / "plw-data"), *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - t


def measure(slices: int, max_length: int, tmp: Path) -> dict:
    parts, seconds = [], []
    for i in range(slices):
        part = tmp / f"part-{i}"
        seconds.append(round(_plw_data(
            "prepare", str(RACE), "--recipe", str(REPO / "recipes" / "race.yaml"), "--tokenizer", str(TOKENIZER),
            "--max-length", str(max_length), "--num-shards", str(slices), "--shard-index", str(i),
            "--output", str(part), "--quiet"), 1))  # fmt: skip
        parts.append(str(part))
    merge_s = _plw_data("merge", *parts, "--output", str(tmp / "merged"))
    m = json.loads((tmp / "merged" / "manifest.json").read_text())
    train = m["splits"]["train"]
    return {
        "slices": slices,
        "examples": train["examples"],
        "tokens": train["tokens"],
        "rows": train["rows"],
        "lower_bound_rows": train["lower_bound_rows"],
        "extra_rows": m["merge"]["extra_rows"]["train"],
        "slice_seconds": seconds,
        "merge_seconds": round(merge_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    a = race_args(__doc__, "--slices", [4], argv)
    if a is None:
        return 0
    results = []
    for k in a.slices:
        with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
            results.append(measure(k, a.max_length, Path(tmp)))
        print(json.dumps(results[-1]), flush=True)
    if a.json:
        meta = {"race": str(RACE), "tokenizer": TOKENIZER.name, "max_length": a.max_length}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"benchmark": "merge", "meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
