"""The `plw-data rg-stats` run: measure each dataset, print the table, write JSON/CSV/markdown/plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig, option
from ..errors import ConfigError
from . import stats
from .measure import DEFAULT_PLWS, UNITS, expected_rows, measure, parse_dataset, parse_plws


@dataclass
class RgOptions:
    """What rg-stats measures and writes (the rendering options are DataConfig's)."""

    unit: str = option("tokens", "tokens | chars | words (chars/words need no tokenizer).")
    plw: str = option(DEFAULT_PLWS, "Comma-separated PLW values for the prompt's share of the loss weight.")
    trim: float = option(0.1, "Fraction cut from each end for the trimmed mean.")
    split: str = option("train", "Split of a prepared directory to read.")
    limit: int | None = option(None, "Only the first N rows (examples) of each dataset.")
    json: Path | None = option(None, "Write the statistics as JSON (docs/rg-stats.md).")
    csv: Path | None = option(None, "Write the statistics as CSV.")
    markdown: Path | None = option(None, "Write a markdown table.")
    plot: Path | None = option(None, "Write histograms (linear and log x) to this PNG.")


def run(inputs: list[str], cfg: DataConfig, opts: RgOptions, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Measure ``inputs`` (raw files or prepared DIRs, NAME=PATH allowed); returns the statistics."""
    unit, split, limit, plot, trim = opts.unit, opts.split, opts.limit, opts.plot, opts.trim
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if unit not in UNITS:
        raise ConfigError(f"--unit must be one of {', '.join(UNITS)}; got {unit!r}")
    if not 0.0 <= trim < 0.5:
        raise ConfigError(f"--trim must be in [0, 0.5), got {trim}")
    plws = parse_plws(opts.plw)
    specs = [parse_dataset(s) for s in inputs]
    for spec in specs:
        if not Path(spec.path).exists():
            raise ConfigError(f"{spec.path}: input not found")
    tok = None
    if unit == "tokens" and any(not s.prepared for s in specs):
        if not cfg.tokenizer:
            raise ConfigError("--tokenizer is required to count tokens of raw inputs (or use --unit chars|words)")
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)

    results, values = [], []
    with _progress(quiet) as progress:
        for spec in specs:
            task = progress.add_task(spec.name, total=expected_rows(spec, split, limit))
            m = measure(spec, cfg, tok, unit=unit, split=split, limit=limit, on_rows=lambda n, t=task: progress.advance(t, n))
            progress.remove_task(task)
            results.append(m.acc.result(name=spec.name, unit=unit, plws=plws, trim=trim))
            if plot:
                values.append((spec.name, m.acc.values()))
            if not quiet:
                progress.console.print(f"{spec.name}: {m.rows:,} rows in {m.seconds:.1f} s ({m.rows_per_second:,.0f} rows/s)")

    if not quiet:
        from rich.console import Console

        console = Console()
        console.print(stats.rich_table(results, width=console.width))
    if opts.json:
        _write(opts.json, json.dumps(stats.to_json(results), indent=2, allow_nan=False) + "\n")
    if opts.csv:
        _write(opts.csv, stats.to_csv(results))
    if opts.markdown:
        _write(opts.markdown, stats.to_markdown(results))
    if plot:
        from .plot import plot_rg

        plot_rg(values, plot, unit=unit)
    return results


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):  # noqa: ANN001 - rich's Task
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} rows/s", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} rows"),
        RateColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=quiet,
    )


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror}") from None
