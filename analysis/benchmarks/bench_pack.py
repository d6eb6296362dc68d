"""Rows, fill and time of the global packing planner against global best-fit decreasing (and TRL).

Length distributions: real ones (SmolLM2 tokenizer, chat template, as `plw-data prepare` renders
them) of RACE train, GSM8K train and Alpaca (first 5,000), and synthetic ones of 1,000,000 lengths.
For each (distribution, method) it reports the medians over --repeats of: rows, the lower bound
ceil(tokens / max_length), rows / lower bound, fill = tokens / (rows * max_length), wall seconds
and CPU seconds (this machine is shared: CPU time is the steadier of the two).

Methods:
- ``plw_data``: ``plw_data.prepare.pack.plan_packing`` (lengths in, plan out);
- ``global_bfd``: ``plw_data.prepare.pack.plan_bfd``, global best-fit decreasing over the whole split;
- ``trl_bfd``: ``trl.pack_dataset(ds, seq_length, strategy="bfd")`` as called by default (its
  ``datasets.map`` packs each batch of 1,000 examples on its own), and ``trl_bfd_global`` with
  ``map_kwargs={"batch_size": n}`` (one batch: global). Only when ``trl`` is importable; TRL also
  gathers the token columns, so its times include that work. Skipped above --trl-max-items.

    python analysis/benchmarks/bench_pack.py [--max-length 2048] [--repeats 3] [--race-rows N]
        [--synthetic-items 1000000] [--lengths-cache DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZER = SHARED_DATA / "tokenizers" / "smollm2-135m-instruct"


# --------------------------------------------------------------------------- length distributions


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))[:limit]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(limit or 10**9))]


def _race_pair(row: dict) -> tuple[str, str]:
    options = "\n".join(f"{letter}) {text}" for letter, text in zip("ABCD", row["options"]))
    prompt = (
        "Choose the correct option based on the context.\n"
        f"Context:{row['article']}\nQuestion:{row['question']}\nOptions:{options}"
    )
    return prompt, row["answer"]


def _alpaca_pair(row: dict) -> tuple[str, str]:
    prompt = f"{row['instruction']}\n\n{row['input']}" if row["input"].strip() else row["instruction"]
    return prompt, row["output"]


REAL = {  # name: (file under shared/data, row -> (prompt, completion))
    "race_train": ("race/train.jsonl.gz", _race_pair),
    "gsm8k_train": ("gsm8k/train.jsonl", lambda r: (r["question"], r["answer"])),
    "alpaca_first5000": ("alpaca/alpaca_data_first5000.json", _alpaca_pair),
}


def real_lengths(name: str, limit: int | None, cache: Path | None) -> np.ndarray:
    """Token counts of [user, assistant] through the SmolLM2 chat template (what prepare renders)."""
    rel, to_pair = REAL[name]
    cached = cache / f"{name}_{limit or 'all'}.npy" if cache else None
    if cached is not None and cached.exists():
        return np.load(cached)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    pairs = [to_pair(r) for r in _read_rows(SHARED_DATA / rel, limit)]
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in pairs]
    texts = [tok.apply_chat_template(chat, tokenize=False) for chat in chats]
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)  # = the template's ids
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, lengths)
    return lengths


def synthetic_lengths(kind: str, n: int, max_length: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "lognormal":  # long tail, median ~245 tokens, mean ~400 (instruction data)
        x = rng.lognormal(5.5, 1.0, n)
    else:  # narrow: ~4 per row, rows cannot be filled exactly without the right mix (like RACE)
        x = rng.normal(max_length / 4.3, max_length / 25, n)
    return np.clip(np.round(x), 1, max_length).astype(np.int64)


# --------------------------------------------------------------------------- methods


def _plw(lengths: np.ndarray, max_length: int) -> int:
    from plw_data.prepare.pack import plan_packing

    return plan_packing(lengths, max_length, seed=0).n_rows


def _bfd(lengths: np.ndarray, max_length: int) -> int:
    from plw_data.prepare.pack import plan_bfd

    return plan_bfd(lengths, max_length, seed=0).n_rows


def _trl(batch_size: int | None) -> Callable[[object, int], int]:
    def run(dataset, max_length: int) -> int:
        from trl import pack_dataset

        kwargs = {"batch_size": batch_size or len(dataset)}
        return len(pack_dataset(dataset, max_length, strategy="bfd", map_kwargs=kwargs))

    return run


def _trl_dataset(lengths: np.ndarray):
    """A datasets.Dataset whose input_ids have the given lengths (int8 zeros: only lengths matter)."""
    import pyarrow as pa
    from datasets import Dataset

    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(offsets[-1], np.int8)))
    return Dataset(pa.table({"input_ids": ids}))


def _trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:
        return False
    return True


def measure(fn: Callable, arg, max_length: int, repeats: int) -> dict:
    rows, walls, cpus = [], [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        rows.append(fn(arg, max_length))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {
        "rows": int(statistics.median(rows)),
        "seconds": statistics.median(walls),
        "cpu_seconds": statistics.median(cpus),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--race-rows", type=int, default=None, help="first N RACE train rows (default: all 87,866)")
    ap.add_argument("--synthetic-items", type=int, default=1_000_000)
    ap.add_argument("--lengths-cache", type=Path, default=None, help="keep computed real lengths here (.npy)")
    ap.add_argument("--trl-max-items", type=int, default=200_000, help="skip TRL on larger distributions")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from plw_data.prepare.pack import lower_bound_rows

    L = args.max_length
    distributions: dict[str, np.ndarray] = {}
    if SHARED_DATA.exists():
        race = real_lengths("race_train", args.race_rows, args.lengths_cache)
        distributions[f"race_train ({len(race):,} rows)"] = race
        if len(race) > 20_000:
            distributions["race_train first 20,000"] = race[:20_000]
        distributions["gsm8k_train"] = real_lengths("gsm8k_train", None, args.lengths_cache)
        distributions["alpaca_first5000"] = real_lengths("alpaca_first5000", None, args.lengths_cache)
    else:
        print(f"{SHARED_DATA} is absent: real length distributions skipped", file=sys.stderr)
    for kind in ("lognormal", "narrow"):
        distributions[f"synthetic {kind} ({args.synthetic_items:,})"] = synthetic_lengths(kind, args.synthetic_items, L)

    with_trl = not args.no_trl and _trl_available()
    if with_trl:
        import datasets

        datasets.disable_progress_bars()
    results = []
    for name, lengths in distributions.items():
        lengths = lengths[lengths <= L]  # prepare truncates or drops longer rows before packing
        tokens = int(lengths.sum())
        bound = lower_bound_rows(tokens, L)
        methods: list[tuple[str, Callable, object]] = [("plw_data", _plw, lengths)]
        methods.append(("global_bfd", _bfd, lengths))
        if with_trl and len(lengths) <= args.trl_max_items:
            dataset = _trl_dataset(lengths)
            methods.append(("trl_bfd (map batches of 1000)", _trl(1000), dataset))
            methods.append(("trl_bfd_global", _trl(None), dataset))
        for method, fn, arg in methods:
            r = measure(fn, arg, L, args.repeats)
            r.update(distribution=name, method=method, items=len(lengths), tokens=tokens, lower_bound=bound)
            r.update(ratio=r["rows"] / bound, fill=tokens / (r["rows"] * L))
            results.append(r)
            print(f"{name:40s} {method:30s} rows={r['rows']:>7} ratio={r['ratio']:.5f}", file=sys.stderr)

    print(f"\nmax_length {L}, medians of {args.repeats} runs\n")
    print("| distribution | method | items | rows | lower bound | rows / bound | fill | seconds | CPU seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['distribution']} | {r['method']} | {r['items']:,} | {r['rows']:,} | {r['lower_bound']:,} | "
            f"{r['ratio']:.5f} | {r['fill']:.5f} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "max_length": L,
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "trl": with_trl,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
