"""Human-readable summaries of a manifest (the closing table of `prepare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def summary_table(manifest: dict[str, Any], output: Path) -> Any:
    """A rich renderable: rows kept and dropped by reason, tokens per category, shards per split."""
    from rich.console import Group
    from rich.table import Table

    counts = manifest["counts"]
    rows = Table(title=f"plw-data prepare -> {output}", show_header=True, header_style="bold")
    rows.add_column("rows")
    rows.add_column("count", justify="right")
    rows.add_row("input rows", f"{counts['input_rows']:,}")
    rows.add_row("kept", f"{counts['kept']:,}")
    rows.add_row("  of which truncated", f"{counts.get('truncated', 0):,}")
    for reason, n in counts["dropped"].items():
        rows.add_row(f"dropped: {reason}", f"{n:,}", style="yellow")
    splits = Table(show_header=True, header_style="bold")
    for col in ("split", "examples", "rows", "tokens", "prompt", "completion", "template", "fill", "rows/bound", "shards"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, s in manifest["splits"].items():
        bound = s["lower_bound_rows"]
        splits.add_row(
            name,
            f"{s['examples']:,}",
            f"{s['rows']:,}",
            f"{s['tokens']:,}",
            f"{s['prompt_tokens']:,}",
            f"{s['completion_tokens']:,}",
            f"{s['template_tokens']:,}",
            f"{s['fill']:.3f}",
            f"{s['rows'] / bound:.3f}" if bound else "-",
            str(len(s["shards"])),
        )
    if not manifest.get("sources"):
        return Group(rows, splits)
    return Group(rows, splits, source_table(manifest["sources"]))


def source_table(sources: dict[str, Any]) -> Any:
    """One line per source of a mixture: rows in and out, what its share took, its tokens and Rg."""
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for col in ("source", "input rows", "kept", "dropped", "taken", "copies", "sampled", "eval",
                "prompt", "completion", "template", "Rg"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, s in sources.items():
        t = s["tokens"]
        table.add_row(name, f"{s['input_rows']:,}", f"{s['kept']:,}", f"{sum(s['dropped'].values()):,}",
                      f"{s['taken']:,}", str(s["copies"]), f"{s['sampled']:,}", f"{s['eval']:,}",
                      f"{t['prompt']:,}", f"{t['completion']:,}", f"{t['template']:,}",
                      "-" if s["rg"] is None else f"{s['rg']:.4g}")
    return table
