"""plw-train vs PLWTrainer vs PLWSFTTrainer: the same loss, rows, model and LoRA; tokens/s and peak RSS.

Prepares ``--rows`` RACE train questions (recipes/race.yaml, ``--max-length``), turns the SmolLM2
GGUF into a plain HF folder once (``plw-data convert-gguf``; or give ``--model FOLDER``), then runs
each trainer in a fresh subprocess: LoRA r16 on all linear layers, fp32, ``--micro`` rows x
``--accum`` micro-batches per update, one epoch over the rows (``rows = steps * micro * accum``),
no eval. Reported per trainer: seconds per update after the first (the first pays one-time
costs), tokens/s over those updates, the process's peak RSS, and the wall and CPU time from start to exit.

    python analysis/benchmarks/bench_hf.py [--rows 24] [--max-length 256] [--micro 2] [--accum 2]
        [--threads 2] [--json OUT]
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

KINDS = ("plw-train", "PLWTrainer", "PLWSFTTrainer")


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
        ends: list[float] = []
        cpu: list[float] = []

        class Clock(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                self.t0, self.c0 = time.time(), time.process_time()

            def on_step_end(self, *args, **kwargs):
                ends.append(time.time() - self.t0)
                cpu.append(time.process_time() - self.c0)

        cls = hf.PLWSFTTrainer if a.kind == "PLWSFTTrainer" else hf.PLWTrainer
        trainer = cls(
            model=model, args=Args(**kw), train_dataset=load_from_disk(str(Path(a.data) / "train")),
            data_collator=PLWCollator(prompt_loss_weight=0.1), processing_class=load_tokenizer(str(a.model)),
            callbacks=[Clock()],
        )  # fmt: skip
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"ends": ends, "cpu": cpu, "losses": losses, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def summarise(kind: str, res: dict, tokens_per_update: float, wall: float, cpu: float) -> dict:
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
        results = []
        for i, kind in enumerate(a.kinds):  # a kind may repeat (interleaved repeats on a shared machine)
            cmd = [sys.executable, __file__, "--kind", kind, "--data", str(data), "--out", str(tmp / f"{i}-{kind}"),
                   "--model", str(model), "--steps", str(steps), "--micro", str(a.micro), "--accum", str(a.accum),
                   "--threads", str(a.threads)]  # fmt: skip
            t0, c0 = time.perf_counter(), _children_cpu()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
            if proc.returncode != 0:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            results.append(summarise(kind, json.loads(line[len("RESULT ") :]), tokens_per_update, wall, cpu))
            print(json.dumps(results[-1]))
    setup = {"rows": rows, "steps": steps, "micro": a.micro, "accum": a.accum, "max_length": a.max_length,
             "threads": a.threads, "model": str(a.model or GGUF), "lora_r": 16, "dtype": "fp32"}  # fmt: skip
    base = results[0]
    for r in results:
        r["tokens_per_second_vs_first"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3)
        r["peak_rss_vs_first"] = round(r["peak_rss_gb"] / base["peak_rss_gb"], 3)
    if a.json:
        a.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
