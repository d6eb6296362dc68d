"""`plw-data`: prepare, inspect, verify and measure instruction-tuning data."""

from __future__ import annotations

from inspect import Parameter
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from plw_data.config import DataConfig

from . import options as o
from .rg_stats import rg_stats

app = typer.Typer(
    name="plw-data",
    help="Instruction-tuning data with a prompt-loss-weight: exact masks, global packing, statistics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from plw_data import __version__

        typer.echo(f"plw-data {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    """Instruction-tuning data with a prompt-loss-weight: exact masks, global packing, statistics."""


def _prepare(output: Path, inputs: Optional[list[str]] = None, recipe: Optional[Path] = None, overwrite: bool = False,
             quiet: bool = False, no_progress: bool = False, **flags: Any) -> None:
    from plw_data.config import build_config, load_recipe
    from plw_data.prepare.mixture import mixture_recipe
    from plw_data.prepare.pipeline import prepare as run
    from plw_data.prepare.report import summary_table

    given = o.given(flags, DataConfig)
    base = mixture_recipe(given["mix"], recipe) if given.get("mix") else load_recipe(recipe)
    cfg = build_config(DataConfig, base, given, source=str(given.get("mix") or recipe))
    console = o.console(stderr=True, quiet=quiet)
    manifest = run(inputs or [], cfg, output, overwrite=overwrite, progress=not quiet, log=console.print,
                   live=not no_progress)
    console.print(summary_table(manifest, output))


app.command("prepare")(o.command(o.handle_errors(_prepare), [
    o.param("output", Annotated[Path, typer.Option("--output", "-o", help="Output directory.", show_default=False)]),
    Parameter("inputs", Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        Optional[list[str]], typer.Argument(
            metavar="INPUTS", show_default=False,
            help="Input files (.json .jsonl .jsonl.gz .parquet .csv .arrow) or a hub dataset (none with --mix).")]),
    o.param("recipe", o.Recipe, None),
    o.param("overwrite", Annotated[bool, typer.Option("--overwrite", help="Replace a DIR prepared with another config.")], False),
    o.param("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")], False),
    o.param("no_progress", Annotated[bool, typer.Option(
        "--no-progress", help="Plain log lines instead of a live progress line (also when not on a terminal).")], False),
    *o.config_parameters(DataConfig),
], "Tokenize INPUTS into Arrow shards with prompt/completion/template masks, packed, with a manifest."))


@app.command()
@o.handle_errors
def inspect(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A prepared directory.")],
    split: Annotated[str, typer.Option("--split")] = "train",
    index: Annotated[int, typer.Option("--index", "-i", help="Row number within the split.")] = 0,
    ids: Annotated[bool, typer.Option("--ids", help="Also list every token with its id and category.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="Tokenizer (default: the manifest's).")] = None,
) -> None:
    """Show one row's tokens coloured by category: what will be trained, and where packed examples begin."""
    from plw_data.prepare.inspect import render_row

    o.console().print(render_row(directory, split, index, show_ids=ids, tokenizer=tokenizer))


@app.command()
@o.handle_errors
def verify(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A prepared directory.")],
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="Check against this tokenizer.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Allow the tokenizer's own code (never taken from the manifest).")] = False,
) -> None:
    """Check a prepared directory: manifest, checksums, schema, masks, totals, row coverage, tokenizer."""
    from plw_data.prepare.verify import verify as run

    for line in run(directory, tokenizer=tokenizer, trust_remote_code=trust_remote_code):
        typer.echo(f"  {line}")
    typer.echo(f"OK: {directory}")


@app.command()
@o.handle_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(metavar="PARTS", help="The K outputs of prepare --num-shards K --shard-index 0..K-1.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Merged directory.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUTPUT.")] = False,
    per_slice_eval: Annotated[bool, typer.Option(
        "--per-slice-eval", help="Accept slices prepared with --eval-fraction (each drew its own eval split).")] = False,
) -> None:
    """Combine the slice outputs of a multi-machine prepare into one directory with one manifest."""
    from plw_data.prepare.merge import merge as run

    m = run(parts, output, overwrite=overwrite, per_slice_eval=per_slice_eval)
    extra = ", ".join(f"{n} {r:+d} rows" for n, r in m["merge"]["extra_rows"].items())
    typer.echo(f"merged {len(parts)} slices into {output}: {m['counts']['kept']:,} examples; "
               f"per-slice packing vs the global bound: {extra}")


@app.command("convert-gguf")
@o.handle_errors
def convert_gguf(
    model: Annotated[Path, typer.Argument(help="A .gguf model file.")],
    output: Annotated[Path, typer.Argument(help="Folder to write (weights, config.json, tokenizer).")],
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16.")] = "fp32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUTPUT.")] = False,
) -> None:
    """Dequantise a .gguf model into a plain Hugging Face folder that Trainer, peft and plw-train load."""
    from plw_data.export import convert_gguf as run

    run(model, output, dtype=dtype, overwrite=overwrite)
    typer.echo(f"wrote {output}")


app.command("rg-stats")(rg_stats)


def optional_values(argv: list[str]) -> list[str]:
    """The two flags that take an optional value, as docs/prepare.md spells them, in the forms typer
    parses: ``--chat-template FILE|DIR`` (a .jinja file or a tokenizer folder; a bare
    ``--chat-template`` stays the on switch) becomes ``--chat-template-file FILE|DIR``, and a bare
    ``--ray`` becomes ``--ray local``."""
    out: list[str] = []
    for k, arg in enumerate(argv):
        nxt = argv[k + 1] if k + 1 < len(argv) else None
        if arg == "--chat-template" and nxt is not None and (nxt.endswith((".jinja", ".j2")) or Path(nxt).is_dir()):
            out.append("--chat-template-file")
        elif arg == "--ray" and (nxt is None or nxt.startswith("-")):
            out += ["--ray", "local"]
        else:
            out.append(arg)
    return out


def main() -> None:
    """The `plw-data` console script."""
    app(args=optional_values(sys.argv[1:]), prog_name="plw-data")


if __name__ == "__main__":
    main()
