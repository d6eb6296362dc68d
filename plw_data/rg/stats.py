"""Generation-ratio (Rg) statistics: does a prompt-loss-weight matter for this dataset?

Per example, Rg = completion tokens / (prompt + template tokens) (docs/rg-stats.md). The
distribution is heavily skewed (RACE ~0.003, Alpaca-style rows up to 50+), so the arithmetic
mean alone misleads; we report it beside the geometric mean, the median, quantiles and the
ratio of sums (Σ completion / Σ prompt: the dataset-level balance of the loss at PLW = 1).

Rules (documented so results can be compared):
- "prompt" everywhere here means prompt + template tokens; the caller passes that sum.
- An example with no prompt tokens has no defined Rg: it is counted in ``skipped["no_prompt"]``
  and enters no other statistic.
- An example with no completion tokens has Rg = 0: it counts in n, the arithmetic and trimmed
  means, the median, quantiles, ``fraction_below_1`` and the sums. log(0) is undefined, so the
  geometric mean is taken over Rg > 0 only, and ``zero_completion`` says how many were left out
  of it (the geometric mean is None when no Rg is positive).
- Quantiles use linear interpolation between order statistics (numpy's default method).
- The trimmed mean drops floor(trim·n) values from each end (scipy's ``trim_mean`` convention).
- ``prompt_share[PLW]`` = Σ PLW·prompt / Σ (PLW·prompt + completion): the prompt's share of the
  total loss weight when prompt and template tokens get weight PLW and completion tokens 1.
- Statistics of an empty sample (n = 0) are None, so the JSON stays valid (no NaN).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

QUANTILES = {"p05": 0.05, "p25": 0.25, "p75": 0.75, "p95": 0.95}
NO_PROMPT = "no_prompt"


def plw_key(plw: float) -> str:
    """The string key of a PLW value in ``prompt_share`` ("0", "0.01", "0.1", "1")."""
    return f"{float(plw):g}"


def _as_counts(a: Any, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{what} counts must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} counts must be numeric, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} counts must be >= 0")
    return arr.astype(np.int64, copy=False) if np.issubdtype(arr.dtype, np.integer) else arr.astype(np.float64)


def _split_counts(prompt: Any, completion: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """(kept prompt, kept completion, number with no prompt) for one batch of counts."""
    p = _as_counts(prompt, "prompt")
    c = _as_counts(completion, "completion")
    if p.shape != c.shape:
        raise ValueError(f"prompt and completion counts differ in length: {p.size} vs {c.size}")
    keep = p > 0
    n_keep = int(np.count_nonzero(keep))
    if n_keep == p.size:
        return p, c, 0
    return p[keep], c[keep], p.size - n_keep


def _quantile_sorted(s: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile of an already sorted array (numpy's default method)."""
    pos = q * (s.size - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.size - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def _summarise(
    rg_sorted: np.ndarray,
    *,
    name: str,
    unit: str,
    prompt_sum: float,
    completion_sum: float,
    template_sum: float | None,
    skipped: Mapping[str, int],
    plws: Sequence[float],
    trim: float,
) -> dict[str, Any]:
    """All statistics from the sorted per-example Rg values and the count sums."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    s = rg_sorted
    n = int(s.size)
    skipped_out = {k: int(v) for k, v in sorted(skipped.items()) if v}
    stats: dict[str, Any] = {"name": name, "n": n, "unit": unit}
    if n == 0:
        none_keys = ("arithmetic_mean", "geometric_mean", "median", "ratio_of_sums", "fraction_below_1")
        stats.update(dict.fromkeys(none_keys))
        stats["quantiles"] = dict.fromkeys(QUANTILES)
        stats.update(mean_prompt=None, mean_completion=None, skipped=skipped_out)
        stats.update(trimmed_mean=None, trim=trim, min=None, max=None, zero_completion=0)
        stats.update(total_prompt=0, total_completion=0)
        if template_sum is not None:
            stats["mean_template"] = None
        stats["prompt_share"] = {plw_key(w): None for w in plws}
        return stats
    n_zero = int(np.searchsorted(s, 0.0, side="right"))
    positive = s[n_zero:]
    k = int(math.floor(trim * n))
    stats.update(
        arithmetic_mean=float(s.mean()),
        geometric_mean=float(np.exp(np.log(positive).mean())) if positive.size else None,
        median=_quantile_sorted(s, 0.5),
        ratio_of_sums=float(completion_sum / prompt_sum),
        fraction_below_1=float(np.searchsorted(s, 1.0, side="left") / n),
        quantiles={key: _quantile_sorted(s, q) for key, q in QUANTILES.items()},
        mean_prompt=float(prompt_sum / n),
        mean_completion=float(completion_sum / n),
        skipped=skipped_out,
        trimmed_mean=float(s[k : n - k].mean()),
        trim=trim,
        min=float(s[0]),
        max=float(s[-1]),
        zero_completion=n_zero,
        total_prompt=_plain_number(prompt_sum),
        total_completion=_plain_number(completion_sum),
    )
    if template_sum is not None:
        stats["mean_template"] = float(template_sum / n)
    stats["prompt_share"] = {
        plw_key(w): float(w * prompt_sum / (w * prompt_sum + completion_sum)) if (w * prompt_sum + completion_sum) else None
        for w in plws
    }
    return stats


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def rg_statistics(
    prompt: np.ndarray,
    completion: np.ndarray,
    *,
    name: str,
    unit: str = "tokens",
    plws: Sequence[float] = (),
    trim: float = 0.1,
    template: np.ndarray | None = None,
    skipped: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The rg-stats statistics (docs/rg-stats.md) (plus extras) for per-example prompt(+template) and completion counts.

    ``template`` (optional, already included in ``prompt``) is only reported as ``mean_template``;
    ``skipped`` adds reasons counted upstream (e.g. rows the pipeline dropped).
    """
    acc = RgAccumulator()
    acc.update(prompt, completion, template=template)
    return acc.result(name=name, unit=unit, plws=plws, trim=trim, skipped=skipped)


class RgAccumulator:
    """Batch-by-batch Rg statistics in bounded memory.

    Sums are exact integers. Exact median/quantiles/trimmed mean need every per-example Rg, so
    those are kept as float64: 8 bytes per example (80 MB for ten million examples; ``result``
    briefly needs twice that while it concatenates and sorts).
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.prompt_sum: int | float = 0
        self.completion_sum: int | float = 0
        self.template_sum: int | float | None = None
        self.skipped: dict[str, int] = {}

    def update(self, prompt: Any, completion: Any, *, template: Any | None = None) -> None:
        p, c, n_no_prompt = _split_counts(prompt, completion)
        if template is not None:
            t = _as_counts(template, "template")
            if t.shape != np.shape(prompt):
                raise ValueError("template counts must match prompt counts in length")
            kept_t = t[np.asarray(prompt) > 0] if n_no_prompt else t
            self.template_sum = (self.template_sum or 0) + kept_t.sum().item()
        if n_no_prompt:
            self.skip(NO_PROMPT, n_no_prompt)
        if p.size:
            self._chunks.append(c.astype(np.float64) / p)
            self.prompt_sum += p.sum().item()
            self.completion_sum += c.sum().item()

    def skip(self, reason: str, n: int = 1) -> None:
        """Count examples that never reach the statistics (no prompt, dropped by the pipeline)."""
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    @property
    def n(self) -> int:
        return sum(ch.size for ch in self._chunks)

    def values(self) -> np.ndarray:
        """All per-example Rg values so far, sorted (consolidated into one array)."""
        if len(self._chunks) != 1:
            merged = np.concatenate(self._chunks) if self._chunks else np.empty(0, np.float64)
            self._chunks = [merged]
        self._chunks[0].sort()
        return self._chunks[0]

    def result(
        self,
        *,
        name: str,
        unit: str = "tokens",
        plws: Sequence[float] = (),
        trim: float = 0.1,
        skipped: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        all_skipped = dict(self.skipped)
        for reason, n in (skipped or {}).items():
            all_skipped[reason] = all_skipped.get(reason, 0) + int(n)
        return _summarise(
            self.values(),
            name=name,
            unit=unit,
            prompt_sum=self.prompt_sum,
            completion_sum=self.completion_sum,
            template_sum=self.template_sum,
            skipped=all_skipped,
            plws=plws,
            trim=trim,
        )


# ---------------------------------------------------------------------------------------------
# Formatting


def to_json(stats_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The rg-stats JSON document (docs/rg-stats.md): ``{"datasets": [...]}``."""
    return {"datasets": [dict(s) for s in stats_list]}


def _plw_keys(stats_list: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for s in stats_list:
        keys.update(dict.fromkeys(s.get("prompt_share", {})))
    return sorted(keys, key=float)


def _skipped_text(skipped: Mapping[str, int]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in skipped.items()) if skipped else "0"


CSV_FIELDS = [
    "name", "unit", "n", "mean_prompt", "mean_completion", "arithmetic_mean", "geometric_mean",
    "trimmed_mean", "median", "ratio_of_sums", "fraction_below_1", "p05", "p25", "p75", "p95",
    "min", "max", "zero_completion", "skipped",
]  # fmt: skip


def to_csv(stats_list: Sequence[Mapping[str, Any]]) -> str:
    """One row per dataset; full precision; prompt shares as ``prompt_share_<PLW>`` columns."""
    plw_keys = _plw_keys(stats_list)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS + [f"prompt_share_{k}" for k in plw_keys])
    for s in stats_list:
        flat = {**s, **s["quantiles"], "skipped": _skipped_text(s["skipped"])}
        share = s.get("prompt_share", {})
        row = [flat.get(f) for f in CSV_FIELDS] + [share.get(k) for k in plw_keys]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def fmt_sig(x: float | None, digits: int = 3) -> str:
    """Human number: ``digits`` significant figures without exponent (0.00231, 7.62, 440)."""
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    return f"{x:.{decimals}f}"


def table_rows(stats_list: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells shared by the markdown and terminal tables."""
    plw_keys = _plw_keys(stats_list)
    headers = [
        "dataset", "n", "mean prompt", "mean completion", "arithmetic mean", "geometric mean",
        "median", "ratio of sums", "p05", "p95", "fraction < 1",
    ] + [f"prompt share @PLW={k}" for k in plw_keys] + ["skipped"]  # fmt: skip
    rows = []
    for s in stats_list:
        q = s["quantiles"]
        mp, mc = s["mean_prompt"], s["mean_completion"]
        share = s.get("prompt_share", {})
        rows.append(
            [
                str(s["name"]),
                f"{s['n']:,}",
                "–" if mp is None else f"{mp:,.1f}",
                "–" if mc is None else f"{mc:,.1f}",
                fmt_sig(s["arithmetic_mean"]),
                fmt_sig(s["geometric_mean"]),
                fmt_sig(s["median"]),
                fmt_sig(s["ratio_of_sums"]),
                fmt_sig(q["p05"]),
                fmt_sig(q["p95"]),
                "–" if s["fraction_below_1"] is None else f"{s['fraction_below_1']:.3f}",
            ]
            + [fmt_sig(share.get(k)) for k in plw_keys]
            + [_skipped_text(s["skipped"])]
        )
    return headers, rows


def to_markdown(stats_list: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table (numbers right-aligned)."""
    headers, rows = table_rows(stats_list)
    align = [":---"] + ["---:"] * (len(headers) - 2) + [":---"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rich_table(stats_list: Sequence[Mapping[str, Any]], *, width: int | None = None, title: str | None = None):
    """The same table for the terminal (a ``rich.table.Table``).

    One row per dataset when that fits in ``width`` characters; otherwise transposed (one row per
    statistic, one column per dataset) so that a narrow terminal stays readable.
    """
    from rich.table import Table

    headers, rows = table_rows(stats_list)
    unit = stats_list[0]["unit"] if stats_list else "tokens"
    table = Table(title=title or f"Generation ratio Rg = completion / (prompt + template), in {unit}")
    needed = sum(max([len(w) for w in h.split()] + [len(r[i]) for r in rows]) + 3 for i, h in enumerate(headers))
    if width is None or needed <= width:
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i in (0, len(headers) - 1) else "right")
        for row in rows:
            table.add_row(*row)
        return table
    table.add_column("statistic", justify="left")
    for row in rows:
        table.add_column(row[0], justify="right", overflow="fold")
    for i, h in enumerate(headers[1:], start=1):
        table.add_row(h, *(row[i] for row in rows))
    return table
