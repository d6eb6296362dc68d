"""The DeepSpeed config the trainer runs with: built from TrainConfig, or a user JSON with "auto" filled.

Optimizer and LR schedule. The built config carries no ``optimizer``/``scheduler`` section: the
trainer passes ``torch.optim.AdamW`` (no JIT-compiled DeepSpeed op, identical on CPU and GPU) and a
``LambdaLR`` over :func:`lr_multiplier` to ``deepspeed.initialize``. DeepSpeed's own Warmup*LR
schedulers give the first update a learning rate of 0 (they start at iteration -1); this one gives
update k the multiplier of k exactly, which also makes resumption trivially exact. A user JSON that
has an ``optimizer`` or ``scheduler`` section keeps it, and DeepSpeed builds that part instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import TrainConfig

_HUGE = 1 << 30


def build_ds_config(cfg: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for ``cfg`` on ``world_size`` ranks (pure)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16", "auto_cast": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _HUGE,
        "wall_clock_breakdown": False,
    }


def load_ds_config(path: str | Path, cfg: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """A user's DeepSpeed JSON; ``"auto"`` values (the transformers convention) take the built values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed {p}: file not found")
    try:
        user = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {p}: not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed {p}: expected a JSON object")
    built = build_ds_config(cfg, world_size=world_size)
    resolved = _fill_auto(user, built)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        resolved.setdefault(key, built[key])
    micro, accum = resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"]
    resolved["train_batch_size"] = micro * accum * world_size
    return resolved


def _fill_auto(user: Any, built: Any) -> Any:
    if isinstance(user, dict):
        return {k: _fill_auto(v, built.get(k) if isinstance(built, dict) else None) for k, v in user.items()}
    if user == "auto":
        if built is None:
            raise ConfigError("--deepspeed: an \"auto\" value has no built counterpart; give it explicitly")
        return built
    return user


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """LR factor of update ``step`` (0-based): linear warmup to 1, then cosine/linear decay or constant.

    Warmup gives update k the factor (k+1)/(warmup+1), so no update is wasted at LR 0; decay runs
    from 1 at the first update after warmup towards ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape
