"""Collation throughput: PLWCollator on packed 2048-token rows vs transformers' DataCollatorWithFlattening.

Synthetic rows with realistic lengths: example lengths are log-normal (median ~250 tokens, as a mix of
Alpaca-like ~80-token and RACE-like ~450-token examples), packed first-fit in order into rows of at
most ``--max-length`` tokens; each example is template / prompt / completion in that order. Rows are
Python lists, as ``datasets.load_from_disk(...)[i]`` returns them, or numpy arrays (``--numpy`` rows
as ``with_format("numpy")`` gives). DataCollatorWithFlattening gets the same examples, unpacked (it
flattens a list of examples into one [1, total] row and computes no weights).

    python analysis/benchmarks/bench_collate.py [--rows-per-batch 8] [--batches 40] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np


def _examples(rng: np.random.Generator, n_tokens: int, max_length: int) -> list[dict[str, list[int]]]:
    out, total = [], 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(np.log(250), 0.8), 16, max_length))
        n_template = min(8, n // 4)
        n_completion = max(2, int(n * rng.uniform(0.02, 0.6)))
        n_prompt = n - n_template - n_completion
        cat = np.repeat([0, 1, 2], [n_template, n_prompt, n_completion])
        out.append(
            {
                "input_ids": rng.integers(0, 49152, n).tolist(),
                "template_mask": (cat == 0).astype(np.uint8).tolist(),
                "prompt_mask": (cat == 1).astype(np.uint8).tolist(),
                "completion_mask": (cat == 2).astype(np.uint8).tolist(),
            }
        )
        total += n
    return out


def _pack(examples: list[dict], max_length: int) -> list[list[int]]:
    """Indices of the examples of each row, first-fit in order."""
    rows, room = [], []
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    return rows


def _row(examples: list[dict], members: list[int]) -> dict[str, list[int]]:
    row = {k: [t for i in members for t in examples[i][k]] for k in examples[0]}
    row["seq_lengths"] = [len(examples[i]["input_ids"]) for i in members]
    row["example_index"] = list(members)
    return row


def _throughput(fn: Callable[[list], object], batches: list[list], tokens: int, repeats: int) -> dict[str, float]:
    """Tokens/s by wall clock and by this process's CPU time (steadier on a shared machine), best of ``repeats``."""
    fn(batches[0])  # warm-up
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            fn(batch)
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return {"wall": tokens / wall, "cpu": tokens / cpu}


def main() -> None:
    import torch
    from transformers import DataCollatorWithFlattening

    from plw_data.batch.collate import PLWCollator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rows-per-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # collation is single-threaded numpy: CPU time then equals busy wall time

    rng = np.random.default_rng(0)
    n_tokens = args.max_length * args.rows_per_batch * args.batches
    examples = _examples(rng, int(n_tokens * 1.02), args.max_length)
    packed = _pack(examples, args.max_length)[: args.rows_per_batch * args.batches]
    rows = [_row(examples, members) for members in packed]
    np_rows = [{k: np.asarray(v) for k, v in r.items()} for r in rows]
    per_batch = [slice(i, i + args.rows_per_batch) for i in range(0, len(rows), args.rows_per_batch)]
    tokens = sum(len(r["input_ids"]) for r in rows)
    n_examples = sum(len(r["seq_lengths"]) for r in rows)

    plain = PLWCollator(0.1)
    full = PLWCollator(0.1, emit_cu_seqlens=True, return_example_ids=True)
    # A mixture: a source per example, per-message weights on every second row, reasoning masks.
    mixed_rows = [
        {**r, "source_index": [k % 3 for k in range(len(r["seq_lengths"]))],
         "reasoning_mask": [int(c and (t % 5 == 0)) for t, c in enumerate(r["completion_mask"])],
         "message_weight": None if j % 2 else [0.5] * len(r["input_ids"])}
        for j, r in enumerate(rows)
    ]
    mixed = PLWCollator({"race": 0.01, "alpaca": 1.0, "gsm8k": 0.1}, sources=["race", "alpaca", "gsm8k"], reasoning_weight=0.5)
    flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    unpacked = [[{"input_ids": examples[i]["input_ids"]} for m in packed[s] for i in m] for s in per_batch]
    cases = {
        "PLWCollator (list rows)": (plain, [rows[s] for s in per_batch]),
        "PLWCollator +cu_seqlens +example_ids (list rows)": (full, [rows[s] for s in per_batch]),
        "PLWCollator (numpy rows)": (plain, [np_rows[s] for s in per_batch]),
        "PLWCollator per-source PLW + message weights + reasoning (list rows)": (mixed, [mixed_rows[s] for s in per_batch]),
        "DataCollatorWithFlattening (list examples)": (flatten, unpacked),
    }
    results = {name: _throughput(fn, batches, tokens, args.repeats) for name, (fn, batches) in cases.items()}

    fill = tokens / (len(rows) * args.max_length)
    print(
        f"{len(rows)} rows of <= {args.max_length} tokens ({n_examples} examples, {tokens} tokens, fill {fill:.3f}), "
        f"{args.rows_per_batch} rows per batch, best of {args.repeats}\n"
    )
    print("| collator | M tokens/s (CPU time) | M tokens/s (wall) |\n|---|---:|---:|")
    for name, rate in results.items():
        print(f"| {name} | {rate['cpu'] / 1e6:.1f} | {rate['wall'] / 1e6:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "benchmark": "collate",
                    "rows": len(rows),
                    "examples": n_examples,
                    "tokens": tokens,
                    "max_length": args.max_length,
                    "rows_per_batch": args.rows_per_batch,
                    "tokens_per_s": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
