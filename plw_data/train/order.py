"""Which rows each rank trains on at each update: pure functions of (seed, epoch, update, rank).

Epoch e visits DATA/train in a permutation seeded by (seed, e); update k of an epoch takes rows
[k·G, (k+1)·G) of it, G = micro · accum · world (the last update of an epoch may be short). Slot
j = micro_step · world + rank of the window holds rows [j·micro, (j+1)·micro). The position in the data
is therefore a function of the update index alone, which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import math

import numpy as np

def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch``: a permutation seeded by (seed, epoch), the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def rank_slots(window: np.ndarray, *, micro: int, accum: int, world: int, rank: int) -> list[np.ndarray]:
    """This rank's row indices for each micro-step of an update (possibly empty at an epoch's end)."""
    return [window[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(accum)]


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return max(1, math.ceil(n_rows / global_batch))


def update_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
