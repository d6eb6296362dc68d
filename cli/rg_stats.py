"""`plw-data rg-stats`: the generation ratio Rg of datasets, raw or prepared (CONTRACT §1, §4).

Raw inputs are rendered exactly as `prepare` renders them (same formats, templates, chat template,
truncation), so the counts are the prepared masks' counts; a prepared DIR is read from its masks.
Heavy imports live inside functions so `plw-data --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from plw_data.errors import ConfigError

from . import options as o

UNITS = ("tokens", "chars", "words")
DEFAULT_PLWS = "0,0.01,0.1,1"
_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv", ".arrow")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str

    @property
    def prepared(self) -> bool:
        return Path(self.path).is_dir()


@dataclass
class Measured:
    """One dataset's accumulated counts and how fast they were read."""

    spec: DatasetSpec
    acc: Any  # plw_data.stats.RgAccumulator
    rows: int  # input rows (raw) or examples (prepared) read
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def parse_dataset(spec: str) -> DatasetSpec:
    """`name=path`, or a path named after its file stem (`race/dev.jsonl.gz` -> `dev`)."""
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
        if not name or not path:
            raise ConfigError(f"{spec}: expected NAME=PATH")
        return DatasetSpec(name, path)
    p = Path(spec)
    name = p.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return DatasetSpec(name or spec, spec)


def parse_plws(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--plw must be comma-separated numbers, got {text!r}") from None
    if any(v < 0 or v != v for v in values):
        raise ConfigError(f"--plw values must be >= 0, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------
# Counting: each source yields (rows read, prompt + template, completion, template | None, dropped)

Counts = tuple[int, Any, Any, Any, dict[str, int]]


def _counts(b: Any, keep: Any = slice(None), dropped: dict[str, int] | None = None) -> Counts:
    """One CountsBatch (rows `keep`) as (rows read, prompt + template, completion, template, dropped)."""
    import numpy as np

    template = np.asarray(b.template)[keep]
    prompt = np.asarray(b.prompt)[keep] + template
    dropped = dict(b.dropped) if dropped is None else dropped
    return int(prompt.size) + sum(dropped.values()), prompt, np.asarray(b.completion)[keep], template, dropped


def _raw_token_counts(spec: DatasetSpec, cfg: Any, tok: Any, limit: int | None) -> Iterator[Counts]:
    """Encoded exactly as prepare encodes (same renderer, truncation, drop reasons); rows below limit."""
    from collections import Counter

    import numpy as np

    from plw_data.errors import PLWError
    from plw_data.prepare import encoded_batches

    for batch in encoded_batches([spec.path], cfg, tok):
        dropped = [d for d in batch.dropped if limit is None or d[0] < limit]
        if dropped and cfg.on_error == "fail":
            _, file, row, err = dropped[0]
            raise PLWError(err.located(file, row))
        counts = batch.counts()
        keep = slice(None) if limit is None else counts.example_index < limit
        yield _counts(counts, keep, dict(Counter(err.reason for *_, err in dropped)))
        seen = np.concatenate([counts.example_index, [d[0] for d in batch.dropped]])
        if limit is not None and seen.size and seen.max() >= limit - 1:
            return  # rows are encoded in order: nothing further is below the limit


def _prepared_counts(spec: DatasetSpec, split: str, limit: int | None) -> Iterator[Counts]:
    """From the split's masks; with limit, the first N examples in shard order (packing shuffles).

    Rows prepare dropped (manifest counts) are reported as skipped with the train split, as they
    are for raw inputs; not with --limit, where they could not be attributed to the first N.
    """
    import numpy as np

    from plw_data.shards import iter_split_counts

    split_dir = Path(spec.path) / split
    if not split_dir.is_dir():
        raise ConfigError(f"{spec.path}: has no {split!r} split")
    if split == "train" and limit is None:
        dropped = _manifest(spec).get("counts", {}).get("dropped", {})
        if dropped:
            empty = np.zeros(0, np.int64)
            yield 0, empty, empty, empty, {str(k): int(v) for k, v in dropped.items()}
    left = limit
    for b in iter_split_counts(Path(spec.path), split):
        if left is None:
            yield _counts(b)
            continue
        yield _counts(b, slice(0, left))
        left -= min(left, len(b.prompt))
        if not left:
            return


def _text_counts(spec: DatasetSpec, cfg: Any, unit: str, limit: int | None, batch: int = 10_000) -> Iterator[Counts]:
    """chars/words of untrained turns (prompt) vs trained turns (completion); no tokenizer."""
    import itertools

    import numpy as np

    from plw_data.errors import PLWError, RowError
    from plw_data.formats import iter_conversations

    size: Callable[[str], int] = len if unit == "chars" else (lambda s: len(s.split()))
    rows = itertools.islice(iter_conversations([spec.path], cfg), limit)
    while True:
        chunk = list(itertools.islice(rows, batch))
        if not chunk:
            return
        prompt, completion, dropped = [], [], {}
        for raw, conv in chunk:
            if isinstance(conv, RowError):
                if cfg.on_error == "fail":
                    raise PLWError(conv.located(raw.file, raw.row))
                dropped[conv.reason] = dropped.get(conv.reason, 0) + 1
                continue
            p = c = 0
            for m, trained in zip(conv.messages, conv.trained):
                if trained:
                    c += size(m["content"])
                else:
                    p += size(m["content"])
            prompt.append(p)
            completion.append(c)
        yield len(chunk), np.asarray(prompt, np.int64), np.asarray(completion, np.int64), None, dropped


def measure(
    spec: DatasetSpec,
    cfg: Any,
    tok: Any,
    *,
    unit: str = "tokens",
    split: str = "train",
    limit: int | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Measured:
    """Accumulate one dataset's counts (raw or prepared) batch by batch."""
    from plw_data.stats import RgAccumulator

    if spec.prepared:
        if not (Path(spec.path) / "manifest.json").is_file():
            raise ConfigError(f"{spec.path}: a directory but not a prepared one (no manifest.json)")
        if unit != "tokens":
            raise ConfigError(f"{spec.path}: a prepared directory holds tokens; --unit {unit} needs raw inputs")
        source = _prepared_counts(spec, split, limit)
    elif unit == "tokens":
        if limit is not None and limit < cfg.batch_size:  # encode no more rows than asked for
            cfg = dataclasses.replace(cfg, batch_size=limit)
        source = _raw_token_counts(spec, cfg, tok, limit)
    else:
        source = _text_counts(spec, cfg, unit, limit)
    acc = RgAccumulator()
    rows = 0
    start = time.perf_counter()
    for n, prompt, completion, template, dropped in source:
        acc.update(prompt, completion, template=template)
        for reason, k in dropped.items():
            acc.skip(reason, k)
        rows += n
        if on_rows:
            on_rows(n)
    return Measured(spec, acc, rows, time.perf_counter() - start)


def _manifest(spec: DatasetSpec) -> dict[str, Any]:
    path = Path(spec.path) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the manifest: {e}") from None


def _expected_rows(spec: DatasetSpec, split: str, limit: int | None) -> int | None:
    """Progress total: a prepared split's example count from its manifest; unknown for raw files."""
    total = None
    if spec.prepared and (Path(spec.path) / "manifest.json").is_file():
        try:
            total = int(_manifest(spec)["splits"][split]["examples"])
        except (ConfigError, KeyError, TypeError, ValueError):
            total = None
    return total if limit is None or total is None else min(total, limit)


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


def _build_config(recipe: Path | None, overrides: dict[str, Any]) -> Any:
    from plw_data.config import DataConfig, build_config, load_recipe

    return build_config(DataConfig, load_recipe(recipe), overrides, source=str(recipe) if recipe else "options")


@o.handle_errors  # a PLWError becomes one line on stderr and exit status 2
def rg_stats(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT_OR_DIR...",
            help="Raw input files or prepared directories; NAME=PATH names a dataset (default: the file stem).",
            show_default=False,
        ),
    ],
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
    on_error: Annotated[Optional[str], typer.Option("--on-error", help="Bad rows: skip (counted) | fail  \\[default: skip]")] = None,
    num_proc: Annotated[Optional[int], typer.Option("--num-proc", help="Encoding processes for raw inputs  \\[default: 1]")] = None,
    unit: Annotated[str, typer.Option(help="tokens | chars | words (chars/words need no tokenizer).")] = "tokens",
    plw: Annotated[str, typer.Option(help="Comma-separated PLW values for the prompt's share of the loss weight.")] = DEFAULT_PLWS,
    trim: Annotated[float, typer.Option(help="Fraction cut from each end for the trimmed mean.")] = 0.1,
    split: Annotated[str, typer.Option(help="Split of a prepared directory to read.")] = "train",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N rows (examples) of each dataset.", min=1)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the statistics as JSON (CONTRACT §4).")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Write the statistics as CSV.")] = None,
    markdown_path: Annotated[Optional[Path], typer.Option("--markdown", help="Write a markdown table.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write histograms (linear and log x) to this PNG.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no table.")] = False,
) -> None:
    """Generation ratio Rg = completion / (prompt + template) per example: means, median, quantiles."""
    from plw_data import stats

    if unit not in UNITS:
        raise ConfigError(f"--unit must be one of {', '.join(UNITS)}; got {unit!r}")
    if not 0.0 <= trim < 0.5:
        raise ConfigError(f"--trim must be in [0, 0.5), got {trim}")
    plws = parse_plws(plw)
    specs = [parse_dataset(s) for s in inputs]
    for spec in specs:
        if not Path(spec.path).exists():
            raise ConfigError(f"{spec.path}: input not found")
    overrides = {
        "tokenizer": tokenizer,
        "format": format,
        "prompt_template": prompt_template,
        "completion_template": completion_template,
        "system_prompt": system_prompt,
        "chat_template": chat_template,
        "train_on": train_on,
        "end_of_turn": end_of_turn,
        "max_length": max_length,
        "truncation": truncation,
        "on_error": on_error,
        "num_proc": num_proc,
    }
    cfg = _build_config(recipe, overrides)
    tok = None
    if unit == "tokens" and any(not s.prepared for s in specs):
        if not cfg.tokenizer:
            raise ConfigError("--tokenizer is required to count tokens of raw inputs (or use --unit chars|words)")
        from plw_data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)

    results, values = [], []
    with _progress(quiet) as progress:
        for spec in specs:
            task = progress.add_task(spec.name, total=_expected_rows(spec, split, limit))
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
    if json_path:
        _write(json_path, json.dumps(stats.to_json(results), indent=2, allow_nan=False) + "\n")
    if csv_path:
        _write(csv_path, stats.to_csv(results))
    if markdown_path:
        _write(markdown_path, stats.to_markdown(results))
    if plot:
        from plw_data.stats_plot import plot_rg

        plot_rg(values, plot, unit=unit)


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror}") from None
