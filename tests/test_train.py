"""plw-train: loss normalisation, eval metrics, schedules, checkpoints; tiny random Llama on CPU.

The data (conftest.py `race_dir`) are real RACE rows prepared by `prepare` itself with the real
SmolLM2 tokenizer and chat template (packed rows with two examples each; docs/format.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

T, P, C = 0, 1, 2  # template, prompt, completion (plw_data.schema's codes)


# --------------------------------------------------------------------------- helpers (fixtures: conftest.py)


def make_config(model: Path, data: Path, out: Path, **overrides):
    from plw_data.train.config import TrainConfig

    base = dict(
        model=str(model), data=str(data), output=str(out), dtype="fp32", progress=False, learning_rate=1e-3,
        warmup_ratio=0.0,
    )
    cfg = TrainConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


def run_train(model: Path, data: Path, out: Path, **overrides) -> list[dict]:
    from plw_data.train import train

    train(make_config(model, data, out, **overrides))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(events: list[dict]) -> list[float]:
    return [e["train_loss"] for e in events if "train_loss" in e]


def saved_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    (file,) = [p for p in folder.glob("*.safetensors")]
    return load_file(str(file))


def reference_token_ce(model_dir: Path, split: Path) -> list[dict]:
    """Per example, from an unpacked forward pass with full logits: CE, argmax hit, category per target."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for row in load_from_disk(str(split)):
        ids = np.array(row["input_ids"])
        cats = np.array(row["prompt_mask"]) + 2 * np.array(row["completion_mask"])
        start = 0
        for length, index in zip(row["seq_lengths"], row["example_index"]):
            ex = torch.tensor(ids[start : start + length])[None]
            with torch.no_grad():
                logits = model(input_ids=ex).logits[0, :-1].float()
            target = ex[0, 1:]
            ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").numpy()
            hit = (logits.argmax(-1) == target).numpy()
            targets = slice(start + 1, start + length)
            out.append({"index": index, "ids": ids[targets], "ce": ce, "hit": hit, "cat": cats[targets]})
            start += length
    return out


# --------------------------------------------------------------------------- the loss the trainer optimises


def test_loss_is_window_normalised_ce_plw0_completion_only_plw1_full(tmp_path, tiny_model, race_dir):
    """Step 1 (PLW 0) logs completion-only mean CE, step 2 (PLW 1, template 1) full-sequence mean CE.

    One window holds every train row (12 rows = 4 x 3 micro-batches) and LR is 0, so both steps see the
    initial model (LoRA starts as the identity) and the reference is a plain full-logits forward pass.
    """
    events = run_train(
        tiny_model, race_dir, tmp_path / "out", max_steps=2, micro_batch_size=4, gradient_accumulation_steps=3,
        learning_rate=0.0, prompt_loss_weight="step:0:1@step=1", template_weight="step:0:1@step=1",
    )
    ref = reference_token_ce(tiny_model, race_dir / "train")
    ce = np.concatenate([r["ce"] for r in ref])
    cat = np.concatenate([r["cat"] for r in ref])
    train = [e for e in events if "train_loss" in e]
    assert [e["prompt_loss_weight"] for e in train] == [0.0, 1.0]
    assert [e["template_weight"] for e in train] == [0.0, 1.0]
    assert train[0]["train_loss"] == pytest.approx(ce[cat == C].mean(), rel=1e-5)
    assert train[1]["train_loss"] == pytest.approx(ce.mean(), rel=1e-5)
    assert train[0]["target_weight"] == (cat == C).sum() and train[1]["target_weight"] == len(ce)


@pytest.fixture(scope="module")
def big_batch_run(tmp_path_factory, tiny_model, race_dir):
    """Full fine-tuning, 2 updates of one micro-batch of 4 rows (the reference for accumulation and ranks)."""
    out = tmp_path_factory.mktemp("big") / "out"
    events = run_train(tiny_model, race_dir, out, max_steps=2, micro_batch_size=4, lora=False)
    return events, saved_weights(out / "last")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def test_accumulation_4x1_equals_1x4(tmp_path, tiny_model, race_dir, big_batch_run):
    big_events, big_weights = big_batch_run
    events = run_train(
        tiny_model, race_dir, tmp_path / "out", max_steps=2, micro_batch_size=1, gradient_accumulation_steps=4, lora=False
    )
    assert train_losses(events) == pytest.approx(train_losses(big_events), rel=1e-6)
    initial = saved_weights(tiny_model)
    moved = max(float((big_weights[k] - initial[k]).abs().max()) for k in initial if k in big_weights)
    assert moved > 1e-4  # the updates are real, so equal weights mean equal updates
    assert_same_weights(saved_weights(tmp_path / "out" / "last"), big_weights)


def test_zero3_equals_zero0(tmp_path, tiny_model, race_dir, big_batch_run):
    big_events, big_weights = big_batch_run
    events = run_train(
        tiny_model, race_dir, tmp_path / "out", max_steps=2, micro_batch_size=2, gradient_accumulation_steps=2, lora=False,
        zero_stage=3,
    )
    assert train_losses(events) == pytest.approx(train_losses(big_events), rel=1e-6)
    assert_same_weights(saved_weights(tmp_path / "out" / "last"), big_weights)


def test_one_rank_zero0_does_not_reduce_gradients(tmp_path, tiny_model, race_dir, big_batch_run, monkeypatch):
    """Alone, ZeRO 0 skips DeepSpeed's flatten/all-reduce/copy of every gradient; the update is unchanged."""
    from plw_data.train.trainer import Trainer

    trainer = Trainer(make_config(tiny_model, race_dir, tmp_path / "out", max_steps=2, micro_batch_size=4, lora=False))
    calls = []
    monkeypatch.setattr(trainer.engine, "buffered_allreduce_fallback", lambda *a, **k: calls.append(1))
    events = trainer.run()
    assert calls == []
    assert train_losses(events) == pytest.approx(train_losses(big_batch_run[0]), rel=1e-6)


def test_tokenizer_not_kept_through_training_and_checkpoints_carry_its_files(tmp_path, tiny_model, race_dir, monkeypatch):
    """The run's tokenizer is needed at start (closing ids) and in each checkpoint, as files: the object
    itself (46 MB of live memory for SmolLM2's) is released before training."""
    import gc
    import weakref

    import plw_data.train.trainer as trainer_module

    loaded = []

    def run_tokenizer(cfg):
        tok = real(cfg)
        loaded.append((weakref.ref(tok), tok.backend_tokenizer.to_str(), tok.chat_template))
        return tok

    real = trainer_module.run_tokenizer
    monkeypatch.setattr(trainer_module, "run_tokenizer", run_tokenizer)
    trainer = trainer_module.Trainer(make_config(tiny_model, race_dir, tmp_path / "out", max_steps=1))
    gc.collect()
    (ref, backend, template), = loaded
    assert ref() is None
    trainer.run()
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "last"))
    assert (saved.backend_tokenizer.to_str(), saved.chat_template) == (backend, template)


# --------------------------------------------------------------------------- eval


def test_max_steps_0_writes_one_eval_event_equal_to_unpacked_reference(tmp_path, tiny_model, race_dir):
    """Packed, batched eval (2 rows per pass, several examples per row) vs one unpacked forward per example."""
    out = tmp_path / "out"
    events = run_train(tiny_model, race_dir, out, max_steps=0, eval_batch_size=2, eval_data=str(race_dir / "eval"))
    assert len(events) == 1 and events[0]["step"] == 0 and events[0]["epoch"] == 0
    ref = reference_token_ce(tiny_model, race_dir / "eval")
    ce = np.concatenate([r["ce"] for r in ref])
    cat = np.concatenate([r["cat"] for r in ref])
    hit = np.concatenate([r["hit"] for r in ref])

    def answer_ok(r: dict) -> bool:
        comp = np.flatnonzero(r["cat"] == C)
        if r["ids"][comp[-1]] == 2:  # <|im_end|> closes the answer: not scored
            comp = comp[:-1]
        return bool(r["hit"][comp].all())

    expected = {
        "eval_prompt_loss": ce[cat == P].mean(),
        "eval_completion_loss": ce[cat == C].mean(),
        "eval_template_loss": ce[cat == T].mean(),
        "eval_full_loss": ce.mean(),
        "eval_token_accuracy": hit[cat == C].mean(),
        "eval_answer_accuracy": np.mean([answer_ok(r) for r in ref]),
    }
    for key, value in expected.items():
        assert events[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert events[0]["eval_examples"] == len(ref) and events[0]["eval_tokens"] == len(ce)
    assert (out / "metrics.png").stat().st_size > 0


def test_eval_sums_answer_accuracy_matches_per_example_reference():
    """Synthetic hits (mostly right) where answer accuracy is far from 0 or 1; closing token left out."""
    import torch

    from plw_data.batch.metrics import eval_sums, metrics_from_sums

    rng = np.random.default_rng(0)
    B, L = 3, 40
    category = torch.tensor(rng.choice([0, 1, 2], size=(B, L), p=[0.2, 0.4, 0.4]), dtype=torch.int8)
    example_id = torch.tensor(np.repeat(np.arange(B * 4), L // 4).reshape(B, L))
    input_ids = torch.tensor(rng.integers(3, 100, size=(B, L)))
    input_ids[category == 2] = torch.where(torch.rand(int((category == 2).sum())) < 0.3, 2, 50)  # some closing tokens
    labels = input_ids.clone()
    labels[:, 0] = -100
    labels[:, :: L // 4] = -100  # the first token of every example
    category[:, -3:], labels[:, -3:], example_id[:, -3:] = -1, -100, -1  # padding
    correct = torch.tensor(rng.random((B, L)) < 0.93)
    ce = torch.tensor(rng.random((B, L)), dtype=torch.float32)
    metrics = metrics_from_sums(eval_sums(ce, correct, labels, category, example_id, input_ids, torch.tensor([2])))

    target = (labels != -100).numpy()
    cat, ids, hit, ex = category.numpy(), input_ids.numpy(), correct.numpy(), example_id.numpy()
    verdicts = []
    for e in np.unique(ex[ex >= 0]):
        pos = np.flatnonzero(((ex == e) & target & (cat == 2)).ravel())
        if len(pos) and ids.ravel()[pos[-1]] == 2:
            pos = pos[:-1]
        if len(pos):
            verdicts.append(bool(hit.ravel()[pos].all()))
    assert 0 < np.mean(verdicts) < 1
    assert metrics["eval_answer_accuracy"] == pytest.approx(np.mean(verdicts))
    assert metrics["eval_examples"] == len(verdicts)
    comp = target & (cat == 2)
    assert metrics["eval_token_accuracy"] == pytest.approx(hit[comp].mean())
    assert metrics["eval_prompt_loss"] == pytest.approx(ce.numpy()[target & (cat == 1)].mean(), rel=1e-6)


# --------------------------------------------------------------------------- checkpoints, resume, failures


class Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run_and_bad_checkpoints_are_refused(tmp_path, tiny_model, race_dir):
    from plw_data.train.checkpoint import MARKER, CheckpointError
    from plw_data.train import train

    # 12 rows, 4 per update: 3 updates per epoch, so the run crosses an epoch; LoRA dropout uses the RNG.
    opts = dict(max_steps=5, micro_batch_size=2, gradient_accumulation_steps=2, eval_steps=2, lora_dropout=0.2)
    full = run_train(tiny_model, race_dir, tmp_path / "full", **opts)

    def stop_at_3(event: dict) -> None:
        if event["step"] == 3 and "train_loss" in event:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(make_config(tiny_model, race_dir, tmp_path / "cut", **opts), on_event=stop_at_3)
    with pytest.raises(Exception, match="holds a run already"):
        run_train(tiny_model, race_dir, tmp_path / "cut", **opts)
    resumed = run_train(tiny_model, race_dir, tmp_path / "cut", resume=True, **opts)

    assert resumed == [{**e, "elapsed_s": r["elapsed_s"]} if "elapsed_s" in e else e for e, r in zip(full, resumed)]
    assert train_losses(resumed) == train_losses(full) and len(train_losses(full)) == 5
    for name in ("last", "best"):
        a, b = saved_weights(tmp_path / "full" / name), saved_weights(tmp_path / "cut" / name)
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    adapter = tmp_path / "cut" / "last" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors does not match its sha256"):
        run_train(tiny_model, race_dir, tmp_path / "cut", resume=True, **opts)
    (tmp_path / "cut" / "last" / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        run_train(tiny_model, race_dir, tmp_path / "cut", resume=True, **opts)


def test_non_finite_loss_stops_naming_the_step(tmp_path, tiny_model, race_dir):
    from plw_data.train import TrainingError

    # LR 1e30: the first update is finite; the weights it leaves overflow a later forward pass.
    with pytest.raises(TrainingError, match=r"non-finite train loss \(\w+\) at step \d+") as err:
        run_train(
            tiny_model, race_dir, tmp_path / "out", max_steps=3, micro_batch_size=4, learning_rate=1e30, lora=False
        )
    logged = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged and f"at step {logged[-1] + 1};" in str(err.value)


def test_early_stopping_keeps_best_and_last(tmp_path, tiny_model, race_dir):
    """Answer accuracy of a random model stays 0: the first eval is best, the second runs out of patience."""
    from plw_data.train.checkpoint import verify

    out = tmp_path / "out"
    events = run_train(
        tiny_model, race_dir, out, max_steps=6, eval_steps=1, best_metric="eval_answer_accuracy",
        early_stopping_patience=1, prompt_loss_weight="0", max_eval_rows=2,
    )
    assert [(e["step"], "train_loss" in e) for e in events] == [(1, True), (1, False), (2, True), (2, False)]
    best, last = verify(out / "best"), verify(out / "last")
    assert (best["step"], best["metric"], best["value"]) == (1, "eval_answer_accuracy", 0.0)
    assert last["step"] == 2 and last["stopped_early"]


def test_user_deepspeed_json_with_its_own_optimizer_bf16_zero2(tmp_path, tiny_model, race_dir):
    """A --deepspeed JSON: "auto" takes the option, its accumulation, optimizer, scheduler and ZeRO-2 are used."""
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-3}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
    }
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "out"
    events = run_train(
        tiny_model, race_dir, out, deepspeed=str(tmp_path / "ds.json"), dtype="bf16", max_steps=2, micro_batch_size=3,
        prompt_loss_weight="0", max_eval_rows=1,
    )
    train = [e for e in events if "train_loss" in e]
    assert [e["epoch"] for e in train] == [0.5, 1.0]  # 3 rows x 2 micro-steps per update, 12 rows
    assert all(np.isfinite(e["train_loss"]) for e in train)
    weights = saved_weights(out / "last")
    assert {str(t.dtype) for t in weights.values()} == {"torch.bfloat16"}
