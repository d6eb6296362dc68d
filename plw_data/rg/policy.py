"""A PLW per source, given or chosen from the data's token totals (docs/mixtures.md).

Under PLW w (template tokens weighted like prompt tokens unless told otherwise), a source with P
prompt, T template and C completion tokens puts the loss weight w·P + w_t·T on its prompt side and C
on its completion. ``--prompt-share S`` picks the w at which the prompt side carries the share S:

    S = w·(P + T) / (w·(P + T) + C)   <=>   w = S·C / ((1 − S)·(P + T))

so a source with a small Rg = C / (P + T) (RACE: one answer letter after an article) gets a small
PLW and a source with a large Rg a large one, and every source trains with the same balance.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ConfigError

#: A source name in a PLW map (as in a mixture file); ``*`` stands for every source not named.
_ENTRY = re.compile(r"^(\*|[A-Za-z0-9_][A-Za-z0-9_.-]*)=(.+)$")
DEFAULT = "*"


def parse_plw_map(spec: str, *, flag: str = "--prompt-loss-weight") -> dict[str, str] | None:
    """``race=0.01,alpaca=linear:1:0.1`` -> {"race": "0.01", "alpaca": "linear:1:0.1"}; None when
    ``spec`` is one value or schedule for all (``0.1``, ``step:1:0.1@epoch=1``)."""
    text = re.sub(r"\s+", "", str(spec))
    parts = text.split(",")
    entries = [_ENTRY.match(p) for p in parts]
    if not any(entries):
        return None
    out: dict[str, str] = {}
    for part, m in zip(parts, entries):
        if m is None:
            raise ConfigError(f"{flag} {spec!r}: {part!r} is not SOURCE=VALUE (e.g. race=0.01,alpaca=1)")
        if m.group(1) in out:
            raise ConfigError(f"{flag} {spec!r}: source {m.group(1)!r} is given twice")
        out[m.group(1)] = m.group(2)
    return out


def per_source(values: dict[str, Any], names: list[str], *, flag: str = "--prompt-loss-weight") -> dict[str, Any]:
    """``values`` (a parsed PLW map) spelled out for every source in ``names``, in that order."""
    unknown = [n for n in values if n != DEFAULT and n not in names]
    if unknown:
        known = ", ".join(names) if names else "none: the data is not a mixture"
        raise ConfigError(f"{flag}: unknown source(s) {', '.join(unknown)} (sources: {known})")
    missing = [n for n in names if n not in values and DEFAULT not in values]
    if missing:
        raise ConfigError(f"{flag}: no PLW for source(s) {', '.join(missing)} (name them, or give *=VALUE)")
    return {n: values.get(n, values.get(DEFAULT)) for n in names}


def prompt_share_plw(tokens: dict[str, int], share: float) -> float | None:
    """The PLW under which prompt + template tokens carry ``share`` of the loss weight:
    S·C / ((1 − S)·(P + T)); None when there are no prompt or template tokens to weigh."""
    if not 0 <= share < 1:
        raise ConfigError(f"--prompt-share must be in [0, 1), got {share}")
    side = tokens["prompt"] + tokens["template"]
    if not side:
        return None
    return share * tokens["completion"] / ((1 - share) * side)


def source_tokens(manifest: dict[str, Any], split: str = "train") -> dict[str, dict[str, int]]:
    """Token totals per source of a prepared DIR's train split; one entry named after the DIR's
    split (``train``) when the DIR is not a mixture."""
    if manifest.get("sources"):
        key = "tokens" if split == "train" else "eval_tokens"
        return {name: dict(s[key]) for name, s in manifest["sources"].items()}
    s = manifest["splits"][split]
    return {split: {c: int(s[f"{c}_tokens"]) for c in ("prompt", "completion", "template")}}


def plw_from_share(manifest: dict[str, Any], share: float) -> dict[str, float]:
    """``--prompt-share``: each source's PLW from its own train-split token totals."""
    out = {}
    for name, tokens in source_tokens(manifest).items():
        plw = prompt_share_plw(tokens, share)
        if plw is None or not math.isfinite(plw):
            raise ConfigError(f"--prompt-share: source {name!r} has no prompt or template tokens to weigh")
        out[name] = plw
    return out


def loss_shares(tokens: dict[str, int], plw: float, template_weight: float | None = None) -> dict[str, float | None]:
    """The share of a source's loss weight its prompt, completion and template tokens carry."""
    tw = plw if template_weight is None else template_weight
    w = {"prompt": plw * tokens["prompt"], "completion": float(tokens["completion"]), "template": tw * tokens["template"]}
    total = sum(w.values())
    return {k: (v / total if total else None) for k, v in w.items()}
