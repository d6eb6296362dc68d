"""Options shared by every command that reads raw rows (prepare, rg-stats), and error handling.

Each option defaults to None, meaning "not given": the recipe's value, then DataConfig's default,
applies. That is how one config object serves both flags and recipe YAML.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from plw_data.errors import PLWError

F = TypeVar("F", bound=Callable[..., Any])

Recipe = Annotated[Optional[Path], typer.Option("--recipe", help="YAML recipe: any option as a key; flags override it.")]
Tokenizer = Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="Tokenizer folder, hub name, or .gguf file.")]
Format = Annotated[
    Optional[str], typer.Option("--format", help="prompt-completion | alpaca | messages | sharegpt  \\[default: prompt-completion]")
]
PromptTemplate = Annotated[Optional[str], typer.Option("--prompt-template", help='str.format template over row fields, e.g. "{question}".')]
CompletionTemplate = Annotated[Optional[str], typer.Option("--completion-template", help='e.g. "{answer}".')]
SystemPrompt = Annotated[Optional[str], typer.Option("--system-prompt", help="System message added to every example.")]
ChatTemplate = Annotated[
    Optional[bool],
    typer.Option("--chat-template/--no-chat-template", help="Render with the tokenizer's chat template  \\[default: when it has one]"),
]
TrainOn = Annotated[Optional[str], typer.Option("--train-on", help="Assistant turns that are completion: all | last  \\[default: all]")]
EndOfTurn = Annotated[
    Optional[str],
    typer.Option("--end-of-turn", help="What closes a trained turn: eot | eot+separator | none  \\[default: eot]"),
]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="Tokens per row  \\[default: 2048]")]
Truncation = Annotated[
    Optional[str], typer.Option("--truncation", help="Over-long examples: left | right (cut prompt tokens) | drop  \\[default: left]")
]


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def handle_errors(fn: F) -> F:
    """Turn a PLWError (bad option, missing file, bad row with --on-error fail) into one stderr line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PLWError as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
