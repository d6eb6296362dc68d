"""plw-train vs PLWTrainer vs PLWSFTTrainer vs a hand-written Trainer subclass: the same loss, rows,
model and LoRA; tokens/s and peak RSS.

Prepares ``--rows`` RACE train questions (recipes/race.yaml, ``--max-length``), turns the SmolLM2
GGUF into a plain HF folder once (``plw-data convert-gguf``; or give ``--model FOLDER``), then runs
each trainer in a fresh subprocess: LoRA r16 on all linear layers, fp32, ``--micro`` rows x
``--accum`` micro-batches per update, one epoch over the rows (``rows = steps * micro * accum``),
no eval. Reported per trainer: seconds per update after the first (the first pays one-time
costs), tokens/s over those updates, the process's peak RSS, and the wall and CPU time from start to exit.

``hand-written`` is what a user writes without plw_data.hf: a ``transformers.Trainer`` subclass
with ``PLWCollator`` and ``weighted_ce_sum``, Σw over the accumulation window from
``get_batch_samples`` (see :func:`hand_written_trainer`). ``--repeats R`` runs R rounds of all kinds
(interleaved, so a busy spell on a shared machine hits every kind), each round starting one kind
later than the one before: with R a multiple of the number of kinds every kind runs equally often
first, second, ..., so a machine whose speed drifts during the benchmark (seen here: +15 % over
25 minutes, the same for every kind) favours none. Reported per kind: its median run, and
``*_paired``, the median over rounds of its ratio to the first kind in the same round.

A short warm-up run (2 updates of the last kind, not reported) comes first: in four benchmarks
the first run was 3-8 % slower than that kind's other runs, whichever kind it was.

Peak RSS under glibc's default allocator depends on the order of allocations (freed activation
memory is kept, and reused or not), so it moves by ±0.1 GB between identical runs. ``--live-memory``
adds one run per kind with ``MALLOC_MMAP_THRESHOLD_=1048576`` (every allocation of 1 MiB or more is
mapped and unmapped at once, so RSS follows the live bytes) over ``--live-steps`` updates:
``peak_live_rss_gb``, the steadier measure of memory (its per-update time is not reported: the page
faults slow every trainer alike).

    python analysis/benchmarks/bench_hf.py [--rows 24] [--max-length 256] [--micro 2] [--accum 2]
        [--threads 2] [--repeats 1] [--live-memory] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import GGUF, REPO, prepare  # this folder is on sys.path when run as a script

KINDS = ("plw-train", "PLWTrainer", "PLWSFTTrainer", "hand-written")


def hand_written_trainer():
    """The subclass a user writes by hand: the decoder's hidden states into ``weighted_ce_sum``,
    divided by Σw of the accumulation window (summed in ``get_batch_samples``, which Trainer passes
    on as ``num_items_in_batch``); ``remove_unused_columns=False`` keeps the collator's fields."""
    import torch
    from transformers import Trainer

    from plw_data import weighted_ce_sum

    class HandWritten(Trainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            total = sum(float((b["loss_weights"][:, 1:] * (b["labels"][:, 1:] != -100)).sum()) for b in batches)
            return batches, torch.tensor(total)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            decoder = model.get_base_model().get_decoder()
            hidden = decoder(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
            head = model.get_output_embeddings()
            ce = weighted_ce_sum(hidden.last_hidden_state, head.weight, inputs["labels"], inputs["loss_weights"])
            return ce / num_items_in_batch

    return HandWritten


def train_config(a: argparse.Namespace, out: Path):
    from plw_data.train.config import TrainConfig

    cfg = TrainConfig(
        model=str(a.model), data=str(a.data), output=str(out), dtype="fp32", max_steps=a.steps,
        micro_batch_size=a.micro, gradient_accumulation_steps=a.accum, lora_r=16, lora_dropout=0.0,
        learning_rate=2e-4, warmup_ratio=0.0, progress=False, prompt_loss_weight="0.1",
    )  # fmt: skip
    cfg.validate()
    return cfg


def child(a: argparse.Namespace) -> dict:
    """One trainer, in this process: update end times (wall and process CPU seconds since the loop began)."""
    if a.kind == "plw-train":  # what the plw-train command does first (docs/training.md)
        from plw_data.train.model import allocator_env

        allocator_env()
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    cfg = train_config(a, out / "run")
    if a.kind == "plw-train":
        from plw_data.train import train

        c0, cpu = time.process_time(), []
        events = train(cfg, on_event=lambda e: cpu.append(time.process_time() - c0) if "train_loss" in e else None)
        ends = [e["elapsed_s"] for e in events if "train_loss" in e]
        losses = [e["train_loss"] for e in events if "train_loss" in e]
    else:
        from datasets import load_from_disk
        from transformers import TrainerCallback

        import plw_data.hf as hf
        from plw_data import PLWCollator
        from plw_data.tokenizer import load_tokenizer
        from plw_data.train.model import load_model

        torch.manual_seed(cfg.seed)
        model = load_model(cfg)
        kw = dict(
            output_dir=str(out / "run"), max_steps=a.steps, per_device_train_batch_size=a.micro,
            gradient_accumulation_steps=a.accum, learning_rate=2e-4, warmup_steps=0, lr_scheduler_type="cosine",
            optim="adamw_torch", logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
            bf16=False, activation_checkpointing=False, disable_tqdm=True,
        )  # fmt: skip
        if a.kind == "PLWSFTTrainer":
            from trl import SFTConfig as Args
        else:
            from transformers import TrainingArguments as Args
        if a.kind == "hand-written":
            kw["remove_unused_columns"] = False
        ends: list[float] = []
        cpu: list[float] = []

        class Clock(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                self.t0, self.c0 = time.time(), time.process_time()

            def on_step_end(self, *args, **kwargs):
                ends.append(time.time() - self.t0)
                cpu.append(time.process_time() - self.c0)

        cls = {"PLWSFTTrainer": hf.PLWSFTTrainer, "PLWTrainer": hf.PLWTrainer}.get(a.kind) or hand_written_trainer()
        trainer = cls(
            model=model, args=Args(**kw), train_dataset=load_from_disk(str(Path(a.data) / "train")),
            data_collator=PLWCollator(prompt_loss_weight=0.1), processing_class=load_tokenizer(str(a.model)),
            callbacks=[Clock()],
        )  # fmt: skip
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"ends": ends, "cpu": cpu, "losses": losses, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def summarise(kind: str, res: dict, wall: float, cpu: float, tokens_per_update: float) -> dict:
    ends = res["ends"]
    per_update = (ends[-1] - ends[0]) / (len(ends) - 1)
    cpu_per_update = (res["cpu"][-1] - res["cpu"][0]) / (len(ends) - 1)
    return {
        "trainer": kind,
        "seconds_per_update": round(per_update, 3),
        "tokens_per_second": round(tokens_per_update / per_update, 1),
        "cpu_seconds_per_update": round(cpu_per_update, 3),
        "first_update_seconds": round(ends[0], 2),
        "peak_rss_gb": round(res["peak_rss_gb"], 2),
        "process_seconds": round(wall, 1),
        "process_cpu_seconds": round(cpu, 1),
        "losses": res["losses"],
    }


def _children_cpu() -> float:
    """User + system CPU seconds of the finished children (contention inflates wall time more than this)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: convert the SmolLM2 GGUF)")
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--repeats", type=int, default=1, help="run the kinds in turn this many times; report medians")
    p.add_argument("--live-memory", action="store_true", help="one more run per kind with RSS following live bytes")
    p.add_argument("--live-steps", type=int, default=4)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the unreported warm-up run")
    # child mode
    p.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.kind:
        print("RESULT " + json.dumps(child(a)))
        return

    from datasets import load_from_disk

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(tmp, a.rows, a.max_length)
        train = load_from_disk(str(data / "train"))
        steps = min(len(train), a.rows) // (a.micro * a.accum)  # whole updates; the same rows for every trainer
        rows = steps * a.micro * a.accum
        tokens_per_update = sum(map(len, train["input_ids"])) / len(train) * a.micro * a.accum
        model = a.model
        if model is None:
            from plw_data.export import convert_gguf

            model = convert_gguf(GGUF, tmp / "smollm2")
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])

        def run(i: int, kind: str, n_steps: int, extra_env: dict[str, str]) -> tuple[dict, float, float]:
            cmd = [sys.executable, __file__, "--kind", kind, "--data", str(data), "--out", str(tmp / f"{i}-{kind}"),
                   "--model", str(model), "--steps", str(n_steps), "--micro", str(a.micro), "--accum", str(a.accum),
                   "--threads", str(a.threads)]  # fmt: skip
            t0, c0 = time.perf_counter(), _children_cpu()
            proc = subprocess.run(cmd, env={**env, **extra_env}, capture_output=True, text=True)
            wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
            if proc.returncode != 0:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            return json.loads(line[len("RESULT ") :]), wall, cpu

        if a.warmup:  # the first process on a quiet machine ran 3-8 % slower than the rest, whatever its kind
            run(-1, a.kinds[-1], min(2, steps), {})
        runs = []
        for i, (rnd, kind) in enumerate(rotated_rounds(a.kinds, a.repeats)):
            runs.append({"round": rnd, **summarise(kind, *run(i, kind, steps, {}), tokens_per_update)})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "losses"}), flush=True)
        live = {}
        if a.live_memory:
            for i, kind in enumerate(dict.fromkeys(a.kinds)):
                res, _, _ = run(1000 + i, kind, min(a.live_steps, steps), {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
                live[kind] = round(res["peak_rss_gb"], 3)
                print(f"{kind}: live peak RSS {live[kind]} GB", flush=True)
    results = [median_run([r for r in runs if r["trainer"] == kind]) for kind in dict.fromkeys(a.kinds)]
    for r in results:
        if r["trainer"] in live:
            r["peak_live_rss_gb"] = live[r["trainer"]]
    setup = {"rows": rows, "steps": steps, "micro": a.micro, "accum": a.accum, "max_length": a.max_length,
             "threads": a.threads, "model": str(a.model or GGUF), "lora_r": 16, "dtype": "fp32",
             "repeats": a.repeats, "live_steps": a.live_steps if a.live_memory else None}  # fmt: skip
    base = results[0]
    for r in results:
        r["tokens_per_second_vs_first"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3)
        r["peak_rss_vs_first"] = round(r["peak_rss_gb"] / base["peak_rss_gb"], 3)
        for key in ("tokens_per_second", "peak_rss_gb"):
            r[f"{key}_vs_first_paired"] = paired_ratio(runs, r["trainer"], base["trainer"], key)
        if "peak_live_rss_gb" in r:
            r["peak_live_rss_vs_first"] = round(r["peak_live_rss_gb"] / base["peak_live_rss_gb"], 3)
    for r in results:
        print(f"{r['trainer']:14s} {r['tokens_per_second']:7.1f} tokens/s ({r['tokens_per_second_vs_first']:.3f}x,"
              f" paired {r['tokens_per_second_vs_first_paired']:.3f}x)"
              f"  peak RSS {r['peak_rss_gb']:.2f} GB ({r['peak_rss_vs_first']:.3f}x, paired {r['peak_rss_gb_vs_first_paired']:.3f}x)"
              + (f"  live {r['peak_live_rss_gb']:.3f} GB ({r['peak_live_rss_vs_first']:.3f}x)" if "peak_live_rss_gb" in r else ""))
    if a.json:
        a.json.write_text(json.dumps({"setup": setup, "results": results, "runs": runs}, indent=2) + "\n")


def rotated_rounds(kinds: list[str], repeats: int) -> list[tuple[int, str]]:
    """(round, kind) in run order: round r runs the kinds starting at ``kinds[r % len(kinds)]``."""
    n = len(kinds)
    return [(r, kinds[(r + i) % n]) for r in range(repeats) for i in range(n)]


def paired_ratio(runs: list[dict], kind: str, base: str, key: str) -> float:
    """Median over rounds of ``kind``'s ``key`` over ``base``'s in the same round."""
    import statistics

    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["trainer"]] = r[key]
    return round(statistics.median(v[kind] / v[base] for v in by_round.values()), 3)


def median_run(runs: list[dict]) -> dict:
    """One kind's runs summed up by medians (tokens/s, peak RSS and the rest), with every run's values listed."""
    import statistics

    out = dict(runs[len(runs) // 2])
    for key in ("seconds_per_update", "tokens_per_second", "cpu_seconds_per_update", "peak_rss_gb", "process_seconds", "process_cpu_seconds"):
        out[key] = round(statistics.median(r[key] for r in runs), 3)
    out["tokens_per_second_runs"] = [r["tokens_per_second"] for r in runs]
    out["peak_rss_gb_runs"] = [r["peak_rss_gb"] for r in runs]
    return out


if __name__ == "__main__":
    main()
