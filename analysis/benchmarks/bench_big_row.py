"""Peak memory of `plw-data prepare` on an input holding one 50 MB row (docs/guarantees.md).

The big row is dropped as ``row_too_large`` before rendering or tokenizing (the default limit is
64 x --max-length characters per field), so peak memory is that of reading it once, not the ~250
bytes per input byte a tokenizer call would take. Compared with the same input without the big row,
each run in its own process (peak RSS from getrusage of the child).

    python analysis/benchmarks/bench_big_row.py [--mb 50] [--tokenizer DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "smollm2-135m-instruct"


def _peak_rss_mib(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run cmd in a fresh process (via a tiny wrapper so getrusage sees only it); its peak RSS in MiB."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    return int(done.stderr.strip().splitlines()[-1]) / 1024, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50, help="Size of the big row's field in MB.")
    ap.add_argument("--tokenizer", default=str(TOKENIZER))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        small = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
        for name, rows in {"20 small rows": small,
                           f"20 small rows + one {args.mb} MB row": [*small[:10], {"question": "x" * (args.mb * 10**6),
                                                                                  "answer": "y"}, *small[10:]]}.items():
            src = t / f"{len(results)}.jsonl"
            src.write_text("".join(json.dumps(r) + "\n" for r in rows))
            cmd = [sys.executable, "-m", "plw_data", "prepare", str(src), "--tokenizer", args.tokenizer,
                   "--prompt-template", "{question}", "--completion-template", "{answer}", "--quiet",
                   "--output", str(t / f"out{len(results)}")]
            peak, done = _peak_rss_mib(cmd)
            if done.returncode:
                sys.exit(f"{name}: prepare failed: {done.stderr}")
            m = json.loads((t / f"out{len(results)}" / "manifest.json").read_text())
            results[name] = {"input_bytes": src.stat().st_size, "peak_rss_mib": round(peak, 1),
                             "kept": m["counts"]["kept"], "dropped": m["counts"]["dropped"]}
            print(f"{name:40s} input {src.stat().st_size / 2**20:8.1f} MiB  peak RSS {peak:8.1f} MiB  "
                  f"kept {m['counts']['kept']}  dropped {m['counts']['dropped']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
