"""Prompt-loss-weight schedules: the PLW (or template weight) in effect at each optimizer update.

Grammar (whitespace ignored)::

    SPEC  := NUMBER                                  constant
           | "linear:" A ":" B ["@" POS]             A at the first update, straight line to B at POS
           | "cosine:" A ":" B ["@" POS]             A to B along a half cosine, reaching B at POS
           | "step:" A (":" V "@" POS)+              A, then V from POS on (POS strictly increasing)
    POS   := "epoch=" NUMBER                         at this (fractional) epoch
           | "step=" INTEGER                         at this 0-based update index
           | "progress=" NUMBER                      at this fraction of all updates (0..1)

Examples: ``0.1``; ``linear:1.0:0.0`` (1 → 0 over the whole run); ``linear:1:0.1@epoch=1`` (ramp
over the first epoch, then stay at 0.1); ``step:1.0:0.1@epoch=1``; ``step:1:0.5@step=100:0.1@epoch=2``.
A ramp without ``@POS`` ends at the last update. After its end a ramp holds B.

Updates are counted from 0 and the value is a pure function of (update, total updates, updates per
epoch), so a resumed run sees exactly the values of an uninterrupted one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

Kind = Literal["constant", "linear", "cosine", "step"]
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_POS = re.compile(rf"^(epoch|step|progress)=({_NUMBER})$")


@dataclass(frozen=True)
class Position:
    """A point in training: an epoch, an update index or a fraction of all updates."""

    unit: Literal["epoch", "step", "progress"]
    value: float

    def to_step(self, total_steps: int, steps_per_epoch: int) -> float:
        if self.unit == "epoch":
            return self.value * steps_per_epoch
        if self.unit == "progress":
            return self.value * total_steps
        return self.value

    def __str__(self) -> str:
        return f"{self.unit}={_fmt(self.value)}"


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; call ``value(update, total_steps, steps_per_epoch)``."""

    kind: Kind
    values: tuple[float, ...]
    positions: tuple[Position | None, ...] = ()  # linear/cosine: (end or None,); step: one per later value

    def value(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "step":
            current = self.values[0]
            for v, pos in zip(self.values[1:], self.positions):
                if pos is not None and step >= pos.to_step(total_steps, steps_per_epoch) - 1e-9:
                    current = v
            return current
        start, end = self.values
        pos = self.positions[0]
        span = max(total_steps - 1, 1) if pos is None else pos.to_step(total_steps, steps_per_epoch)
        frac = 1.0 if span <= 0 else min(max(step / span, 0.0), 1.0)
        if self.kind == "cosine":
            frac = (1.0 - math.cos(math.pi * frac)) / 2.0
        return start + (end - start) * frac

    def __str__(self) -> str:
        if self.kind == "constant":
            return _fmt(self.values[0])
        if self.kind == "step":
            tail = "".join(f":{_fmt(v)}@{p}" for v, p in zip(self.values[1:], self.positions))
            return f"step:{_fmt(self.values[0])}{tail}"
        end = "" if self.positions[0] is None else f"@{self.positions[0]}"
        return f"{self.kind}:{_fmt(self.values[0])}:{_fmt(self.values[1])}{end}"


def parse_schedule(spec: str | float | int, *, name: str = "prompt_loss_weight") -> Schedule:
    """Parse a schedule spec (see the module docstring); a bad spec raises ConfigError naming ``name``."""
    text = re.sub(r"\s+", "", str(spec))
    try:
        schedule = _parse(text)
    except ValueError as e:
        raise ConfigError(f"--{name.replace('_', '-')} {spec!r}: {e} (grammar: docs/training.md)") from None
    bad = [v for v in schedule.values if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ConfigError(f"--{name.replace('_', '-')} {spec!r}: weights must be finite and >= 0, got {bad[0]}")
    return schedule


def _parse(text: str) -> Schedule:
    if re.fullmatch(_NUMBER, text):
        return Schedule("constant", (float(text),))
    kind, _, rest = text.partition(":")
    if kind in ("linear", "cosine"):
        body, at, pos = rest.partition("@")
        parts = body.split(":")
        if len(parts) != 2:
            raise ValueError(f"{kind} needs two values, {kind}:A:B[@POS]")
        return Schedule(kind, (_number(parts[0]), _number(parts[1])), (_position(pos) if at else None,))
    if kind == "step":
        pieces = rest.split(":")
        if len(pieces) < 2:
            raise ValueError("step needs a start value and at least one V@POS, e.g. step:1.0:0.1@epoch=1")
        values = [_number(pieces[0])]
        positions: list[Position] = []
        for piece in pieces[1:]:
            value, at, pos = piece.partition("@")
            if not at:
                raise ValueError(f"{piece!r} needs a position, V@epoch=E, V@step=N or V@progress=P")
            values.append(_number(value))
            positions.append(_position(pos))
        units = {p.unit for p in positions}
        if len(units) == 1 and any(b.value <= a.value for a, b in zip(positions, positions[1:])):
            raise ValueError("step positions must increase")
        return Schedule("step", tuple(values), tuple(positions))
    raise ValueError("expected a number, linear:A:B, cosine:A:B or step:A:V@POS")


def _number(text: str) -> float:
    if not re.fullmatch(_NUMBER, text):
        raise ValueError(f"{text!r} is not a number")
    return float(text)


def _position(text: str) -> Position:
    m = _POS.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a position (epoch=E, step=N or progress=P)")
    unit, value = m.group(1), float(m.group(2))
    if value < 0 or (unit == "progress" and value > 1):
        raise ValueError(f"position {text!r} is out of range")
    return Position(unit, value)  # type: ignore[arg-type]


def _fmt(x: float) -> str:
    return f"{x:g}"
