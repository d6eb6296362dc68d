"""Peak memory of `plw-data prepare` as the input grows: RACE train given 1x and Nx (as N inputs).

Bounded memory is the claim: rows are streamed, encoded examples staged in memory-mapped files and
shards written batch by batch, so the process's own (anonymous) memory should stay nearly flat while
the input grows N-fold. Each size runs `plw-data prepare` in a fresh process whose /proc status is
sampled: peak RSS (VmHWM), and the peaks of its anonymous part (RssAnon: heap, arrays) and its
file-backed part (RssFile: memory-mapped staging and shards, page cache the kernel can drop).

    python analysis/benchmarks/bench_memory.py --copies 1 10 --json results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RACE = REPO.parent / "shared" / "data" / "race" / "train.jsonl.gz"
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "smollm2-135m-instruct"


def _status(pid: int) -> dict[str, int]:
    """VmHWM, RssAnon, RssFile of a live process in KiB (empty once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {m[1]: int(m[2]) for m in re.finditer(r"^(VmHWM|RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


def measure(copies: int, tmp: Path, max_length: int) -> dict:
    inputs = []
    for i in range(copies):  # distinct paths to one file: N inputs, no N-fold disk copy
        link = tmp / f"race_train_{i}.jsonl.gz"
        if not link.exists():
            link.symlink_to(RACE)
        inputs.append(str(link))
    out = tmp / f"out-{copies}"
    cmd = [str(Path(sys.executable).parent / "plw-data"), "prepare", *inputs,
           "--recipe", str(REPO / "recipes" / "race.yaml"), "--tokenizer", str(TOKENIZER),
           "--max-length", str(max_length), "--output", str(out), "--overwrite", "--quiet"]  # fmt: skip
    t = time.perf_counter()
    err = tmp / "stderr.txt"
    with err.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        while proc.poll() is None:
            for key, kib in _status(proc.pid).items():
                peak[key] = max(peak[key], kib)
            time.sleep(0.2)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"prepare failed ({proc.returncode}): {err.read_text()[-2000:]}")
    m = json.loads((out / "manifest.json").read_text())
    shard_bytes = sum(s["bytes"] for s in m["splits"]["train"]["shards"])
    result = {
        "copies": copies,
        "input_rows": m["counts"]["input_rows"],
        "tokens": m["splits"]["train"]["tokens"],
        "input_bytes_gz": RACE.stat().st_size * copies,
        "shard_bytes": shard_bytes,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(m["splits"]["train"]["tokens"] / seconds),
        "peak_rss_mib": round(peak["VmHWM"] / 1024, 1),
        "peak_anon_mib": round(peak["RssAnon"] / 1024, 1),
        "peak_file_mib": round(peak["RssFile"] / 1024, 1),
    }
    shutil.rmtree(out)
    print(json.dumps(result), flush=True)
    return result


def race_args(doc: str, flag: str, default: list[int], argv: list[str] | None) -> argparse.Namespace | None:
    """Options of the benchmarks that run RACE train through the CLI; None (and why) without the data."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument(flag, type=int, nargs="+", default=default)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if not RACE.is_file() or not TOKENIZER.is_dir():
        print(f"skipped: {RACE} or {TOKENIZER} is absent", file=sys.stderr)
        return None
    return a


def main(argv: list[str] | None = None) -> int:
    a = race_args(__doc__, "--copies", [1, 10], argv)
    if a is None:
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        results = [measure(n, Path(tmp), a.max_length) for n in a.copies]
    if a.json:
        meta = {"race": str(RACE), "tokenizer": TOKENIZER.name, "max_length": a.max_length, "cpu_count": os.cpu_count()}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"benchmark": "memory", "meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
