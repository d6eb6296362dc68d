"""The trainer's options: one dataclass behind `plw-train` flags and `--recipe FILE.yaml` keys.

Every field is a CLI flag (``--field-name``) and a recipe key (``field_name`` or ``field-name``);
its ``help`` metadata is the flag's help text (:func:`plw_data.config.option`); ``cli/options.py``
builds the command from this list, as it does for `plw-data prepare` from ``DataConfig``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

from ..config import option as _opt
from ..errors import ConfigError
from ..rg.policy import parse_plw_map, per_source, plw_from_share
from .schedule import Schedule, parse_schedule

Dtype = Literal["auto", "bf16", "fp32", "fp16"]
LRScheduler = Literal["cosine", "linear", "constant"]
EVAL_METRICS = (
    "eval_prompt_loss",
    "eval_completion_loss",
    "eval_template_loss",
    "eval_full_loss",
    "eval_token_accuracy",
    "eval_answer_accuracy",
)

_POSITIVE = ("lora_r", "micro_batch_size", "gradient_accumulation_steps", "num_epochs")
_POSITIVE_IF_GIVEN = ("eval_steps", "save_steps", "eval_batch_size", "max_eval_rows", "pad_to_multiple_of", "loss_chunk_size")


@dataclass
class TrainConfig:
    # --- where things are
    model: str | None = _opt(None, "Local Hugging Face model folder, or a .gguf file (dequantised to float).")
    data: str | None = _opt(None, "Prepared directory (plw-data prepare); trains on DIR/train.")
    output: str | None = _opt(None, "Output directory: metrics.jsonl, metrics.png, best/, last/.")
    eval_data: str | None = _opt(None, "Eval split folder (default: DATA/eval when present).")
    tokenizer: str | None = _opt(
        None, "Tokenizer for special-token ids (answer accuracy) and saving; default: the data's, else the model's."
    )
    overwrite: bool = _opt(False, "Start over even if OUTPUT already holds a run.")
    resume: bool = _opt(False, "Continue the run in OUTPUT from OUTPUT/last exactly.")
    # --- model
    dtype: Dtype = _opt(
        "auto", "Precision: auto (bf16 where the GPU/CPU computes it natively, else fp32), bf16, fp32, fp16 (GPU only)."
    )
    lora: bool = _opt(True, "LoRA adapters (peft); --no-lora: full fine-tuning.")
    lora_r: int = _opt(16, "LoRA rank.")
    lora_alpha: float = _opt(32.0, "LoRA alpha.")
    lora_dropout: float = _opt(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = _opt([], "LoRA target modules (repeatable); default: all linear but lm_head.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    attn_implementation: str | None = _opt(None, "Attention: sdpa, eager, flash_attention_2...; default: transformers'.")
    # --- loss
    prompt_loss_weight: str = _opt(
        "0.1", "PLW or a PLW schedule: 0.1, linear:1.0:0.0, step:1.0:0.1@epoch=1 (grammar: docs/training.md); "
        "per source of a mixture: race=0.01,alpaca=linear:1:0.1,*=0.1 (docs/mixtures.md)."
    )
    template_weight: str | None = _opt(None, "Template-token weight or schedule; default: the same as the PLW.")
    completion_weight: float = _opt(1.0, "Completion-token weight.")
    reasoning_weight: float = _opt(1.0, "Reasoning tokens weigh completion weight x this (0: train on the answer only).")
    loss_chunk_size: int | None = _opt(None, "Target tokens per chunk of the fused loss (default: 128 MiB of fp32 logits).")
    # --- optimisation
    learning_rate: float = _opt(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_eps: float = _opt(1e-8, "AdamW epsilon.")
    lr_scheduler: LRScheduler = _opt("cosine", "LR decay after warmup: cosine, linear or constant.")
    warmup_steps: int | None = _opt(None, "Warmup updates (overrides --warmup-ratio).")
    warmup_ratio: float = _opt(0.03, "Warmup as a fraction of all updates.")
    min_lr_ratio: float = _opt(0.0, "Final LR as a fraction of the peak (cosine, linear).")
    micro_batch_size: int = _opt(1, "Rows per forward pass per rank.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per update per rank.")
    gradient_clipping: float = _opt(1.0, "Clip the global gradient norm to this (0: off).")
    zero_stage: int = _opt(0, "DeepSpeed ZeRO stage 0-3.")
    deepspeed: str | None = _opt(None, "A DeepSpeed JSON config to use instead of the built one.")
    num_epochs: int = _opt(1, "Epochs over DATA/train (ignored when --max-steps is given).")
    max_steps: int | None = _opt(None, "Stop after this many updates; 0: only evaluate the model as given.")
    seed: int = _opt(0, "Seed for data order, LoRA init and dropout.")
    pad_to_multiple_of: int | None = _opt(None, "Pad batch length to a multiple of this.")
    # --- eval and checkpoints
    eval_steps: int | None = _opt(None, "Evaluate every N updates (always at the end).")
    eval_batch_size: int | None = _opt(None, "Eval rows per forward pass (default: --micro-batch-size).")
    max_eval_rows: int | None = _opt(None, "Evaluate on the first N eval rows only.")
    save_steps: int | None = _opt(None, "Save OUTPUT/last every N updates (default: --eval-steps; always at the end).")
    best_metric: str = _opt("eval_completion_loss", "Eval metric that picks OUTPUT/best (losses: lower is better).")
    early_stopping_patience: int | None = _opt(None, "Stop after N evals without improvement of --best-metric.")
    progress: bool = _opt(True, "Live metrics table in the terminal.")
    verify_data: bool = _opt(
        True, "Check the prepared DIR first: manifest, schema, shard sizes and sha256 (--no-verify-data: sizes only)."
    )
    prompt_share: float | None = _opt(
        None, "Choose each source's PLW so its prompt + template tokens carry this share of its loss weight "
        "(docs/mixtures.md); replaces --prompt-loss-weight."
    )
    # --- export
    merge_adapter: bool = _opt(
        False, "At the end, also write OUTPUT/merged: the LoRA adapter of OUTPUT/best merged into its base (full model)."
    )

    def validate(self) -> None:
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        choices = {"dtype": Dtype, "lr_scheduler": LRScheduler}
        for name, lit in choices.items():
            if getattr(self, name) not in lit.__args__:
                allowed = ", ".join(lit.__args__)
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {allowed}; got {getattr(self, name)!r}")
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in _POSITIVE_IF_GIVEN:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("--warmup-ratio must be in [0, 1) and --min-lr-ratio in [0, 1]")
        if self.best_metric not in EVAL_METRICS:
            raise ConfigError(f"--best-metric must be one of {', '.join(EVAL_METRICS)}; got {self.best_metric!r}")
        if self.merge_adapter and not self.lora:
            raise ConfigError("--merge-adapter merges a LoRA adapter; with --no-lora OUTPUT/best is the full model already")
        if self.resume and self.overwrite:
            raise ConfigError("give --resume or --overwrite, not both")
        for name in ("completion_weight", "reasoning_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        self.prompt_loss_weight = str(self.prompt_loss_weight)
        if self.template_weight is not None:
            self.template_weight = str(self.template_weight)
        if self.prompt_share is not None and not 0 <= self.prompt_share < 1:
            raise ConfigError(f"--prompt-share must be in [0, 1), got {self.prompt_share}")
        self.plw_schedule, self.template_schedule  # parsed here, once: a bad spec fails before any work

    @functools.cached_property
    def plw_schedule(self) -> Schedule | dict[str, Schedule]:
        """One schedule, or one per source name (``*``: every source not named) for a mixture."""
        per_source = parse_plw_map(self.prompt_loss_weight)
        if per_source is None:
            return parse_schedule(self.prompt_loss_weight)
        return {name: parse_schedule(spec, name=f"prompt_loss_weight {name}") for name, spec in per_source.items()}

    def plw_for(self, manifest: dict[str, Any]) -> tuple[list[str], Schedule | dict[str, Schedule]]:
        """The PLW for a prepared DIR: its source names ([] when it is not a mixture) and one
        schedule, or one per source in the DIR's order (``--prompt-share``: constants chosen from
        each source's token totals)."""
        names = list(manifest.get("sources") or {})
        if self.prompt_share is not None:
            if "splits" not in manifest and "sources" not in manifest:
                raise ConfigError(f"--prompt-share needs the token totals of {self.data}/manifest.json (plw-data prepare)")
            chosen = plw_from_share(manifest, self.prompt_share)
            if not names:
                return [], Schedule("constant", (next(iter(chosen.values())),))
            return names, {n: Schedule("constant", (chosen[n],)) for n in names}
        schedule = self.plw_schedule
        if isinstance(schedule, Schedule):
            return names, schedule
        return names, per_source(schedule, names)

    @functools.cached_property
    def template_schedule(self) -> Schedule | None:
        """None: template tokens take the PLW."""
        if self.template_weight is None:
            return None
        return parse_schedule(self.template_weight, name="template_weight")

    @property
    def higher_is_better(self) -> bool:
        return self.best_metric.endswith("accuracy")

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total_steps)
