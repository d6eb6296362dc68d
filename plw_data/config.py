"""One config object per command, shared by CLI flags and recipe YAML.

A recipe is a YAML mapping whose keys are the config's field names (dashes or underscores);
CLI flags that the user actually gave override it. Unknown keys are an error, so a typo in a
recipe never silently falls back to a default. Each field's ``help`` metadata (see :func:`option`)
is its flag's help text: the CLI (``cli/options.py``) generates every flag from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import types
import typing
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
ReasoningTurns = Literal["per-turn", "last"]


@dataclass
class DataConfig:
    """Everything that decides how raw rows become tokens and masks (prepare, rg-stats)."""

    # Field order is the manifest's config order: append new fields at the end.
    tokenizer: str | None = option(None, "Tokenizer folder, hub name, or .gguf file.", flags=("-t",))
    format: Format = option("prompt-completion", "Input format: prompt-completion | alpaca | messages | sharegpt.")
    prompt_template: str | None = option(None, 'str.format template over row fields, e.g. "{question}".')
    completion_template: str | None = option(None, 'str.format template of the completion, e.g. "{answer}".')
    system_prompt: str | None = option(None, "System message added to every example.")
    # A recipe may also give a FILE|DIR here: validate() moves it to chat_template_file.
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
    max_field_chars: int = option(
        0, "Drop a row with a field (or message) over this many characters as row_too_large, before "
        "tokenization; 0: 64 x --max-length.")
    mix: str | None = option(None, "Mixture YAML: several sources, each with its inputs, recipe and share "
                             "(docs/mixtures.md); replaces INPUT...", group="prepare")
    chat_template_file: str | None = option(
        None, "Chat template to use instead of the tokenizer's: a .jinja file, or a tokenizer folder (docs/chat.md)."
    )
    date: str = option("2026-01-01", "The date a chat template sees (strftime_now), fixed per run: YYYY-MM-DD.")
    reasoning_turns: ReasoningTurns = option(
        "per-turn", "Templates that drop earlier turns' reasoning: one example per trained turn (per-turn) | last."
    )
    tools: str | None = option(None, "JSON file with one tool list (JSON schemas) for every row without its own.")
    ray: str | None = option(None, "Run the --num-shards K slices as Ray tasks, then merge: local (a Ray instance on "
                             "this machine), local:N (N CPUs) or a cluster ADDRESS (docs/ray.md).", group="prepare")
    check_render: bool = option(
        False, "Render every row with the chat template too and compare it with the fast rendering "
        "(docs/performance.md); a mismatch uses the template's text, counted in run.json.", group="prepare")

    def field_chars_limit(self) -> int:
        """The row-size bound: memory stays bounded by the batch, not by the largest row."""
        return self.max_field_chars or 64 * self.max_length

    def validate(self) -> None:
        _check_literal(self, "format", Format)
        _check_literal(self, "train_on", TrainOn)
        _check_literal(self, "end_of_turn", EndOfTurn)
        _check_literal(self, "truncation", Truncation)
        _check_literal(self, "on_error", OnError)
        _check_literal(self, "reasoning_turns", ReasoningTurns)
        if isinstance(self.chat_template, str):  # recipe `chat_template: FILE|DIR`
            if self.chat_template_file not in (None, self.chat_template):
                raise ConfigError("give the chat template file once (chat_template or chat_template_file)")
            self.chat_template, self.chat_template_file = True, self.chat_template
        if self.chat_template_file is not None and self.chat_template is False:
            raise ConfigError("--chat-template-file and --no-chat-template contradict each other")
        try:
            datetime.date.fromisoformat(self.date)
        except (TypeError, ValueError):
            raise ConfigError(f"--date must be YYYY-MM-DD, got {self.date!r}") from None
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_input:
            raise ConfigError("give --eval-fraction or --eval-input, not both")
        if self.num_proc < 1 or self.batch_size < 1:
            raise ConfigError("--num-proc and --batch-size must be >= 1")
        if self.max_field_chars < 0:
            raise ConfigError(f"--max-field-chars must be >= 0, got {self.max_field_chars}")
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
        for volatile in ("num_proc", "batch_size", "on_error", "ray", "check_render"):
            d.pop(volatile)
        return d


def _check_literal(cfg: object, name: str, lit: Any) -> None:
    allowed = lit.__args__
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")


#: A recipe is a handful of options: anything larger, or using YAML anchors/aliases (which can expand
#: exponentially: the "billion laughs"), is refused before it is parsed.
RECIPE_MAX_BYTES = 1 << 20
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """Read a recipe YAML: a mapping of option: value (see :func:`read_yaml`)."""
    if path is None:
        return {}
    data = read_yaml(path, "recipe")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_yaml(path: str | Path, what: str) -> Any:
    """A recipe or mixture file: safe loader only (no object construction from YAML tags), bounded
    size, no anchors or aliases (no alias bombs)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} file not found")
    if p.stat().st_size > RECIPE_MAX_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size:,} bytes; a {what} may hold at most {RECIPE_MAX_BYTES:,}")
    try:
        text = p.read_text(encoding="utf-8")
        if any(isinstance(t, (yaml.AnchorToken, yaml.AliasToken)) for t in yaml.scan(text)):
            raise ConfigError(f"{p}: YAML anchors and aliases (&name, *name) are not accepted in a {what}")
        return yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as the field type ``tp`` (from the dataclass annotation), or a ConfigError naming
    ``where``. One rule for flags and recipe values: bools also from the strings true/false/yes/no/
    on/off/1/0 (YAML's spellings), ints from integral numbers or integer text (300.7 is refused),
    floats from numbers or number text (finite), text from text or numbers, a list from a list or
    one item, a Literal from its values."""
    origin = typing.get_origin(tp)

    def bad() -> ConfigError:
        got = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        hint = ""
        if origin is Literal and isinstance(value, str):
            close = difflib.get_close_matches(value, [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{where}: expected {_type_name(tp)}, got {got}{hint}")

    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise bad()
    if origin is list:
        items = value if isinstance(value, list) else [value]
        (item_tp,) = typing.get_args(tp)
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) <= 100:
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise bad() from None
        if not math.isfinite(number):
            raise bad()
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    return value


def build_config(cls: type[C], recipe: dict[str, Any], overrides: dict[str, Any], *, source: str = "recipe") -> C:
    """Recipe values, then CLI overrides (None means 'flag not given'), each checked against its
    field's type (:func:`coerce`); unknown keys are an error with the closest option named."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in recipe:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown option {key!r}{hint}")
    hints = typing.get_type_hints(cls)
    values = {k: coerce(v, hints[k], f"{source}: {k}") for k, v in recipe.items()}
    values.update({k: coerce(v, hints[k], "--" + k.replace("_", "-"))
                   for k, v in overrides.items() if v is not None and k in names})
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg
