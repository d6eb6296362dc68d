"""The PLW experiment on RACE: prepare a seeded RACE subset, train SmolLM2-135M-Instruct + LoRA once per
PLW, and draw the curves (completion loss and answer accuracy per PLW; PLW=1's prompt / completion / full
loss with each minimum and the accuracy there).

Everything goes through the public commands (`plw-data prepare`, `plw-train`), so the log of commands in
results.md is exactly what a user would type. Sizes are flags; the defaults are the CPU "small" size
(minutes per PLW on 2 cores), which shows the pipeline works, not the science — see results.md.

    python analysis/plw_sweep/sweep.py                         # small CPU run into analysis/plw_sweep/results/
    python analysis/plw_sweep/sweep.py --train-rows 20000 --eval-rows 500 --max-length 1024 \\
        --micro-batch-size 8 --epochs 2 --eval-steps 50 --results runs/plw_sweep_gpu   # a GPU-sized run
    python analysis/plw_sweep/sweep.py --report-only           # redraw from the runs already there
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RACE = REPO.parent / "shared" / "data" / "race"
SMOL = REPO / ".cache" / "smollm2"
BIN = Path(sys.executable).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--race", type=Path, default=RACE, help="folder with RACE train.jsonl.gz and dev.jsonl.gz")
    p.add_argument("--model", default=str(SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--tokenizer", default=str(SMOL / "tokenizer"))
    p.add_argument("--plw", type=float, nargs="+", default=[1.0, 0.5, 0.1, 0.01, 0.0])
    p.add_argument("--train-rows", type=int, default=32, help="seeded sample of RACE train")
    p.add_argument("--eval-rows", type=int, default=16, help="seeded sample of RACE dev")
    p.add_argument("--max-length", type=int, default=320, help="tokens per row; long articles are cut on the left")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-steps", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=4e-4)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "plw_sweep", help="data and checkpoints")
    p.add_argument("--results", type=Path, default=HERE / "results", help="results.md, figures, metrics")
    p.add_argument("--report-only", action="store_true", help="only redraw figures and results.md")
    return p.parse_args(argv)


def sample_jsonl(src: Path, n: int, seed: int, dst: Path) -> int:
    """A seeded sample of n rows (order kept) so that several questions on one article do not dominate."""
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    keep = sorted(random.Random(seed).sample(range(len(lines)), min(n, len(lines))))
    dst.write_text("".join(lines[i] for i in keep), encoding="utf-8")
    return len(keep)


def run(cmd: list[str], log: list[dict[str, Any]]) -> None:
    shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(str(REPO) + "/", "")
    print(f"$ {shown}", flush=True)
    t = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log.append({"command": shown, "seconds": round(time.perf_counter() - t, 1)})


def plw_name(plw: float) -> str:
    return f"plw-{plw:g}"


def sweep(a: argparse.Namespace) -> list[dict[str, Any]]:
    data, log = a.work / "data", []
    data.mkdir(parents=True, exist_ok=True)
    n_train = sample_jsonl(a.race / "train.jsonl.gz", a.train_rows, a.seed, a.work / "train.jsonl")
    n_eval = sample_jsonl(a.race / "dev.jsonl.gz", a.eval_rows, a.seed, a.work / "dev.jsonl")
    print(f"RACE sample: {n_train} train rows, {n_eval} dev rows")
    run([BIN / "plw-data", "prepare", a.work / "train.jsonl", "--eval-input", a.work / "dev.jsonl",
         "--recipe", REPO / "recipes" / "race.yaml", "--tokenizer", a.tokenizer, "--max-length", a.max_length,
         "--seed", a.seed, "--output", data, "--overwrite"], log)  # fmt: skip
    # The untrained model's eval (step 0) is the same for every PLW: measured once, drawn on every curve.
    run([BIN / "plw-train", "--model", a.model, "--data", data, "--output", a.work / "step0", "--overwrite",
         "--max-steps", "0", "--dtype", a.dtype, "--seed", a.seed, "--no-progress"], log)  # fmt: skip
    for plw in a.plw:
        run([BIN / "plw-train", "--recipe", HERE / "train.yaml", "--model", a.model, "--data", data,
             "--output", a.work / plw_name(plw), "--overwrite", "--prompt-loss-weight", plw, "--dtype", a.dtype,
             "--micro-batch-size", a.micro_batch_size, "--gradient-accumulation-steps", a.gradient_accumulation_steps,
             "--num-epochs", a.epochs, "--eval-steps", a.eval_steps, "--learning-rate", a.learning_rate,
             "--seed", a.seed, "--no-progress"], log)  # fmt: skip
    return log


def load_runs(a: argparse.Namespace) -> dict[float, list[dict[str, Any]]]:
    from plw_data.train.plots import read_events

    start = [{**e, "step": 0} for e in read_events(a.work / "step0" / "metrics.jsonl") if "eval_completion_loss" in e]
    runs = {plw: read_events(a.work / plw_name(plw) / "metrics.jsonl") for plw in a.plw}
    return {plw: start + ev for plw, ev in runs.items() if ev}


def evals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "eval_completion_loss" in e]


def at_minimum(events: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The eval event where `key` is lowest (the first such, as early stopping would keep it)."""
    return min(evals(events), key=lambda e: e[key])


def plot(runs: dict[float, list[dict[str, Any]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plw_data.train.plots import series

    paths = []
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for plw, events in runs.items():
        for ax, key in ((ax_loss, "eval_completion_loss"), (ax_acc, "eval_answer_accuracy")):
            steps, values = series(events, key)
            ax.plot(steps, values, marker="o", ms=3, label=f"PLW {plw:g}")
    ax_loss.set(xlabel="update", ylabel="eval completion loss", title="Completion loss (answer letter + EOT)")
    ax_acc.set(xlabel="update", ylabel="eval answer accuracy", title="Answer accuracy", ylim=(0, 1))
    ax_acc.axhline(0.25, color="0.6", ls=":", lw=1, label="chance")
    ax_loss.legend(), ax_acc.legend()
    fig.savefig(out / "plw_sweep.png", dpi=120)
    paths.append(out / "plw_sweep.png")
    plt.close(fig)

    if 1.0 in runs:
        events = runs[1.0]
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        for key, label, color in (("eval_prompt_loss", "prompt", "C0"), ("eval_completion_loss", "completion", "C1"),
                                  ("eval_full_loss", "full", "C2")):  # fmt: skip
            steps, values = series(events, key)
            ax.plot(steps, values, color=color, marker="o", ms=3, label=f"{label} loss")
            best = at_minimum(events, key)
            ax.plot(best["step"], best[key], "*", color=color, ms=14, mec="k")
            ax.annotate(f"min {label}: acc {best['eval_answer_accuracy']:.2f}", (best["step"], best[key]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8, color=color)  # fmt: skip
        ax.set(xlabel="update", ylabel="eval loss", title="PLW = 1: which loss to stop on")
        ax.legend()
        fig.savefig(out / "plw1_losses.png", dpi=120)
        paths.append(out / "plw1_losses.png")
        plt.close(fig)
    return paths


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU only: {os.cpu_count()} cores ({cpu})"


def report(a: argparse.Namespace, runs: dict[float, list[dict[str, Any]]], log: list[dict[str, Any]]) -> str:
    import torch
    import transformers

    manifest = json.loads((a.work / "data" / "manifest.json").read_text())
    sp = manifest["splits"]
    lines = [
        "# PLW sweep on RACE",
        "",
        f"- date {time.strftime('%Y-%m-%d')}; {hardware()}; torch {torch.__version__}, transformers {transformers.__version__}",
        f"- model `{Path(a.model).name}` + LoRA (analysis/plw_sweep/train.yaml), dtype {a.dtype}, seed {a.seed}",
        f"- data: seeded sample (seed {a.seed}) of {sp['train']['examples']} RACE train and {sp['eval']['examples']} "
        f"RACE dev questions, `recipes/race.yaml`, max length {a.max_length} (long articles cut on the left; "
        f"{manifest['counts']['truncated']} truncated), packed into {sp['train']['rows']} train rows",
        f"- {a.epochs} epoch(s), micro batch {a.micro_batch_size} x accumulation {a.gradient_accumulation_steps}, "
        f"LR {a.learning_rate:g}, eval every {a.eval_steps} updates",
        "",
        "![completion loss and answer accuracy per PLW](plw_sweep.png)",
        "",
        "| PLW | updates | min eval completion loss (update) | answer acc. there | best answer acc. | final answer acc. | "
        "answer acc. at min full loss |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for plw, events in runs.items():
        ev = evals(events)
        c, f = at_minimum(events, "eval_completion_loss"), at_minimum(events, "eval_full_loss")
        lines.append(
            f"| {plw:g} | {ev[-1]['step']} | {c['eval_completion_loss']:.4f} ({c['step']}) | "
            f"{c['eval_answer_accuracy']:.3f} | {max(e['eval_answer_accuracy'] for e in ev):.3f} | "
            f"{ev[-1]['eval_answer_accuracy']:.3f} | {f['eval_answer_accuracy']:.3f} |"
        )
    if 1.0 in runs:
        lines += ["", "![PLW=1 prompt, completion and full loss with minima](plw1_losses.png)", "",
                  "| PLW = 1, stop on | update | loss there | answer acc. there |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for key in ("eval_prompt_loss", "eval_completion_loss", "eval_full_loss"):
            e = at_minimum(runs[1.0], key)
            lines.append(f"| {key} | {e['step']} | {e[key]:.4f} | {e['eval_answer_accuracy']:.3f} |")
    lines += ["", "## Commands", "", "```"]
    lines += [f"{e['command']}    # {e['seconds']} s" for e in log] or ["(report rebuilt from existing runs)"]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not (a.race / "train.jsonl.gz").is_file():
        print(f"RACE not found in {a.race} (see ../shared/data/README); nothing to do", file=sys.stderr)
        return 2
    a.results.mkdir(parents=True, exist_ok=True)
    log_file = a.results / "commands.json"
    if a.report_only:
        log = json.loads(log_file.read_text()) if log_file.is_file() else []
    else:
        log = sweep(a)
        log_file.write_text(json.dumps(log, indent=1) + "\n")
    runs = load_runs(a)
    for plw, events in runs.items():
        (a.results / f"metrics-{plw_name(plw)}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    plot(runs, a.results)
    (a.results / "results.md").write_text(report(a, runs, log))
    print(f"wrote {a.results / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
