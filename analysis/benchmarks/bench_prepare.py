"""Prepare throughput: ``plw_data.prepare.prepare`` against the raw fast tokenizer and TRL's SFT data preparation.

What is timed, per (dataset, tokenizer), each repeat in a fresh output directory:

- ``plw_data np=K``: ``prepare(inputs, cfg, out, progress=False)`` with ``cfg.num_proc = K``: read, convert,
  render (chat template), tokenize, mask, stage, pack, write Arrow shards and manifest; tokenizer load included.
  Imports are warm (a fresh ``plw-data prepare`` process pays ~4 s more once, mostly ``import torch`` pulled in
  by ``transformers.AutoTokenizer``; so does every worker when K > 1, where each worker tokenizes with
  TOKENIZERS_PARALLELISM=false while K = 1 lets the Rust tokenizer use every core).
- ``raw tokenizer``: ``tok(texts, add_special_tokens=False)`` (the fast tokenizer's ``__call__``) on the very
  strings prepare renders (rendered with ``apply_chat_template(tokenize=False)`` beforehand, not timed): the
  limit for anything that must tokenize every row. Once with TOKENIZERS_PARALLELISM as the user has it (unset:
  the Rust side uses every core) and once with it set to ``false`` (one core).
- ``trl np=K``: ``trl.SFTTrainer._prepare_dataset`` (tokenize prompt and prompt+completion per row through the
  chat template, completion mask, labels, BFD packing at max_length) on the same conversations as an in-memory
  ``datasets.Dataset`` in conversational prompt/completion form, ``completion_only_loss=True``,
  ``packing_strategy="bfd"``, ``dataset_num_proc=K``. Building that Dataset is not timed. TRL is optional:
  skipped when not importable.

Methods run round-robin inside each repeat, so load swings on a shared machine hit all of them alike.
Reported: medians over repeats of wall seconds, rows/s, tokens/s (each method's own output tokens) and CPU
seconds (this process plus reaped children: with a busy machine it is the steadier measure of work), and the
ratios ours / raw tokenizer, ours / TRL and 2 processes / 1 (speed on the same input rows: inverse ratio of
median wall seconds).

    python analysis/benchmarks/bench_prepare.py [--rows 20000] [--alpaca-rows 0] [--repeats 3] [--trl-repeats R]
        [--tokenizers smollm2-135m-instruct llama-3-instruct] [--num-proc 1 2] [--no-trl] [--json OUT]
    python analysis/benchmarks/bench_prepare.py --profile OUT.prof   # cProfile one num_proc=1 prepare
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
RACE = DATA / "race" / "train.jsonl.gz"
ALPACA = DATA / "alpaca" / "alpaca_data_first5000.json"
RACE_ROWS = 87_866
DATASETS = {"race": ("recipes/race.yaml", RACE), "alpaca": ("recipes/alpaca.yaml", ALPACA)}

# --------------------------------------------------------------------------- inputs


def race_subset(rows: int, tmp: Path) -> Path:
    """RACE train, or its first `rows` rows as a temporary jsonl (0: the whole file)."""
    if not rows:
        return RACE
    out = tmp / f"race_train_{rows}.jsonl"
    with gzip.open(RACE, "rt", encoding="utf-8") as f, out.open("w", encoding="utf-8") as g:
        for line, _ in zip(f, range(rows)):
            g.write(line)
    return out


def alpaca_subset(rows: int, tmp: Path) -> Path:
    """Alpaca first5000, or its first `rows` rows as a temporary json (0: all 5,000)."""
    if not rows:
        return ALPACA
    out = tmp / f"alpaca_{rows}.json"
    out.write_text(json.dumps(json.loads(ALPACA.read_text(encoding="utf-8"))[:rows]), encoding="utf-8")
    return out


def data_config(recipe: str, tokenizer: str, num_proc: int):
    from plw_data.config import DataConfig, build_config, load_recipe

    return build_config(DataConfig, load_recipe(REPO / recipe), {"tokenizer": tokenizer, "num_proc": num_proc})


def conversations(path: Path, cfg) -> list:
    """The conversations prepare renders from `path` (rows it would drop are left out)."""
    from plw_data.prepare.formats import convert
    from plw_data.prepare.sources import iter_rows

    convs = [convert(r, cfg) for r in iter_rows([str(path)], split=cfg.split)]
    return [c for c in convs if hasattr(c, "messages")]


# --------------------------------------------------------------------------- methods


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children."""
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], tuple[int, int]]) -> dict[str, float]:
    """Run fn (-> rows, tokens) once; wall and CPU seconds."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    rows, tokens = fn()
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": _cpu_seconds() - cpu, "rows": rows, "tokens": tokens}


def ours(path: Path, cfg, tmp: Path) -> Callable[[], tuple[int, int]]:
    def run() -> tuple[int, int]:
        from plw_data.prepare.pipeline import prepare

        out = Path(tempfile.mkdtemp(dir=tmp, prefix="prepared-"))
        try:
            manifest = prepare([str(path)], cfg, out, overwrite=True, progress=False)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return manifest["counts"]["input_rows"], sum(s["tokens"] for s in manifest["splits"].values())

    return run


def raw_tokenizer(tok: Any, texts: list[str], parallelism: str | None) -> Callable[[], tuple[int, int]]:
    """tok(texts) with TOKENIZERS_PARALLELISM set to `parallelism` (None: as the environment has it)."""

    def run() -> tuple[int, int]:
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        if parallelism is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism  # the Rust side reads it at every batch call
        try:
            ids = tok(texts, add_special_tokens=False)["input_ids"]
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        return len(ids), sum(map(len, ids))

    return run


def trl_dataset(convs: list):
    """The conversations as TRL's conversational prompt/completion dataset: prompt = every untrained turn."""
    from datasets import Dataset

    rows = []
    for c in convs:
        split = c.trained.index(True)
        rows.append({"prompt": list(c.messages[:split]), "completion": list(c.messages[split:])})
    return Dataset.from_list(rows)


def trl_prepare(tok: Any, convs: list, max_length: int, num_proc: int, tmp: Path) -> Callable[[], tuple[int, int]]:
    """SFTTrainer._prepare_dataset as the trainer calls it (no model needed: only these attributes are read)."""
    from types import SimpleNamespace

    from trl import SFTConfig, SFTTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TrainingArguments' deprecations: not ours to act on
        args = SFTConfig(
            output_dir=str(tmp / "trl"), max_length=max_length, packing=True, packing_strategy="bfd",
            completion_only_loss=True, dataset_num_proc=num_proc if num_proc > 1 else None, report_to="none",
            bf16=False, use_cpu=True,
        )  # fmt: skip
    trainer = SimpleNamespace(_tokenizer=tok, completion_only_loss=True, chat_template=None)
    dataset = trl_dataset(convs)

    def run() -> tuple[int, int]:
        packed = SFTTrainer._prepare_dataset(trainer, dataset, tok, args, True, None, "train")
        lengths = packed.with_format("arrow")["seq_lengths"]
        return len(dataset), int(sum(sum(s) for s in lengths.to_pylist()))

    return run


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- driver


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    seconds = statistics.median(r["seconds"] for r in runs)
    rows, tokens = runs[0]["rows"], runs[0]["tokens"]
    return {
        "rows": rows,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 3),
        "rows_per_s": round(statistics.median(r["rows"] / r["seconds"] for r in runs), 1),
        "tokens_per_s": round(statistics.median(r["tokens"] / r["seconds"] for r in runs), 1),
        "all_seconds": [round(r["seconds"], 3) for r in runs],
    }


def ratios(methods: dict[str, dict], num_procs: list[int]) -> dict[str, float]:
    """Speed ratios on the same input rows: inverse ratios of median wall seconds."""
    rate = {name: 1 / m["seconds"] for name, m in methods.items()}
    out = {}
    raw = rate.get("raw tokenizer")
    for k in num_procs:
        mine = rate.get(f"plw_data np={k}")
        if mine and raw:
            out[f"plw_data np={k} / raw tokenizer"] = mine / raw
        if mine and rate.get(f"trl np={k}"):
            out[f"plw_data np={k} / trl np={k}"] = mine / rate[f"trl np={k}"]
        if mine and rate.get("trl np=1"):
            out[f"plw_data np={k} / trl np=1"] = mine / rate["trl np=1"]
    if rate.get("plw_data np=1") and rate.get("plw_data np=2"):
        out["plw_data np=2 / np=1"] = rate["plw_data np=2"] / rate["plw_data np=1"]
    if raw and rate.get("raw tokenizer (TOKENIZERS_PARALLELISM=false)"):
        out["raw parallel / raw TOKENIZERS_PARALLELISM=false"] = raw / rate["raw tokenizer (TOKENIZERS_PARALLELISM=false)"]
    return {k: round(v, 3) for k, v in out.items()}


def bench_case(dataset: str, path: Path, tokenizer: str, args: argparse.Namespace, tmp: Path) -> dict:
    from plw_data.tokenizer import load_tokenizer

    recipe = DATASETS[dataset][0]
    cfg = data_config(recipe, str(DATA / "tokenizers" / tokenizer), 1)
    tok = load_tokenizer(cfg.tokenizer)
    convs = conversations(path, cfg)
    texts = [tok.apply_chat_template(list(c.messages), tokenize=False) for c in convs]
    cases: dict[str, Callable[[], tuple[int, int]]] = {}
    for k in args.num_proc:
        cases[f"plw_data np={k}"] = ours(path, data_config(recipe, cfg.tokenizer, k), tmp)
    cases["raw tokenizer"] = raw_tokenizer(tok, texts, None)
    if not args.no_parallelism_check:
        cases["raw tokenizer (TOKENIZERS_PARALLELISM=false)"] = raw_tokenizer(tok, texts, "false")
    if args.trl:
        for k in args.trl_num_proc:
            cases[f"trl np={k}"] = trl_prepare(tok, convs, cfg.max_length, k, tmp)
    runs: dict[str, list] = {name: [] for name in cases}
    for rep in range(args.repeats):
        for name, fn in cases.items():
            if name.startswith("trl ") and rep >= args.trl_repeats:
                continue
            runs[name].append(timed(fn))
            r = runs[name][-1]
            print(f"  {dataset}/{tokenizer} #{rep + 1} {name}: {r['seconds']:.2f}s ({r['rows'] / r['seconds']:,.0f} rows/s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    methods = {name: summarise(rs) for name, rs in runs.items()}
    return {
        "dataset": dataset,
        "input": str(path),
        "rows": len(convs),
        "tokenizer": tokenizer,
        "max_length": cfg.max_length,
        "methods": methods,
        "ratios": ratios(methods, args.num_proc),
    }


def profile(out: Path, args: argparse.Namespace) -> None:
    """cProfile one warm num_proc=1 prepare of the first dataset/tokenizer; print where the time goes."""
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        dataset = args.datasets[0]
        path = race_subset(args.rows, tmp) if dataset == "race" else alpaca_subset(args.alpaca_rows, tmp)
        cfg = data_config(DATASETS[dataset][0], str(DATA / "tokenizers" / args.tokenizers[0]), 1)
        ours(path, cfg, tmp)()  # warm: imports and caches, as every run but a CLI's first has them
        cProfile.runctx("run()", globals(), {"run": ours(path, cfg, tmp)}, str(out))
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def markdown(results: list[dict]) -> str:
    lines = [
        "| dataset | tokenizer | method | rows | tokens | seconds | CPU s | rows/s | tokens/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in results:
        for name, m in case["methods"].items():
            lines.append(
                f"| {case['dataset']} | {case['tokenizer']} | {name} | {m['rows']:,} | {m['tokens']:,} | {m['seconds']:.2f} "
                f"| {m['cpu_seconds']:.2f} | {m['rows_per_s']:,.0f} | {m['tokens_per_s']:,.0f} |"
            )
    lines += ["", "| dataset | tokenizer | speed ratio (same rows) | value |", "|---|---|---|---:|"]
    for case in results:
        lines += [f"| {case['dataset']} | {case['tokenizer']} | {k} | {v:.2f}x |" for k, v in case["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help=f"first N RACE train rows (0: all {RACE_ROWS:,})")
    ap.add_argument("--alpaca-rows", type=int, default=0, help="first N Alpaca rows (0: all 5,000 of first5000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--tokenizers", nargs="+", default=["smollm2-135m-instruct", "llama-3-instruct"])
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--trl-num-proc", type=int, nargs="+", default=[1], help="dataset_num_proc values for TRL")
    ap.add_argument("--trl-repeats", type=int, default=None, help="repeats for TRL, the slowest (default: --repeats)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even where it is installed")
    ap.add_argument("--no-parallelism-check", action="store_true", help="skip raw tokenizer with TOKENIZERS_PARALLELISM=false")
    ap.add_argument("--profile", type=Path, help="cProfile one num_proc=1 prepare into this file, print the top, exit")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not DATA.exists():
        print(f"{DATA} is absent: nothing to benchmark", file=sys.stderr)
        return 1
    if args.profile:
        profile(args.profile, args)
        return 0
    args.trl = not args.no_trl and trl_available()
    args.trl_repeats = min(args.trl_repeats or args.repeats, args.repeats)
    if args.trl:
        import datasets

        datasets.disable_progress_bars()
        datasets.disable_caching()
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as t:
        tmp = Path(t)
        for dataset in args.datasets:
            path = race_subset(args.rows, tmp) if dataset == "race" else alpaca_subset(args.alpaca_rows, tmp)
            for tokenizer in args.tokenizers:
                results.append(bench_case(dataset, path, tokenizer, args, tmp))
    table = markdown(results)
    trl_note = f" (TRL: {args.trl_repeats})" if args.trl else ""
    print(f"\nmedians of {args.repeats} repeats{trl_note}; CPU s = this process + its children\n\n{table}")
    if args.json:
        import tokenizers
        import transformers

        meta = {
            "repeats": args.repeats,
            "trl_repeats": args.trl_repeats if args.trl else None,
            "race_rows": args.rows or RACE_ROWS,
            "alpaca_rows": args.alpaca_rows or 5000,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "trl": __import__("trl").__version__ if args.trl else None,
            "tokenizers_parallelism_env": os.environ.get("TOKENIZERS_PARALLELISM"),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "prepare", "meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
