"""`plw-data`: prepare, inspect, verify and measure instruction-tuning data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from .rg_stats import rg_stats

app = typer.Typer(
    name="plw-data",
    help="Instruction-tuning data with a prompt-loss-weight: exact masks, global packing, statistics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@o.handle_errors
def prepare(
    inputs: Annotated[list[str], typer.Argument(help="Input files (.json .jsonl .jsonl.gz .parquet .csv .arrow) or a hub dataset.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory.")],
    tokenizer: o.Tokenizer = None,
    recipe: o.Recipe = None,
    format: o.Format = None,
    prompt_template: o.PromptTemplate = None,
    completion_template: o.CompletionTemplate = None,
    system_prompt: o.SystemPrompt = None,
    chat_template: o.ChatTemplate = None,
    train_on: o.TrainOn = None,
    end_of_turn: o.EndOfTurn = None,
    max_length: o.MaxLength = None,
    truncation: o.Truncation = None,
    pack: Annotated[Optional[bool], typer.Option("--pack/--no-pack", help="Global sample packing  \\[default: pack]")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option("--eval-fraction", help="Seeded eval split  \\[default: 0]")] = None,
    eval_input: Annotated[Optional[list[str]], typer.Option("--eval-input", help="Eval split from these files.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    num_proc: Annotated[Optional[int], typer.Option("--num-proc", help="Encoding processes  \\[default: 1]")] = None,
    on_error: Annotated[Optional[str], typer.Option("--on-error", help="Bad rows: skip (recorded) | fail  \\[default: skip]")] = None,
    num_shards: Annotated[Optional[int], typer.Option("--num-shards", help="Split the job over K machines...")] = None,
    shard_index: Annotated[Optional[int], typer.Option("--shard-index", help="...this one prepares slice i.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split of a hub dataset  \\[default: train]")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Rows per tokenizer call  \\[default: 1000]")] = None,
    shard_tokens: Annotated[Optional[int], typer.Option("--shard-tokens", help="Tokens per Arrow shard  \\[default: 50M]")] = None,
    options_labels: Annotated[Optional[str], typer.Option("--options-labels", help="Letters for list fields  \\[default: A-Z]")] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code", help="Allow a tokenizer's own code (off by default).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a DIR prepared with another config.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Tokenize INPUTS into Arrow shards with prompt/completion/template masks, packed, with a manifest."""
    given = {k: v for k, v in locals().items() if k not in ("inputs", "output", "recipe", "overwrite", "quiet")}
    from rich.console import Console

    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare import prepare as run
    from plw_data.report import summary_table

    cfg = build_config(DataConfig, load_recipe(recipe), given, source=str(recipe))
    console = Console(stderr=True, quiet=quiet)
    manifest = run(inputs, cfg, output, overwrite=overwrite, progress=not quiet, log=console.print)
    console.print(summary_table(manifest, output))


@app.command()
@o.handle_errors
def inspect(
    directory: Annotated[Path, typer.Argument(help="A prepared directory.")],
    split: Annotated[str, typer.Option("--split")] = "train",
    index: Annotated[int, typer.Option("--index", "-i", help="Row number within the split.")] = 0,
    ids: Annotated[bool, typer.Option("--ids", help="Also list every token with its id and category.")] = False,
    tokenizer: o.Tokenizer = None,
) -> None:
    """Show one row's tokens coloured by category: what will be trained, and where packed examples begin."""
    from rich.console import Console

    from plw_data.inspect import render_row

    Console().print(render_row(directory, split, index, show_ids=ids, tokenizer=tokenizer))


@app.command()
@o.handle_errors
def verify(
    directory: Annotated[Path, typer.Argument(help="A prepared directory.")],
    tokenizer: o.Tokenizer = None,
) -> None:
    """Check a prepared directory: manifest, checksums, schema, masks, totals, row coverage, tokenizer."""
    from plw_data.verify import verify as run

    for line in run(directory, tokenizer=tokenizer):
        typer.echo(f"  {line}")
    typer.echo(f"OK: {directory}")


@app.command()
@o.handle_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(help="The K outputs of prepare --num-shards K --shard-index 0..K-1.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Merged directory.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUTPUT.")] = False,
) -> None:
    """Combine the slice outputs of a multi-machine prepare into one directory with one manifest."""
    from plw_data.merge import merge as run

    m = run(parts, output, overwrite=overwrite)
    extra = ", ".join(f"{n} {r:+d} rows" for n, r in m["merge"]["extra_rows"].items())
    typer.echo(f"merged {len(parts)} slices into {output}: {m['counts']['kept']:,} examples; "
               f"per-slice packing vs the global bound: {extra}")


app.command("rg-stats")(rg_stats)


if __name__ == "__main__":
    app()
