"""Prepare speed as a user sees it: whole processes, fixed costs counted the same way on every side.

Every method is one fresh Python process, timed from the parent (wall seconds, and CPU seconds of
the process and everything it reaped: resource.RUSAGE_CHILDREN), so imports, the tokenizer load,
reading the input and writing the output count wherever they happen:

- ``prepare np=K``: ``plw-data prepare INPUT --recipe R -t TOK --output OUT --num-proc K -q``
  (read, convert, render, tokenize, masks, stage, pack, write Arrow shards and manifest).
- ``prepare ray=2``: the same with ``--num-shards 2 --ray local:2`` (2 slices as tasks on a local
  2-CPU Ray instance, then the merge); Ray's start-up and shut-down are in its time.
- ``raw tokenizer``: a process that imports transformers, loads the same tokenizer
  (``AutoTokenizer.from_pretrained``), reads the texts prepare renders (a JSON list, written by the
  parent beforehand with ``apply_chat_template(tokenize=False)``, not timed) and calls
  ``tok(texts, add_special_tokens=False)`` once: the floor for anything that tokenizes every row,
  with nothing written.
- ``prepare-np1-seq``, ``raw-seq``: the same two with TOKENIZERS_PARALLELISM=false (one tokenizer
  thread, as every ``--num-proc`` worker runs): on a busy machine the Rust thread pool mostly waits.
- ``trl np=1``: a process that imports TRL, loads the tokenizer, reads the input rows, converts them to
  TRL's conversational prompt/completion form and runs ``SFTTrainer._prepare_dataset`` (chat template,
  completion mask, BFD packing; in memory, nothing written). Only where TRL is installed.
- ``stages``: one ``prepare`` (num_proc 1, TOKENIZERS_PARALLELISM=false so every stage's CPU is in
  the thread that runs it) with the pipeline's stage functions wrapped by ``time.thread_time``
  accumulators: CPU seconds per 1,000 input rows for read, convert, render, tokenize, masks, stage,
  pack, write, hashing inputs, tokenizer load; start-up (interpreter, imports) and the rest too. The wrapping is
  in this benchmark, not in the library.

Inputs: Alpaca first5000 repeated R times (``--alpaca-repeat 6``: 30,000 rows) and the whole RACE train
split (87,866 rows). TOKENIZERS_PARALLELISM is left unset (as a user has it) for every timed process but
``stages`` and the ``-seq`` variants. One run of each method per case, methods in turn: on a shared machine, compare ratios
measured in the same run, not absolute seconds across runs; CPU-second ratios (``cpu_ratios``) are
the steadier measure of work there.

    python analysis/benchmarks/bench_prepare_fair.py [--datasets alpaca race] [--tokenizers smollm2-135m-instruct llama-3-instruct]
        [--methods prepare-np1 raw prepare-np2 ray trl stages] [--json analysis/benchmarks/results/prepare_fair.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
RACE = DATA / "race" / "train.jsonl.gz"
ALPACA = DATA / "alpaca" / "alpaca_data_first5000.json"
RECIPES = {"alpaca": "recipes/alpaca.yaml", "race": "recipes/race.yaml"}
METHODS = ["prepare-np1", "raw", "prepare-np2", "ray", "trl", "stages"]
#: the same with TOKENIZERS_PARALLELISM=false (one tokenizer thread), as `--num-proc 2` workers run
SEQUENTIAL = ["prepare-np1-seq", "raw-seq"]
STAGES = ["tokenizer load", "hash inputs", "read", "convert", "render", "tokenize", "masks", "stage", "pack", "write"]


# --------------------------------------------------------------------------- children (each a whole process)


def child_raw(tokenizer: str, texts: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rows = json.loads(Path(texts).read_text(encoding="utf-8"))
    ids = tok(rows, add_special_tokens=False)["input_ids"]
    return {"rows": len(ids), "tokens": sum(map(len, ids))}


def child_trl(tokenizer: str, recipe: str, path: str) -> dict[str, Any]:
    import datasets

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_prepare import conversations, data_config, trl_prepare

    from plw_data.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    datasets.disable_caching()
    cfg = data_config(recipe, tokenizer, 1)
    tok = load_tokenizer(tokenizer)
    with tempfile.TemporaryDirectory() as t:
        rows, tokens = trl_prepare(tok, conversations(Path(path), cfg), cfg.max_length, 1, Path(t))()
    return {"rows": rows, "tokens": tokens}


def child_stages(tokenizer: str, recipe: str, path: str, out: str) -> dict[str, Any]:
    """One instrumented prepare: thread CPU seconds spent in each stage function."""
    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare import encode, encoding, pipeline, shards

    acc: dict[str, float] = defaultdict(float)

    def wrap(owner: Any, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                acc[stage] += time.thread_time() - t

        setattr(owner, name, timed)

    def timed_rows(*a: Any, **k: Any) -> Any:
        it = iter(read(*a, **k))
        while True:
            t = time.thread_time()
            try:
                row = next(it)
            except StopIteration:
                acc["read"] += time.thread_time() - t
                return
            acc["read"] += time.thread_time() - t
            yield row

    read = encoding.iter_rows
    encoding.iter_rows = timed_rows
    for owner, name, stage in [
        (pipeline, "load_tokenizer", "tokenizer load"), (pipeline, "file_sha256", "hash inputs"), (encoding, "convert", "convert"),
        (encode.Encoder, "render", "render"), (encode.Encoder, "tokenize", "tokenize"), (encode.Encoder, "finish", "masks"),
        (shards.Stage, "append", "stage"), (shards.Stage, "close", "stage"), (pipeline, "plan_packing", "pack"),
        (pipeline, "write_split", "write"),
    ]:  # fmt: skip
        wrap(owner, name, stage)
    cfg = build_config(DataConfig, load_recipe(REPO / recipe), {"tokenizer": tokenizer, "num_proc": 1})
    cpu1 = time.process_time()  # since the process started: interpreter, imports
    m = pipeline.prepare([path], cfg, Path(out), overwrite=True, progress=False)
    total = time.process_time() - cpu1
    rows = m["counts"]["input_rows"]
    stages = {s: round(acc[s], 3) for s in STAGES}
    return {"rows": rows, "tokens": sum(s["tokens"] for s in m["splits"].values()), "startup_cpu_s": round(cpu1, 3),
            "prepare_cpu_s": round(total, 3), "stage_cpu_s": stages, "other_cpu_s": round(total - sum(stages.values()), 3),
            "cpu_s_per_1000_rows": {s: round(1000 * v / rows, 4) for s, v in stages.items()}}  # fmt: skip


# --------------------------------------------------------------------------- parent


def run_child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one whole process; its wall and CPU seconds (with everything it reaped) and its JSON line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), **(json.loads(lines[-1]) if lines else {})}


def prepared_counts(out: Path) -> dict[str, int]:
    m = json.loads((out / "manifest.json").read_text())
    return {"rows": m["counts"]["input_rows"], "tokens": sum(s["tokens"] for s in m["splits"].values())}


def shard_digests(out: Path) -> list[str]:
    m = json.loads((out / "manifest.json").read_text())
    return [s["sha256"] for split in m["splits"].values() for s in split["shards"]]


def rendered_texts(recipe: str, tokenizer: str, path: Path, dest: Path) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_prepare import conversations, data_config

    from plw_data.tokenizer import load_tokenizer

    cfg = data_config(recipe, tokenizer, 1)
    tok = load_tokenizer(tokenizer)
    texts = [tok.apply_chat_template(list(c.messages), tokenize=False) for c in conversations(path, cfg)]
    dest.write_text(json.dumps(texts), encoding="utf-8")
    return len(texts)


def bench_case(dataset: str, path: Path, tokenizer: str, methods: list[str], tmp: Path, trl: bool) -> dict[str, Any]:
    tok = str(DATA / "tokenizers" / tokenizer)
    recipe = RECIPES[dataset]
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    py = sys.executable
    prep = [py, "-m", "plw_data", "prepare", str(path), "--recipe", str(REPO / recipe), "-t", tok, "--quiet", "--overwrite"]
    texts = tmp / f"texts-{dataset}-{tokenizer}.json"
    n_texts = rendered_texts(recipe, tok, path, texts) if {"raw", "raw-seq"} & set(methods) else None
    me = [py, __file__, "--child"]
    results: dict[str, Any] = {}
    digests: dict[str, list[str]] = {}
    for method in methods:
        out = tmp / f"out-{method}"
        if method == "prepare-np1-seq":
            r = run_child([*prep, "--output", str(out), "--num-proc", "1"], {**env, "TOKENIZERS_PARALLELISM": "false"})
        elif method == "raw-seq":
            r = run_child([*me, "raw", tok, str(texts)], {**env, "TOKENIZERS_PARALLELISM": "false"})
        elif method.startswith("prepare-np"):
            r = run_child([*prep, "--output", str(out), "--num-proc", method.removeprefix("prepare-np")], env)
        elif method == "ray":
            r = run_child([*prep, "--output", str(out), "--num-shards", "2", "--ray", "local:2"], env)
        elif method == "raw":
            r = run_child([*me, "raw", tok, str(texts)], env)
        elif method == "trl":
            if not trl:
                continue
            r = run_child([*me, "trl", tok, recipe, str(path)], env)
        else:
            r = run_child([*me, "stages", tok, recipe, str(path), str(out)], {**env, "TOKENIZERS_PARALLELISM": "false"})
        if method.startswith("prepare") or method in ("ray", "stages"):  # the prepared DIR
            r.update(prepared_counts(out))
            digests[method] = shard_digests(out)
        r["rows_per_s"] = round(r["rows"] / r["seconds"], 1)
        results[method] = r
        print(f"  {dataset}/{tokenizer} {method}: {r['seconds']:.1f}s wall, {r['cpu_seconds']:.1f}s CPU, {r['rows_per_s']:,.0f} rows/s",
              file=sys.stderr, flush=True)  # fmt: skip
    ratios, cpu_ratios = {}, {}
    for a, b in [("prepare-np1", "raw"), ("prepare-np1-seq", "raw-seq"), ("prepare-np1-seq", "raw"), ("prepare-np2", "raw"),
                 ("prepare-np2", "prepare-np1"), ("ray", "prepare-np2"), ("ray", "prepare-np1"), ("prepare-np1", "trl")]:  # fmt: skip
        if a in results and b in results:  # speed = inverse time; CPU: the work each needed, inverse too
            ratios[f"{a} / {b}"] = round(results[b]["seconds"] / results[a]["seconds"], 3)
            cpu_ratios[f"{a} / {b}"] = round(results[b]["cpu_seconds"] / results[a]["cpu_seconds"], 3)
    same = {m: d == digests["prepare-np1"] for m, d in digests.items() if m != "ray"} if "prepare-np1" in digests else {}
    return {"dataset": dataset, "input": str(path), "tokenizer": tokenizer, "rendered_texts": n_texts, "methods": results,
            "speed_ratios": ratios, "cpu_ratios": cpu_ratios, "same_shards_as_np1": same}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        fn = {"raw": child_raw, "trl": child_trl, "stages": child_stages}[kind]
        print(json.dumps(fn(*rest)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["alpaca", "race"], choices=list(RECIPES))
    ap.add_argument("--tokenizers", nargs="+", default=["smollm2-135m-instruct", "llama-3-instruct"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + SEQUENTIAL)
    ap.add_argument("--alpaca-repeat", type=int, default=6, help="Alpaca first5000 repeated this many times")
    ap.add_argument("--race-rows", type=int, default=0, help="first N RACE train rows (0: all 87,866)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        import trl  # noqa: F401

        has_trl = True
    except Exception:
        has_trl = False
    load_before = os.getloadavg()
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as t:
        tmp = Path(t)
        for dataset in args.datasets:
            if dataset == "alpaca":
                path = tmp / f"alpaca_x{args.alpaca_repeat}.json"
                path.write_text(json.dumps(json.loads(ALPACA.read_text(encoding="utf-8")) * args.alpaca_repeat), encoding="utf-8")
            elif args.race_rows:
                import gzip

                path = tmp / f"race_{args.race_rows}.jsonl"
                with gzip.open(RACE, "rt", encoding="utf-8") as f:
                    path.write_text("".join(line for line, _ in zip(f, range(args.race_rows))), encoding="utf-8")
            else:
                path = RACE
            for tokenizer in args.tokenizers:
                results.append(bench_case(dataset, path, tokenizer, args.methods, tmp, has_trl))
    import tokenizers
    import transformers

    meta = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), "minutes": round((time.time() - t0) / 60, 1),
            "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "python": platform.python_version(), "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "trl": __import__("trl").__version__ if has_trl else None, "alpaca_rows": 5000 * args.alpaca_repeat,
            "race_rows": args.race_rows or 87_866}  # fmt: skip
    doc = {"benchmark": "prepare_fair", "meta": meta, "results": results}
    print(json.dumps({c["dataset"] + "/" + c["tokenizer"]: c["speed_ratios"] for c in results}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
