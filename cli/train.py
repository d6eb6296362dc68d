"""`plw-train`: fine-tune a causal LM on a prepared directory with a prompt-loss-weight (CONTRACT §1, §5).

The flags are generated from :class:`plw_data.train_config.TrainConfig`, so every field is both a
flag (``--lora-r``) and a recipe key (``lora_r``); a flag that is given overrides the recipe.

Runs as a plain process (a world of one), or under a launcher::

    plw-train --model M --data D --output O
    deepspeed --num_gpus 8 $(which plw-train) --model M --data D --output O --zero-stage 3
    torchrun --nproc-per-node 8 -m plw_data.cli.train --model M --data D --output O
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Annotated, Any, Optional

import typer

from plw_data.train_config import TrainConfig

from . import options as o

app = typer.Typer(
    name="plw-train",
    help="Fine-tune a causal LM (LoRA or full) with a prompt-loss-weighted loss, on DeepSpeed (CPU or GPU).",
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _flag_type(tp: Any) -> Any:
    """The CLI type of a TrainConfig field type: Literal → str, X | None → X."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(inner)
    return tp


def _parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(TrainConfig)
    params = [
        inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=o.Recipe),
        inspect.Parameter(
            "local_rank",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Optional[int], typer.Option("--local_rank", "--local-rank", hidden=True)],
        ),
    ]
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[f.name])
        decls = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = f"  \\[default: {default}]" if default not in (None, []) and tp is not bool else ""
        if tp is bool:
            shown = f"  \\[default: {'on' if default else 'off'}]"
        option = typer.Option(*decls, help=f.metadata.get("help", "") + shown, show_default=False)
        annotation = Annotated[Optional[tp], option]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return params


@o.handle_errors
def _command(**given: Any) -> None:
    from plw_data.config import build_config, load_recipe

    recipe = given.pop("recipe")
    given.pop("local_rank")  # the deepspeed launcher passes it; LOCAL_RANK in the environment is what counts
    given = {k: v for k, v in given.items() if v not in (None, [])}
    cfg = build_config(TrainConfig, load_recipe(recipe), given, source=str(recipe))
    from plw_data.train import train

    train(cfg)


_PARAMETERS = _parameters()
_command.__signature__ = inspect.Signature(_PARAMETERS, return_annotation=None)  # type: ignore[attr-defined]
_command.__annotations__ = {p.name: p.annotation for p in _PARAMETERS}
_command.__doc__ = """Train MODEL on DATA/train with the loss Σ w·CE / Σ w (completion 1, prompt PLW, template).

Writes OUTPUT/metrics.jsonl, OUTPUT/metrics.png, OUTPUT/best/ and OUTPUT/last/. --max-steps 0 only
evaluates the model as given. Options may also come from --recipe FILE.yaml (keys = option names)."""
app.command(name="plw-train")(_command)


if __name__ == "__main__":
    app()
