"""How every command gets its flags: generated from the config dataclasses, and one error handler.

A config field ``max_length: int = option(2048, "Tokens per row.")`` becomes ``--max-length`` with
that help and ``[default: 2048]``; a bool becomes ``--x/--no-x``; a list a repeatable option. Every
generated flag defaults to None, meaning "not given", so a recipe's value, then the field's
default, applies: that is how one config object serves both flags and recipe YAML.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from plw_data.errors import PLWError

F = TypeVar("F", bound=Callable[..., Any])

Recipe = Annotated[Optional[Path], typer.Option("--recipe", help="YAML recipe: any option as a key; flags override it.")]


def _flag_type(tp: Any) -> Any:
    """The CLI type of a config field type: Literal -> str, X | None -> X, list[X] -> list[X]."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(inner)
    return tp


def _default_text(default: Any, tp: Any) -> str:
    if tp is bool and default is not None:  # None: decided at run time (e.g. --chat-template)
        return f"  \\[default: {'on' if default else 'off'}]"
    if default in (None, [], ""):
        return ""
    return f"  \\[default: {default}]"


def config_parameters(cls: type, *, skip: Iterable[str] = (), groups: Iterable[str | None] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter (a typer option) per field of ``cls``, help and default written once.

    ``groups``: keep only fields whose ``group`` metadata is one of these (None: no group)."""
    hints = typing.get_type_hints(cls)
    keep = None if groups is None else set(groups)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (keep is not None and f.metadata.get("group") not in keep):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[f.name])
        decls = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag]
        decls += list(f.metadata.get("flags", ()))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        option = typer.Option(*decls, help=f.metadata.get("help", "") + _default_text(default, tp), show_default=False)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[tp], option])
        )
    return params


def given(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """The flags of ``cls`` that the user gave (None and an empty repeatable mean 'not given')."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and v not in (None, [])}


def command(fn: Callable[..., Any], params: list[inspect.Parameter], doc: str) -> Callable[..., Any]:
    """``fn(**values)`` with a generated signature typer reads as the command's arguments and flags."""
    fn.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    fn.__doc__ = doc
    return fn


def param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """A hand-written parameter (a positional argument or a command-only flag)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if default is inspect.Parameter.empty else inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


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
