"""`plw-train`: fine-tune a causal LM on a prepared directory with a prompt-loss-weight (docs/training.md).

The flags are generated from :class:`plw_data.train.config.TrainConfig`, so every field is both a
flag (``--lora-r``) and a recipe key (``lora_r``); a flag that is given overrides the recipe.

Runs as a plain process (a world of one), or under a launcher::

    plw-train --model M --data D --output O
    deepspeed --num_gpus 8 $(which plw-train) --model M --data D --output O --zero-stage 3
    torchrun --nproc-per-node 8 -m plw_data.cli.train --model M --data D --output O
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Optional

import typer

from plw_data.train.config import TrainConfig

from . import options as o

app = typer.Typer(
    name="plw-train",
    help="Fine-tune a causal LM (LoRA or full) with a prompt-loss-weighted loss, on DeepSpeed (CPU or GPU).",
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _parameters() -> list[inspect.Parameter]:
    local_rank = Annotated[Optional[int], typer.Option("--local_rank", "--local-rank", hidden=True)]
    return [o.param("recipe", o.Recipe, None), o.param("local_rank", local_rank, None), *o.config_parameters(TrainConfig)]


@o.handle_errors
def _command(**given: Any) -> None:
    from plw_data.train.model import allocator_env

    allocator_env()  # before anything imports torch
    from plw_data.config import build_config, load_recipe

    recipe = given.pop("recipe")
    given.pop("local_rank")  # the deepspeed launcher passes it; LOCAL_RANK in the environment is what counts
    cfg = build_config(TrainConfig, load_recipe(recipe), o.given(given, TrainConfig), source=str(recipe))
    from plw_data.train import train

    train(cfg)


o.command(_command, _parameters(), """Train MODEL on DATA/train with the loss Σ w·CE / Σ w (completion 1, prompt PLW, template).

Writes OUTPUT/metrics.jsonl, OUTPUT/metrics.png, OUTPUT/best/ and OUTPUT/last/. --max-steps 0 only
evaluates the model as given. Options may also come from --recipe FILE.yaml (keys = option names).""")
app.command(name="plw-train")(_command)


if __name__ == "__main__":
    app()
