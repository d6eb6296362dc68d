"""The `plw-data rg-stats` run: measure each dataset, print the table, write JSON/CSV/markdown/plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig, option
from ..errors import ConfigError
from . import stats
from ..prepare.mixture import rg
from .measure import DEFAULT_PLWS, UNITS, expected_rows, measure, measure_sources, parse_dataset, parse_plws
from .policy import loss_shares, parse_plw_map, prompt_share_plw
from .policy import per_source as per_source_values


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
    prompt_share: float | None = option(
        None, "On a mixture DIR: the PLW per source under which prompt + template carry this share of its loss weight."
    )


def run(inputs: list[str], cfg: DataConfig, opts: RgOptions, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Measure ``inputs`` (raw files or prepared DIRs, NAME=PATH allowed); returns the statistics."""
    unit, split, limit, plot, trim = opts.unit, opts.split, opts.limit, opts.plot, opts.trim
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if unit not in UNITS:
        raise ConfigError(f"--unit must be one of {', '.join(UNITS)}; got {unit!r}")
    if not 0.0 <= trim < 0.5:
        raise ConfigError(f"--trim must be in [0, 0.5), got {trim}")
    plw_map = parse_plw_map(opts.plw, flag="--plw")
    plws = parse_plws(opts.plw) if plw_map is None else []
    if opts.prompt_share is not None and plw_map is not None:
        raise ConfigError("give --prompt-share or a --plw per source, not both")
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

    results, values, shares = [], [], []
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
            per_source = measure_sources(spec, split, limit) if spec.prepared else None
            if per_source is None:
                if plw_map is not None or opts.prompt_share is not None:
                    raise ConfigError(f"{spec.path}: a PLW per source or --prompt-share needs a mixture DIR (prepare --mix)")
                continue
            parts = [acc.result(name=f"{spec.name}/{name}", unit=unit, plws=plws, trim=trim) for name, acc in per_source]
            results.extend(parts)
            weights = _source_plws(per_source, plw_map, opts.prompt_share)
            if weights is not None:
                shares.append(loss_share_table(spec.name, per_source, weights))

    if not quiet:
        from rich.console import Console

        console = Console()
        console.print(stats.rich_table(results, width=console.width))
        for table in shares:
            console.print(_share_table(table))
    if opts.json:
        doc = {**stats.to_json(results), **({"loss_shares": shares} if shares else {})}
        _write(opts.json, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    if opts.csv:
        _write(opts.csv, stats.to_csv(results))
    if opts.markdown:
        _write(opts.markdown, stats.to_markdown(results))
    if plot:
        from .plot import plot_rg

        plot_rg(values, plot, unit=unit)
    return results


def _tokens(acc: Any) -> dict[str, int]:
    """An accumulator's totals as prompt / completion / template tokens (its prompt sum holds the template)."""
    template = int(acc.template_sum or 0)
    return {"prompt": int(acc.prompt_sum) - template, "completion": int(acc.completion_sum), "template": template}


def _source_plws(per_source: list[tuple[str, Any]], plw_map: dict[str, str] | None,
                 prompt_share: float | None) -> dict[str, float] | None:
    """The PLW of each source: from --plw race=..,alpaca=.. or chosen by --prompt-share; None: neither."""
    names = [name for name, _ in per_source]
    if prompt_share is not None:
        out = {}
        for name, acc in per_source:
            plw = prompt_share_plw(_tokens(acc), prompt_share)
            if plw is None:
                raise ConfigError(f"--prompt-share: source {name!r} has no prompt or template tokens to weigh")
            out[name] = plw
        return out
    if plw_map is None:
        return None
    values = per_source_values(plw_map, names, flag="--plw")
    try:
        return {name: float(v) for name, v in values.items()}
    except ValueError:
        raise ConfigError("--plw per source takes numbers (schedules are for plw-train)") from None


def loss_share_table(dataset: str, per_source: list[tuple[str, Any]], plws: dict[str, float]) -> dict[str, Any]:
    """Under a PLW per source: each source's Rg, PLW, the share of its own loss weight on its prompt,
    completion and template tokens, and its share of the whole mixture's loss weight."""
    tokens = {name: _tokens(acc) for name, acc in per_source}
    weight = {name: plws[name] * (t["prompt"] + t["template"]) + t["completion"] for name, t in tokens.items()}
    total = sum(weight.values())
    rows = {
        name: {"plw": plws[name], "rg": rg(t), "tokens": t, "loss_share": loss_shares(t, plws[name]),
               "of_mixture": weight[name] / total if total else None}
        for name, t in tokens.items()
    }
    whole = {c: sum(t[c] for t in tokens.values()) for c in ("prompt", "completion", "template")}
    parts = {c: sum(plws[n] * tokens[n][c] if c != "completion" else tokens[n][c] for n in tokens) for c in whole}
    mixture = {c: (v / total if total else None) for c, v in parts.items()}
    return {"dataset": dataset, "sources": rows, "mixture": {"rg": rg(whole), "tokens": whole, "loss_share": mixture}}


def _share_table(share: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{share['dataset']}: loss weight per source", header_style="bold")
    for col in ("source", "Rg", "PLW", "prompt", "completion", "template", "of mixture"):
        table.add_column(col, justify="left" if col == "source" else "right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    num = lambda x: "-" if x is None else f"{x:.4g}"
    for name, r in share["sources"].items():
        s = r["loss_share"]
        table.add_row(name, num(r["rg"]), num(r["plw"]), pct(s["prompt"]), pct(s["completion"]), pct(s["template"]),
                      pct(r["of_mixture"]))
    m = share["mixture"]
    table.add_row("(all)", num(m["rg"]), "", pct(m["loss_share"]["prompt"]), pct(m["loss_share"]["completion"]),
                  pct(m["loss_share"]["template"]), "100.0%", style="bold")
    return table


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
