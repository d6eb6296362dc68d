"""OUT/metrics.png from the metrics.jsonl events: eval losses and answer accuracy against step."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOSSES = (("eval_prompt_loss", "prompt"), ("eval_completion_loss", "completion"), ("eval_full_loss", "full"))


def read_events(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(events: Iterable[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the events that carry a numeric ``key``."""
    pts = [(e["step"], e[key]) for e in events if isinstance(e.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(events: list[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Losses (left, minima marked) and answer accuracy (right, maximum marked); Agg backend, no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    steps, values = series(events, "train_loss")
    if steps:
        ax_loss.plot(steps, values, color="0.75", lw=1, label="train (weighted)")
    for key, label in LOSSES:
        steps, values = series(events, key)
        if not steps:
            continue
        (line,) = ax_loss.plot(steps, values, marker="o", ms=3, label=label)
        i = min(range(len(values)), key=values.__getitem__)
        _mark(ax_loss, steps[i], values[i], line.get_color(), "min")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="eval loss")
    steps, values = series(events, "eval_answer_accuracy")
    if steps:
        (line,) = ax_acc.plot(steps, values, marker="o", ms=3, color="tab:green", label="answer accuracy")
        i = max(range(len(values)), key=values.__getitem__)
        _mark(ax_acc, steps[i], values[i], line.get_color(), "max")
    ax_acc.set(xlabel="step", ylabel="fraction", title="eval answer accuracy", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _mark(ax, x: float, y: float, color: str, what: str) -> None:
    ax.scatter([x], [y], s=90, facecolors="none", edgecolors=color, linewidths=1.5, zorder=3)
    ax.annotate(f"{what} {y:.4g} @ {x}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7, color=color)


_EVAL_COLUMNS = (
    ("eval_completion_loss", "compl. loss"),
    ("eval_prompt_loss", "prompt loss"),
    ("eval_template_loss", "tmpl loss"),
    ("eval_full_loss", "full loss"),
    ("eval_token_accuracy", "token acc"),
    ("eval_answer_accuracy", "answer acc"),
)


class LiveTable:
    """Terminal view of a run (rich): one row per eval, a status line with the latest train event.

    On a terminal the table redraws in place; otherwise (logs, CI), or with ``enabled`` off
    (--no-progress), each eval row and note prints as a plain line with full numbers.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        from rich.console import Console

        self.enabled = True  # --no-progress turns off the live table, never the log lines
        self.console = Console(width=None if sys.stdout.isatty() else 240)
        self.evals: list[Mapping[str, Any]] = []
        self.last_train: Mapping[str, Any] | None = None
        self.train_loss: dict[int, float] = {}
        self.live = None
        if enabled and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.start()

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def update(self, event: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        is_eval = any(k.startswith("eval_") for k in event)
        if is_eval:
            self.evals.append(event)
        else:
            self.last_train = event
            self.train_loss[event["step"]] = event["train_loss"]
        if self.live is not None:
            self.live.update(self._render())
        elif is_eval:
            cells = "  ".join(f"{label}={_cell(event.get(key))}" for key, label in _EVAL_COLUMNS)
            self.console.print(f"eval step {event['step']} (epoch {event['epoch']:.3g}): {cells}", highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()

    def _render(self):
        from rich.table import Table

        table = Table(title="plw-train", caption=self._status(), show_lines=False)
        for header in ("step", "epoch", "train loss", *(label for _, label in _EVAL_COLUMNS)):
            table.add_column(header, justify="right")
        for e in self.evals[-20:]:
            row = [str(e["step"]), f"{e['epoch']:.3g}", _cell(self.train_loss.get(e["step"]))]
            table.add_row(*row, *(_cell(e.get(key)) for key, _ in _EVAL_COLUMNS))
        return table

    def _status(self) -> str:
        e = self.last_train
        if not e:
            return "starting"
        return (
            f"step {e['step']}  epoch {e['epoch']:.3g}  train_loss {e['train_loss']:.4f}  "
            f"lr {e['lr']:.3g}  plw {_weight_text(e['prompt_loss_weight'])}"
        )


def _weight_text(plw: float | dict[str, float]) -> str:
    """A PLW, or a PLW per source of a mixture (``race=0.01 alpaca=1``)."""
    if isinstance(plw, dict):
        return " ".join(f"{name}={value:.3g}" for name, value in plw.items())
    return f"{plw:.3g}"


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
