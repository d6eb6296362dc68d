"""One config object per command, shared by CLI flags and recipe YAML.

A recipe is a YAML mapping whose keys are the config's field names (dashes or underscores);
CLI flags that the user actually gave override it. Unknown keys are an error, so a typo in a
recipe never silently falls back to a default. Each field's ``help`` metadata (see :func:`option`)
is its flag's help text: the CLI (``cli/options.py``) generates every flag from these dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import ConfigError

C = TypeVar("C")


def option(default: Any, help: str, **meta: Any) -> Any:
    """A config field with its flag's help text; ``meta`` may hold ``flags`` (extra spellings such as
    ``-t``) and ``group`` (which commands show it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


Format = Literal["prompt-completion", "alpaca", "messages", "sharegpt"]
TrainOn = Literal["all", "last"]
EndOfTurn = Literal["eot", "eot+separator", "none"]
Truncation = Literal["left", "right", "drop"]
OnError = Literal["skip", "fail"]


@dataclass
class DataConfig:
    """Everything that decides how raw rows become tokens and masks (prepare, rg-stats)."""

    # Field order is the manifest's config order: append new fields at the end.
    tokenizer: str | None = option(None, "Tokenizer folder, hub name, or .gguf file.", flags=("-t",))
    format: Format = option("prompt-completion", "Input format: prompt-completion | alpaca | messages | sharegpt.")
    prompt_template: str | None = option(None, 'str.format template over row fields, e.g. "{question}".')
    completion_template: str | None = option(None, 'str.format template of the completion, e.g. "{answer}".')
    system_prompt: str | None = option(None, "System message added to every example.")
    chat_template: bool | None = option(None, "Render with the tokenizer's chat template (default: when it has one).")
    train_on: TrainOn = option("all", "Assistant turns that are completion: all | last.")
    end_of_turn: EndOfTurn = option("eot", "What closes a trained turn: eot | eot+separator | none.")
    max_length: int = option(2048, "Tokens per row.")
    truncation: Truncation = option("left", "Over-long examples: left | right (cut prompt tokens) | drop.")
    pack: bool = option(True, "Global sample packing.", group="prepare")
    eval_fraction: float = option(0.0, "Seeded eval split: this fraction of the kept examples.", group="prepare")
    eval_input: list[str] = option([], "Eval split from these files (repeatable).", group="prepare")
    seed: int = option(0, "Seed of the eval split and the row order.", group="prepare")
    num_proc: int = option(1, "Encoding processes.")
    on_error: OnError = option("skip", "Bad rows: skip (recorded in dropped.jsonl) | fail.")
    options_labels: str = option("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "Letters for list fields (e.g. RACE options).")
    split: str = option("train", "Split of a hub dataset.")
    batch_size: int = option(1000, "Rows per tokenizer call.")
    shard_tokens: int = option(50_000_000, "Tokens per Arrow shard.", group="prepare")
    num_shards: int = option(1, "Split the job over K machines (see plw-data merge)...", group="prepare")
    shard_index: int = option(0, "...this one prepares slice i of K.", group="prepare")
    trust_remote_code: bool = option(False, "Allow a tokenizer's own code (off by default).")
    ray: str | None = option(None, "Run the --num-shards K slices as Ray tasks, then merge: local (a Ray instance on "
                             "this machine), local:N (N CPUs) or a cluster ADDRESS (docs/ray.md).", group="prepare")

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
        if self.ray is not None and (not self.ray or self.ray.startswith("-")):
            raise ConfigError(f"--ray needs a value: local, local:N or a Ray cluster address; got {self.ray!r}")
        cpus = self.ray[len("local:"):] if self.ray is not None and self.ray.startswith("local:") else "1"
        if not (cpus.isdigit() and int(cpus) > 0):
            raise ConfigError(f"--ray local:N needs a positive number of CPUs, got {self.ray!r}")
        if self.ray is not None and (self.num_shards < 2 or self.shard_index):
            raise ConfigError("--ray runs all the slices: give --num-shards K (K >= 2) and no --shard-index")

    def fingerprint_dict(self) -> dict[str, Any]:
        """The options that change the prepared bytes: all but how the work is run (processes, batch
        size, Ray) and what happens to a bad row (a run either records it as dropped or stops)."""
        d = dataclasses.asdict(self)
        for volatile in ("num_proc", "batch_size", "on_error", "ray"):
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
