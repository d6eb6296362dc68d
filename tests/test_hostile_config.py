"""Hostile recipes and flags: every value checked against its field's type by one rule, typos get a
"did you mean", YAML bombs and huge recipes are refused before parsing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hostile_helpers import QA, cli, one_line_error, qa_rows, tok, write_jsonl

from plw_data.config import DataConfig, build_config, load_recipe
from plw_data.errors import ConfigError
from plw_data.train.config import TrainConfig


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        ('max_length: "abc"', "max_length: expected an integer, got 'abc'"),
        ("max_length: 300.7", "max_length: expected an integer, got 300.7"),
        ("max_length: true", "max_length: expected an integer, got True"),
        ('pack: "maybe"', "pack: expected true or false"),
        ("eval_fraction: .nan", "eval_fraction: expected a number"),
        ("format: alpacca", "did you mean 'alpaca'"),
        ("prompt_template: [1, 2]", "prompt_template: expected text or null"),
        ("max_lenght: 512", "unknown option 'max_lenght'; did you mean 'max_length'?"),
        ("- a\n- b", "a recipe must be a mapping"),
        ("a: [", "not valid YAML"),
    ],
)
def test_bad_recipe_values_are_one_line(tmp_path: Path, recipe: str, needle: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe + "\n")
    with pytest.raises(ConfigError, match=None) as e:
        build_config(DataConfig, load_recipe(path), {}, source=str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_values_are_parsed_one_way_for_recipes_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text('pack: "false"\nmax_length: "512"\nseed: 3.0\neval_input: one.jsonl\n')
    cfg = build_config(DataConfig, load_recipe(path), {})
    assert (cfg.pack, cfg.max_length, cfg.seed, cfg.eval_input) == (False, 512, 3, ["one.jsonl"])
    assert build_config(DataConfig, {"pack": "no"}, {"pack": "yes"}).pack is True
    t = build_config(TrainConfig, {"learning_rate": "1e-4", "prompt_loss_weight": 0.1}, {"model": "m", "data": "d", "output": "o"})
    assert (t.learning_rate, t.prompt_loss_weight) == (1e-4, "0.1")
    with pytest.raises(ConfigError, match="--max-length: expected an integer"):
        build_config(DataConfig, {}, {"max_length": 300.7})


def test_yaml_bombs_and_huge_recipes_are_refused_fast(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 12)]
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_recipe(bomb)
    assert time.perf_counter() - t0 < 5
    huge = tmp_path / "huge.yaml"
    huge.write_text("system_prompt: " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="a recipe may hold at most"):
        load_recipe(huge)
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError):
        load_recipe(deep)


def test_cli_bad_recipe_value_exits_2_with_one_line(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    recipe = tmp_path / "r.yaml"
    recipe.write_text('max_length: "abc"\n')
    r = cli("prepare", src, "--tokenizer", tok(), *QA[:4], "--recipe", recipe, "--output", tmp_path / "out")
    one_line_error(r, "max_length: expected an integer, got 'abc'")
    assert not (tmp_path / "out").exists()
    r = cli("prepare", src, "--tokenizer", tok(), *QA, "--format", "alpacca", "--output", tmp_path / "out")
    one_line_error(r, "--format: expected one of", "did you mean 'alpaca'")
