"""plw_data.hf: PLWTrainer and PLWSFTTrainer against plw-train (same data, seed, PLW); naive setups refused.

Tiny random Llama on CPU, real RACE rows prepared with SmolLM2's chat template (tests/conftest.py fixtures).
Run as a script (``torchrun --nproc-per-node 2 tests/test_hf.py ...``) it trains with PLWTrainer and
writes the losses and weights, for the two-rank test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import SMOL  # noqa: E402
from test_train import make_config, run_train, saved_weights, train_losses  # noqa: E402

from plw_data.train.config import EVAL_METRICS  # noqa: E402

PLW = "0.3"
LR = 1e-3
EVAL_KEYS = EVAL_METRICS  # plw-train's eval metric keys


def training_args(out: Path, *, micro: int, accum: int, max_steps: int = 2, sft: bool = False, **extra):
    """Arguments equal to plw-train's run: AdamW, cosine without warmup, clip 1.0, seed 0, fp32."""
    if sft:
        from trl import SFTConfig as Args
    else:
        from transformers import TrainingArguments as Args
    base = dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, learning_rate=LR, warmup_steps=0, lr_scheduler_type="cosine",
        optim="adamw_torch", logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
        bf16=False, activation_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    return Args(**{**base, **extra})


def build_trainer(model_dir: Path, data: Path, out: Path, *, lora: bool, micro: int, accum: int, sft: bool = False,
                  eval_split: bool = False, **extra):
    """A PLWTrainer / PLWSFTTrainer on the model plw-train would build (same seed, same LoRA init)."""
    import torch
    from datasets import load_from_disk

    from conftest import load_tokenizer
    from plw_data import PLWCollator
    from plw_data.train.model import load_model

    import plw_data.hf as hf

    cfg = make_config(model_dir, data, out / "unused", lora=lora, lora_dropout=0.0, prompt_loss_weight=PLW)
    torch.manual_seed(cfg.seed)  # as plw-train does before load_model (LoRA init)
    model = load_model(cfg)
    cls = hf.PLWSFTTrainer if sft else hf.PLWTrainer
    return cls(
        model=model,
        args=training_args(out, micro=micro, accum=accum, sft=sft, **extra),
        train_dataset=load_from_disk(str(data / "train")),
        eval_dataset=load_from_disk(str(data / "eval")) if eval_split else None,
        data_collator=PLWCollator(prompt_loss_weight=float(PLW)),
        processing_class=load_tokenizer(SMOL),
    )


def hf_losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def trained_weights(model, lora: bool) -> dict:
    if lora:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(ref: dict, mine: dict, atol: float = 1e-5) -> None:
    import torch

    assert ref, "no reference weights"
    for name, value in ref.items():
        torch.testing.assert_close(mine[name], value, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, race_dir):
    """plw-train runs by (lora, micro, accum): (losses, saved weights, events)."""
    cache: dict = {}

    def get(lora: bool, micro: int, accum: int):
        key = (lora, micro, accum)
        if key not in cache:
            out = tmp_path_factory.mktemp("ref") / "out"
            events = run_train(
                tiny_model, race_dir, out, max_steps=2, micro_batch_size=micro, gradient_accumulation_steps=accum,
                lora=lora, lora_dropout=0.0, prompt_loss_weight=PLW, learning_rate=LR,
            )
            cache[key] = (train_losses(events), saved_weights(out / "last"), events)
        return cache[key]

    return get


# --------------------------------------------------------------------------- exactness against plw-train


@pytest.mark.parametrize("sft", [False, True], ids=["Trainer", "SFTTrainer"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("micro,accum", [(1, 4), (4, 1)], ids=["1x4", "4x1"])
def test_same_losses_and_weights_as_plw_train(tmp_path, tiny_model, race_dir, reference, sft, lora, micro, accum):
    if sft:
        pytest.importorskip("trl")
    ref_losses, ref_weights, _ = reference(lora, micro, accum)
    trainer = build_trainer(tiny_model, race_dir, tmp_path, lora=lora, micro=micro, accum=accum, sft=sft)
    initial = trained_weights(trainer.model, lora)
    trainer.train()
    assert hf_losses(trainer) == pytest.approx(ref_losses, rel=1e-5)
    mine = trained_weights(trainer.model, lora)
    moved = max(float((mine[k] - initial[k]).abs().max()) for k in ref_weights)
    assert moved > 1e-4  # real updates: equal weights mean equal updates
    assert_same(ref_weights, mine)


def test_eval_metrics_equal_plw_train_max_steps_0(tmp_path, tiny_model, race_dir):
    events = run_train(tiny_model, race_dir, tmp_path / "ref", max_steps=0, eval_batch_size=2, lora=False)
    trainer = build_trainer(
        tiny_model, race_dir, tmp_path / "hf", lora=False, micro=1, accum=1, eval_split=True, per_device_eval_batch_size=3
    )
    metrics = trainer.evaluate()
    for key in EVAL_KEYS:
        assert metrics[key] == pytest.approx(events[0][key], rel=1e-5, abs=1e-7), key
    assert metrics["eval_tokens"] == events[0]["eval_tokens"]


def test_best_model_and_early_stopping_use_the_plw_metrics(tmp_path, tiny_model, race_dir):
    from transformers import EarlyStoppingCallback

    trainer = build_trainer(
        tiny_model, race_dir, tmp_path, lora=True, micro=2, accum=1, eval_split=True, max_steps=6,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="eval_answer_accuracy",
    )  # fmt: skip
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=2))
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_completion_loss" in e]
    # A random model's answer accuracy stays 0: the first eval stays best and patience runs out after 2 more.
    assert [e["step"] for e in evals] == [1, 2, 3]
    assert trainer.state.best_metric == evals[0]["eval_answer_accuracy"]
    assert trainer.state.best_global_step == 1


# --------------------------------------------------------------------------- naive setups: exact or refused


def test_plain_trainer_with_plw_collator_is_refused_naming_the_fix(tmp_path, tiny_model, race_dir):
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, Trainer

    from plw_data import PLWCollator

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    train = load_from_disk(str(race_dir / "train"))
    for remove in (True, False):  # default: columns stripped; False: the batch reaches compute_loss
        args = training_args(tmp_path, micro=2, accum=1, remove_unused_columns=remove)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=PLWCollator(prompt_loss_weight=0.1))
        with pytest.raises((KeyError, TypeError), match=r"plw_data\.hf\.PLWTrainer") as err:
            trainer.train()
        assert "\n" not in str(err.value)


def test_plain_sft_trainer_with_plw_collator_is_refused(tmp_path, tiny_model, race_dir):
    pytest.importorskip("trl")
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from conftest import load_tokenizer
    from plw_data import PLWCollator

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    for remove in (True, False):
        trainer = SFTTrainer(
            model=model, args=training_args(tmp_path, micro=2, accum=1, sft=True, remove_unused_columns=remove),
            train_dataset=load_from_disk(str(race_dir / "train")), processing_class=load_tokenizer(SMOL),
            data_collator=PLWCollator(prompt_loss_weight=0.1),
        )  # fmt: skip
        with pytest.raises((KeyError, TypeError), match=r"plw_data\.hf\.PLWTrainer"):
            trainer.train()


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"packing": True}, r"packing=True.*set packing=False"),
        ({"max_length": 64}, r"max_length=64\) is below the longest prepared row .*set max_length=None"),
    ],
    ids=["packing", "max_length"],
)
def test_sft_settings_that_would_change_the_rows_are_refused(tmp_path, tiny_model, race_dir, extra, match):
    pytest.importorskip("trl")
    from plw_data.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        build_trainer(tiny_model, race_dir, tmp_path, lora=True, micro=1, accum=1, sft=True, **extra)


def test_plw_trainer_without_plw_collator_is_refused(tmp_path, tiny_model, race_dir):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, DataCollatorWithPadding

    from conftest import load_tokenizer
    from plw_data.errors import ConfigError
    from plw_data.hf import PLWTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    train = load_from_disk(str(race_dir / "train"))
    for collator in (None, DataCollatorWithPadding(load_tokenizer(SMOL))):
        with pytest.raises(ConfigError, match=r"needs data_collator=PLWCollator\(prompt_loss_weight=\.\.\.\)"):
            PLWTrainer(model=model, args=training_args(tmp_path, micro=1, accum=1), train_dataset=train,
                       data_collator=collator)  # fmt: skip


def test_compute_metrics_is_refused_not_ignored(tmp_path, tiny_model, race_dir):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from plw_data import PLWCollator
    from plw_data.errors import ConfigError
    from plw_data.hf import PLWTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    train = load_from_disk(str(race_dir / "train"))
    for name in ("compute_metrics", "preprocess_logits_for_metrics"):
        with pytest.raises(ConfigError, match=rf"does not call {name}: remove it, or override evaluate\(\)"):
            PLWTrainer(model=model, args=training_args(tmp_path, micro=1, accum=1), train_dataset=train,
                       data_collator=PLWCollator(prompt_loss_weight=0.1), **{name: lambda *a: {}})  # fmt: skip


def test_trainer_sets_what_it_needs_without_touching_the_callers_args(tmp_path, tiny_model, race_dir):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from plw_data import PLWCollator
    from plw_data.hf import PLWTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    train = load_from_disk(str(race_dir / "train"))
    args = training_args(tmp_path, micro=1, accum=1)
    collator = PLWCollator(prompt_loss_weight=0.25)
    trainer = PLWTrainer(model, args, collator, train)  # positional, as Trainer takes them
    assert trainer.data_collator is collator and trainer.train_dataset is train
    assert trainer.args.remove_unused_columns is False and args.remove_unused_columns is True
    assert PLWTrainer(model=model, data_collator={"prompt_loss_weight": 0.25}, train_dataset=train).args.remove_unused_columns is False
    pytest.importorskip("trl")
    from conftest import load_tokenizer
    from plw_data.hf import PLWSFTTrainer

    sft_args = training_args(tmp_path, micro=1, accum=1, sft=True)
    sft = PLWSFTTrainer(model=model, args=sft_args, train_dataset=train, data_collator=collator,
                        processing_class=load_tokenizer(SMOL))  # fmt: skip
    assert sft.args.dataset_kwargs["skip_prepare_dataset"] is True and sft.train_dataset is train
    assert sft_args.dataset_kwargs is None  # the caller's config is left as it was


def test_private_hooks_are_pinned_to_the_tested_versions():
    """PLWTrainer overrides transformers' private ``_get_train_sampler``: re-test before moving the pin."""
    import inspect

    import transformers

    from plw_data.hf import TESTED_VERSIONS

    assert transformers.__version__ == TESTED_VERSIONS["transformers"], "re-run tests/test_hf.py, then move the pin"
    params = list(inspect.signature(transformers.Trainer._get_train_sampler).parameters)
    assert params == ["self", "train_dataset"]
    assert list(inspect.signature(transformers.Trainer.get_batch_samples).parameters) == [
        "self", "epoch_iterator", "num_batches", "device",
    ]  # fmt: skip
    try:
        import trl
    except ImportError:
        return
    assert trl.__version__ == TESTED_VERSIONS["trl"], "re-run tests/test_hf.py, then move the pin"


# --------------------------------------------------------------------------- load_from_disk(DIR)


def test_load_from_disk_dir_is_a_datasetdict_after_prepare_and_merge(tmp_path):
    """prepare and merge write DIR/dataset_dict.json; the shards are untouched (verify passes)."""
    import gzip

    import datasets

    from conftest import REPO, require_shared, tokenizer_dir
    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare.merge import merge
    from plw_data.prepare.pipeline import prepare
    from plw_data.prepare.verify import verify

    with gzip.open(require_shared("race/dev.jsonl.gz"), "rt") as f:
        src = tmp_path / "race.jsonl"
        src.write_text("".join(next(f) for _ in range(30)))
    over = {"tokenizer": str(tokenizer_dir(SMOL)), "eval_fraction": 0.2, "max_length": 1024}
    parts = []
    for i in range(2):
        cfg = build_config(DataConfig, load_recipe(REPO / "recipes" / "race.yaml"), {**over, "num_shards": 2, "shard_index": i})
        parts.append(tmp_path / f"part{i}")
        prepare([str(src)], cfg, parts[-1], progress=False)
    merge(parts, tmp_path / "merged", per_slice_eval=True)  # the slices drew their own eval splits
    for d in (*parts, tmp_path / "merged"):
        verify(d)
        dd = datasets.load_from_disk(str(d))
        assert isinstance(dd, datasets.DatasetDict) and list(dd) == ["train", "eval"]
        for split in dd:
            assert dd[split].data.table.equals(datasets.load_from_disk(str(d / split)).data.table)
        assert json.loads((d / "dataset_dict.json").read_text()) == {"splits": ["train", "eval"]}


# --------------------------------------------------------------------------- export


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_merge_adapter_writes_a_full_model_equal_to_base_plus_adapter(tmp_path, tiny_model, race_dir):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    run_train(tiny_model, race_dir, out, max_steps=2, micro_batch_size=2, learning_rate=1e-2, merge_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out / "best"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    ids = tok("Question: which letter?", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter, ids), atol=1e-5, rtol=0)
    assert float((_logits(merged, ids) - _logits(base, ids)).abs().max()) > 1e-4  # the adapter did something
    gen = merged.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, len(ids) + 4)


def test_merge_adapter_needs_lora(tmp_path, tiny_model, race_dir):
    from plw_data.errors import ConfigError

    with pytest.raises(ConfigError, match="--merge-adapter merges a LoRA adapter"):
        make_config(tiny_model, race_dir, tmp_path / "out", lora=False, merge_adapter=True)


def smollm2_gguf() -> Path:
    from conftest import REPO

    found = sorted((REPO / ".cache" / "smollm2").glob("*.gguf"))
    if not found:
        pytest.skip(f"SmolLM2 GGUF absent under {REPO / '.cache' / 'smollm2'} (scripts/setup.sh puts it there)")
    return found[0]


@pytest.mark.slow
def test_gguf_adapter_loads_with_auto_peft_and_convert_gguf_gives_the_same_base(tmp_path, race_dir):
    """plw-train on the .gguf: OUT/best loads with AutoPeftModelForCausalLM (base: OUT/base), merged generates;
    `plw-data convert-gguf` writes the same base as a plain folder."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from plw_data.cli.main import app

    gguf = smollm2_gguf()
    out = tmp_path / "out"
    run_train(gguf, race_dir, out, max_steps=1, micro_batch_size=1, max_eval_rows=1, merge_adapter=True)
    config = json.loads((out / "best" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out / "best"), dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    ids = [1, 9690, 198, 2683, 314]
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter, ids), atol=1e-4, rtol=0)
    assert merged.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False).shape == (1, len(ids) + 3)

    result = CliRunner().invoke(app, ["convert-gguf", str(gguf), str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(plain, ids), _logits(base, ids), atol=0, rtol=0)
    assert (tmp_path / "plain" / "tokenizer.json").is_file()
    again = CliRunner().invoke(app, ["convert-gguf", str(gguf), str(tmp_path / "plain")])
    assert again.exit_code == 2 and "use --overwrite" in again.output


# --------------------------------------------------------------------------- two ranks


def run_torchrun(out: Path, model: Path, data: Path, *args: str, nproc: int = 2) -> dict:
    """This file's _main under ``torchrun --nproc-per-node NPROC`` (gloo, CPU): its losses.json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),  # a free port chosen by torchrun itself
        __file__, "--model", str(model), "--data", str(data), "--out", str(out), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


def assert_same_run(result: dict, out: Path, ref) -> None:
    """Losses, weights and the eval metrics after training equal plw-train's run ``ref``."""
    ref_losses, ref_weights, ref_events = ref
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert_same(ref_weights, saved_weights(out / "weights"))
    (final_eval,) = [e for e in ref_events if "eval_completion_loss" in e]
    for key in EVAL_KEYS:
        assert result["eval"][key] == pytest.approx(final_eval[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_rank(tmp_path, tiny_model, race_dir, reference):
    """PLWTrainer, 2 ranks x micro-batch 1 x accumulation 2 (gloo, CPU) = plw-train 1 rank x 1 x 4: losses,
    weights, and the eval metrics after training (eval rows split over the ranks, sums all-reduced)."""
    out = tmp_path / "out"
    result = run_torchrun(out, tiny_model, race_dir, "--micro", "1", "--accum", "2")
    assert_same_run(result, out, reference(False, 1, 4))


@pytest.mark.slow
def test_deepspeed_zero3_under_torchrun_equals_plw_train(tmp_path, tiny_model, race_dir, reference):
    """PLWTrainer with ``TrainingArguments(deepspeed=ZeRO-3)``, full fine-tuning: the lm_head (tied to the
    embeddings) is partitioned outside its own forward, and the loss gathers it. One process: on a
    machine without GPUs, accelerate runs each DeepSpeed process as a world of one."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    result = run_torchrun(out, tiny_model, race_dir, "--micro", "1", "--accum", "4", "--zero-stage", "3", nproc=1)
    assert_same_run(result, out, reference(False, 1, 4))


def zero_config(stage: int) -> dict:
    """A DeepSpeed config for ``TrainingArguments(deepspeed=...)``: ZeRO ``stage``, the Trainer's own AdamW."""
    return {
        # save_model gathers the partitioned weights into one state dict (else: a DeepSpeed checkpoint)
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def _main() -> None:
    """Entry point for torchrun: train with PLWTrainer, write losses.json and weights/ (rank 0)."""
    parser = argparse.ArgumentParser()
    for name in ("--model", "--data", "--out"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=None, help="train under DeepSpeed ZeRO (accelerate's integration)")
    a = parser.parse_args()
    extra = {}
    if a.zero_stage is not None:
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # CPU: gloo, no JIT-compiled comm op
        extra = dict(use_cpu=False, deepspeed=zero_config(a.zero_stage))
    trainer = build_trainer(
        a.model, a.data, a.out, lora=False, micro=a.micro, accum=a.accum, eval_split=True, **extra
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(a.out / "weights"))  # every rank: under ZeRO-3 the weights are gathered first
    if trainer.is_world_process_zero():
        (a.out / "losses.json").write_text(json.dumps({"losses": hf_losses(trainer), "eval": metrics}))
    # As docs/hf.md says: no rank tears its process group down while another still writes (a rank
    # exiting first with gloo's threads alive can abort: "terminate called without an active exception").
    import torch.distributed as dist

    trainer.accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    _main()
