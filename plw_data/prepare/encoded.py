"""What the encoder hands on: encoded examples of one chunk, and per-example counts (rg-stats)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import RowError
from ..schema import COMPLETION, PROMPT, REASONING, TEMPLATE

@dataclass
class CountsBatch:
    """Per-example token counts by category: what rg-stats needs, from raw inputs or shards alike."""

    example_index: np.ndarray  # int64 [n]
    template: np.ndarray  # int64 [n]
    prompt: np.ndarray  # int64 [n]
    completion: np.ndarray  # int64 [n]
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class EncodedBatch:
    """Encoded examples of one chunk, flat: lengths split input_ids/category per example."""

    example_index: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]
    input_ids: np.ndarray  # int32 [sum(lengths)]
    category: np.ndarray  # uint8 [sum(lengths)]: TEMPLATE, PROMPT, COMPLETION or REASONING (schema codes)
    truncated: int = 0
    dropped: list[tuple[int, str, int, RowError]] = field(default_factory=list)  # (index, file, row, error)
    weight: np.ndarray | None = None  # float32 [sum(lengths)]: per-message weight multipliers; None: all 1
    source: np.ndarray | None = None  # int16 [n]: source of each example in a mixture; None: one source
    renders: dict[str, int] = field(default_factory=dict)  # how this chunk's chat rows were rendered (run.json)

    @property
    def rows(self) -> int:
        """Input rows this batch covers: kept (a row may give several examples) and dropped."""
        return len(np.unique(self.example_index)) + len(self.dropped)

    def counts(self) -> CountsBatch:
        dropped: dict[str, int] = {}
        for *_, err in self.dropped:
            dropped[err.reason] = dropped.get(err.reason, 0) + 1
        if not len(self.lengths):
            empty = np.zeros(0, np.int64)
            return CountsBatch(self.example_index, empty, empty, empty, dropped)
        starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        cats = np.where(self.category == REASONING, COMPLETION, self.category)  # reasoning is completion
        per = [np.add.reduceat((cats == c).astype(np.int64), starts) for c in (TEMPLATE, PROMPT, COMPLETION)]
        return CountsBatch(self.example_index, *per, dropped)

    @staticmethod
    def from_examples(
        kept: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]],
        dropped: list[tuple[int, str, int, RowError]],
        truncated: int,
    ) -> EncodedBatch:
        """kept: (index, ids, categories, per-token weights or None when all 1)."""
        if not kept:
            return EncodedBatch(
                np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8), truncated, dropped
            )
        return EncodedBatch(
            np.fromiter((k[0] for k in kept), np.int64, len(kept)),
            np.fromiter((len(k[1]) for k in kept), np.int64, len(kept)),
            np.concatenate([k[1] for k in kept]),
            np.concatenate([k[2] for k in kept]),
            truncated,
            dropped,
            weight=None if all(k[3] is None for k in kept) else np.concatenate(
                [k[3] if k[3] is not None else np.ones(len(k[1]), np.float32) for k in kept]
            ),
        )


def truncate(
    ids: np.ndarray, cats: np.ndarray, max_length: int, policy: str, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Fit an example into max_length by removing prompt tokens only; the completion is kept whole."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, cats, weights
    if policy == "drop":
        raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
    prompt_pos = np.flatnonzero(cats == PROMPT)
    if len(prompt_pos) < excess:
        raise RowError(
            "completion_too_long",
            f"{len(ids)} tokens; without any prompt still {len(ids) - len(prompt_pos)} > max_length {max_length}",
        )
    cut = prompt_pos[:excess] if policy == "left" else prompt_pos[len(prompt_pos) - excess :]
    keep = np.ones(len(ids), bool)
    keep[cut] = False
    return ids[keep], cats[keep], None if weights is None else weights[keep]
