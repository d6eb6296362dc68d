"""Histogram figure of per-example generation ratios (one column per dataset)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

BINS = 50


def _log_bins(positive: np.ndarray) -> np.ndarray:
    lo, hi = float(positive.min()), float(positive.max())
    if hi <= lo * 1.000001:  # a single value: give it a visible one-decade window
        lo, hi = lo / 3.0, hi * 3.0
    return np.logspace(np.log10(lo), np.log10(hi), BINS + 1)


def _log_axis(ax, *, decades: float) -> None:
    """Log x with plain-number labels: 1-2-5 steps on a narrow range, decades on a wide one."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 2 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_rg(
    datasets: Sequence[tuple[str, np.ndarray]], path: str | Path, *, unit: str = "tokens", max_columns: int = 5
):
    """Write a PNG: per dataset, a linear-x histogram above and a log-x one (log-spaced bins) below.

    The log view shows the shape of skewed Rg (e.g. RACE ~1e-3 vs Alpaca ~10) that the linear
    view squashes; arithmetic and geometric means are marked on both. Rg = 0 has no place on a
    log axis: the log panel counts those in its title. More than ``max_columns`` datasets wrap
    onto further pairs of rows. Returns the (closed) figure, with exactly two axes per dataset.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not datasets:
        raise ValueError("plot_rg needs at least one dataset")
    ncols = min(len(datasets), max_columns)
    bands = -(-len(datasets) // ncols)
    fig, axes = plt.subplots(2 * bands, ncols, figsize=(3.4 * ncols, 5.6 * bands), squeeze=False)
    for k in range(len(datasets), bands * ncols):  # empty slots of the last band
        fig.delaxes(axes[2 * (bands - 1), k % ncols])
        fig.delaxes(axes[2 * (bands - 1) + 1, k % ncols])
    for k, (name, values) in enumerate(datasets):
        rg = np.asarray(values, dtype=np.float64)
        band, col = divmod(k, ncols)
        top, bottom = axes[2 * band, col], axes[2 * band + 1, col]
        top.set_title(f"{name} (n={rg.size:,})", fontsize=9)
        bottom.set_xlabel(f"Rg = completion / prompt [{unit}]", fontsize=8)
        if col == 0:
            top.set_ylabel("examples (linear x)")
            bottom.set_ylabel("examples (log x)")
        if rg.size == 0:
            for ax in (top, bottom):
                ax.text(0.5, 0.5, "no examples", ha="center", va="center", transform=ax.transAxes)
            continue
        positive = rg[rg > 0]
        arith = float(rg.mean())
        geo = float(np.exp(np.log(positive).mean())) if positive.size else None
        top.hist(rg, bins=BINS, color="tab:blue", alpha=0.75)
        if positive.size:
            bins = _log_bins(positive)
            bottom.hist(positive, bins=bins, color="tab:blue", alpha=0.75)
            _log_axis(bottom, decades=float(np.log10(bins[-1] / bins[0])))
        zeros = rg.size - positive.size
        if zeros:
            bottom.set_title(f"{zeros:,} with Rg = 0 not shown", fontsize=8)
        for ax in (top, bottom):
            ax.axvline(arith, color="tab:red", linestyle="-", linewidth=1.2, label=f"arithmetic mean {arith:.3g}")
            if geo is not None:
                ax.axvline(geo, color="tab:green", linestyle="--", linewidth=1.2, label=f"geometric mean {geo:.3g}")
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Generation ratio per example: linear x (top), log x (bottom)", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig
