"""plw-train building blocks that need no model: schedules, LR, DeepSpeed config, data order, checkpoints, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from plw_data.errors import ConfigError
from plw_data.train.schedule import parse_schedule
from plw_data.train.config import TrainConfig


# --------------------------------------------------------------------------- PLW schedules


@pytest.mark.parametrize(
    ("spec", "expected"),  # values at updates 0..9 of 10, 5 updates per epoch
    [
        ("0.1", [0.1] * 10),
        ("linear:1.0:0.0", [1 - k / 9 for k in range(10)]),
        ("linear:1:0.5@epoch=1", [1 - 0.1 * k for k in range(5)] + [0.5] * 5),
        ("step:1.0:0.1@epoch=1", [1.0] * 5 + [0.1] * 5),
        ("step:1:0.5@step=2:0.1@epoch=1", [1, 1, 0.5, 0.5, 0.5] + [0.1] * 5),
        ("step:0:1@progress=0.5", [0] * 5 + [1] * 5),
        ("cosine:1:0@step=4", [1, 0.8535533905932737, 0.5, 0.14644660940672627, 0, 0, 0, 0, 0, 0]),
    ],
)
def test_schedule_values(spec, expected):
    schedule = parse_schedule(spec)
    assert [schedule.value(k, 10, 5) for k in range(10)] == pytest.approx(expected)
    assert parse_schedule(str(schedule)) == schedule  # canonical spec round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fast", "expected a number"),
        ("linear:1", "needs two values"),
        ("step:1:0.1", "needs a position"),
        ("step:1:0.1@epoch=2:0.01@epoch=1", "must increase"),
        ("linear:1:0@week=2", "not a position"),
        ("-0.5", ">= 0"),
        ("step:1:0@progress=1.5", "out of range"),
    ],
)
def test_bad_schedule_is_a_clear_config_error(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_schedule(spec)
    assert "--prompt-loss-weight" in str(err.value)


# --------------------------------------------------------------------------- LR and DeepSpeed config


def test_lr_multiplier_warmup_then_decay():
    from plw_data.train.ds_config import lr_multiplier

    cos = [lr_multiplier(k, total_steps=10, warmup_steps=3, kind="cosine", min_ratio=0.1) for k in range(10)]
    assert cos[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # no update at LR 0
    assert all(a > b for a, b in zip(cos[3:], cos[4:])) and cos[-1] > 0.1
    lin = [lr_multiplier(k, total_steps=4, warmup_steps=0, kind="linear", min_ratio=0.0) for k in range(4)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_multiplier(7, total_steps=8, warmup_steps=2, kind="constant", min_ratio=0.0) == 1.0


def test_ds_config_is_built_from_the_options_and_user_json_fills_auto(tmp_path):
    from plw_data.train.ds_config import build_ds_config, load_ds_config

    cfg = TrainConfig(
        model="m", data="d", output="o", micro_batch_size=2, gradient_accumulation_steps=3, zero_stage=2, dtype="bf16"
    )
    built = build_ds_config(cfg, world_size=4)
    assert built["train_batch_size"] == 24 and built["zero_optimization"] == {"stage": 2}
    assert built["bf16"] == {"enabled": True} and not built["fp16"]["enabled"]
    assert "optimizer" not in built and "scheduler" not in built  # torch AdamW + LambdaLR come from the trainer
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5, "zero_optimization": {"stage": 3}}
    (tmp_path / "ds.json").write_text(json.dumps(user))
    loaded = load_ds_config(tmp_path / "ds.json", cfg, world_size=1)
    assert loaded["train_micro_batch_size_per_gpu"] == 2 and loaded["gradient_accumulation_steps"] == 3
    assert loaded["gradient_clipping"] == 0.5 and loaded["zero_optimization"] == {"stage": 3}
    assert loaded["train_batch_size"] == 6
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_ds_config(tmp_path / "bad.json", cfg, world_size=1)


# --------------------------------------------------------------------------- data order


@pytest.mark.parametrize(
    ("n_rows", "micro", "accum", "world"), [(12, 1, 4, 1), (12, 2, 1, 2), (13, 2, 2, 3), (5, 4, 2, 2)]
)
def test_every_row_is_used_once_per_epoch_whatever_the_layout(n_rows, micro, accum, world):
    from plw_data.train.order import epoch_permutation, rank_slots, steps_per_epoch

    g = micro * accum * world
    order = epoch_permutation(n_rows, seed=3, epoch=1)
    seen = []
    for step in range(steps_per_epoch(n_rows, g)):
        window = order[step * g : (step + 1) * g]
        for rank in range(world):
            slots = rank_slots(window, micro=micro, accum=accum, world=world, rank=rank)
            assert len(slots) == accum and all(len(s) <= micro for s in slots)
            seen += [int(i) for s in slots for i in s]
    assert sorted(seen) == list(range(n_rows))
    assert not np.array_equal(order, epoch_permutation(n_rows, seed=3, epoch=2))
    assert np.array_equal(order, epoch_permutation(n_rows, seed=3, epoch=1))


# --------------------------------------------------------------------------- checkpoint folders


def test_checkpoint_is_atomic_and_verified(tmp_path):
    from plw_data.train import checkpoint as ckpt

    final = tmp_path / "last"
    for step in (1, 2):
        tmp = ckpt.temp_dir(final)
        (tmp / "weights.bin").write_bytes(bytes([step]) * 100)
        ckpt.seal(tmp, {"step": step})
        ckpt.publish(tmp, final)
    assert ckpt.verify(final)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp or old folder left

    (final / "weights.bin").write_bytes(b"\x02" * 99)
    with pytest.raises(ckpt.CheckpointError, match="weights.bin has 99 bytes, expected 100"):
        ckpt.verify(final)
    half = ckpt.temp_dir(tmp_path / "best")
    (half / "weights.bin").write_bytes(b"x")
    half.rename(tmp_path / "best")
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.verify(tmp_path / "best")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint there"):
        ckpt.verify(tmp_path / "none")
    # A crash between publish's two renames leaves only .last.old: resolve() finds it.
    final.rename(tmp_path / ".last.old")
    (tmp_path / ".last.old" / "weights.bin").write_bytes(b"\x02" * 100)
    assert ckpt.resolve(final) == tmp_path / ".last.old"
    assert ckpt.verify(ckpt.resolve(final))["step"] == 2


# --------------------------------------------------------------------------- config and CLI


def test_recipe_values_with_cli_overrides(tmp_path):
    from plw_data.config import build_config, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora-r: 8\nprompt_loss_weight: 0.05\nlearning_rate: 1.0e-4\n")
    cfg = build_config(TrainConfig, load_recipe(recipe), {"model": "m", "data": "d", "output": "o", "lora_r": 4})
    assert (cfg.lora_r, cfg.prompt_loss_weight, cfg.learning_rate) == (4, "0.05", 1e-4)
    recipe.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match="unknown option.*lora_rank"):
        build_config(TrainConfig, load_recipe(recipe), {})


def test_shipped_recipes_are_valid():
    from plw_data.config import build_config, load_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("train-*.yaml"))
    assert recipes
    for path in recipes:
        build_config(TrainConfig, load_recipe(path), {"model": "m", "data": "d", "output": "o"}, source=str(path))


def test_cli_help_lists_every_option_and_bad_input_is_one_line():
    import dataclasses

    from plw_data.cli.train import app

    runner = CliRunner()
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in result.output
    result = runner.invoke(app, ["--model", "m", "--data", "d"])
    assert result.exit_code == 2 and "--output is required" in result.output
    result = runner.invoke(app, ["--model", "m", "--data", "d", "--output", "o", "--prompt-loss-weight", "linear:1"])
    assert result.exit_code == 2 and "needs two values" in result.output
    assert result.output.count("\n") == 1
