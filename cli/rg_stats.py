"""`plw-data rg-stats`: the generation ratio Rg of datasets, raw or prepared (docs/rg-stats.md).

Flags come from DataConfig (how raw rows are rendered, as `prepare` renders them) and RgOptions
(what is measured and written); the engine is :mod:`plw_data.rg`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from plw_data.config import DataConfig
from plw_data.rg.report import RgOptions

from . import options as o


def _rg_stats(inputs: list[str], recipe: Optional[Path] = None, quiet: bool = False, **flags: Any) -> None:
    from plw_data.config import build_config, load_recipe
    from plw_data.rg.report import run

    cfg = build_config(DataConfig, load_recipe(recipe), o.given(flags, DataConfig), source=str(recipe) if recipe else "options")
    run(inputs, cfg, RgOptions(**o.given(flags, RgOptions)), quiet=quiet)


rg_stats = o.command(o.handle_errors(_rg_stats), [
    o.param("inputs", Annotated[list[str], typer.Argument(
        metavar="INPUT_OR_DIR", show_default=False,
        help="Raw input files or prepared directories; NAME=PATH names a dataset (default: the file stem).")]),
    o.param("recipe", o.Recipe, None),
    o.param("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no table.")], False),
    *o.config_parameters(DataConfig, groups=[None], skip=("split",)),
    *o.config_parameters(RgOptions),
], "Generation ratio Rg = completion / (prompt + template) per example: means, median, quantiles.")
