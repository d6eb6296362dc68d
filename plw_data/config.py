"""One config object per command, shared by CLI flags and recipe YAML.

A recipe is a YAML mapping whose keys are the config's field names (dashes or underscores);
CLI flags that the user actually gave override it. Unknown keys are an error, so a typo in a
recipe never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import ConfigError

C = TypeVar("C")

Format = Literal["prompt-completion", "alpaca", "messages", "sharegpt"]
TrainOn = Literal["all", "last"]
EndOfTurn = Literal["eot", "eot+separator", "none"]
Truncation = Literal["left", "right", "drop"]
OnError = Literal["skip", "fail"]


@dataclass
class DataConfig:
    """Everything that decides how raw rows become tokens and masks (prepare, rg-stats)."""

    tokenizer: str | None = None
    format: Format = "prompt-completion"
    prompt_template: str | None = None
    completion_template: str | None = None
    system_prompt: str | None = None
    chat_template: bool | None = None  # None: use the tokenizer's when it has one
    train_on: TrainOn = "all"  # which assistant turns are completion: all, or only the last
    end_of_turn: EndOfTurn = "eot"  # what closes a trained turn: its end-of-turn token, + separator, or nothing
    max_length: int = 2048
    truncation: Truncation = "left"  # over-long: cut prompt tokens from the left/right, or drop the example
    pack: bool = True
    eval_fraction: float = 0.0
    eval_input: list[str] = field(default_factory=list)
    seed: int = 0
    num_proc: int = 1
    on_error: OnError = "skip"
    options_labels: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # how list fields (e.g. RACE options) are lettered
    split: str = "train"  # split of a hub dataset
    batch_size: int = 1000  # rows per tokenizer call
    shard_tokens: int = 50_000_000  # tokens per Arrow shard
    num_shards: int = 1  # multi-machine prepare: this job handles slice shard_index of num_shards
    shard_index: int = 0
    trust_remote_code: bool = False

    def validate(self) -> None:
        _check_literal(self, "format", Format)
        _check_literal(self, "train_on", TrainOn)
        _check_literal(self, "end_of_turn", EndOfTurn)
        _check_literal(self, "truncation", Truncation)
        _check_literal(self, "on_error", OnError)
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_input:
            raise ConfigError("give --eval-fraction or --eval-input, not both")
        if self.num_proc < 1 or self.batch_size < 1:
            raise ConfigError("--num-proc and --batch-size must be >= 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")

    def fingerprint_dict(self) -> dict[str, Any]:
        """The options that change the prepared bytes (num_proc and batching do not)."""
        d = dataclasses.asdict(self)
        for volatile in ("num_proc", "batch_size", "on_error"):
            d.pop(volatile)
        return d


def _check_literal(cfg: object, name: str, lit: Any) -> None:
    allowed = lit.__args__
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """Read a recipe YAML (safe loader only: no object construction from YAML tags)."""
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[C], recipe: dict[str, Any], overrides: dict[str, Any], *, source: str = "recipe") -> C:
    """Recipe values, then CLI overrides (None means 'flag not given'); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(recipe) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
    values = dict(recipe)
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def config_to_json(cfg: object) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)  # type: ignore[call-overload]
