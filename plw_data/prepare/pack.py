"""Global sample packing, planned on example lengths alone.

The planner sees a histogram of lengths (how many examples have each length), so its work grows
with the number of distinct lengths (at most ``max_length``), not with the number of examples.
The writer gathers token ids afterwards, following the plan.

Algorithm (exact-fill greedy with adaptive priorities, then the better of it and global BFD):

1. Open a row with the longest remaining example: long examples are the hardest to place.
2. Fill the rest of the row to the largest total the remaining examples can reach. Which totals
   are reachable is kept as the generating function of sub-multiset sums (counted modulo a prime:
   nonzero <=> reachable), updated with O(max_length) numpy work whenever a count changes.
3. Pick fillers one at a time among lengths that leave the remaining gap reachable, preferring the
   length that carries the most tokens (count x length x priority), so that the leftover pool keeps
   the mix of lengths it needs to fill rows exactly.
4. Repeat a row's composition as often as the counts allow, in one step.
5. Lengths that ended up in under-filled rows get a higher priority in the next pass; the best pass
   is kept, stopping early at the lower bound ceil(tokens / max_length).

Global best-fit decreasing (BFD), also run on the histogram, is used instead wherever it needs
fewer rows, so the result never has more rows than BFD.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import numpy as np

from ..schema import lower_bound_rows

_PASSES = 6  # greedy passes at most (each re-weights the lengths left in under-filled rows)
_GREEDY_MAX_CAP = 4096  # beyond this row length the greedy plans on lengths rounded up to a grain
_BOOST = 4.0  # priority increase per pass for a length, times its fraction left in under-filled rows


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Rows as CSR: row r holds items ``order[row_starts[r]:row_starts[r + 1]]``."""

    order: np.ndarray  # int64 item indices (into the lengths array), row after row
    row_starts: np.ndarray  # int64, n_rows + 1 offsets into `order`

    @property
    def n_rows(self) -> int:
        return len(self.row_starts) - 1

    def row(self, r: int) -> np.ndarray:
        return self.order[self.row_starts[r] : self.row_starts[r + 1]]


def plan_unpacked(n: int, seed: int = 0, shuffle: bool = True) -> PackPlan:
    """One item per row (``--no-pack``), rows in a seeded shuffled order unless ``shuffle`` is off."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return PackPlan(order.astype(np.int64), np.arange(n + 1, dtype=np.int64))


def plan_packing(lengths: np.ndarray, max_length: int, seed: int = 0) -> PackPlan:
    """Global packing plan: rows of total length <= max_length, never more rows than global BFD.

    The rows (which lengths share a row) depend only on the lengths; ``seed`` decides which of the
    equally long items goes where and the order of the rows.
    """
    lengths = _checked_lengths(lengths, max_length)
    max_length = int(max_length)
    grain = -(-max_length // _GREEDY_MAX_CAP)  # plan long rows on coarser lengths: cost ~ cap^2
    coarse_cap = max_length // grain
    # Rounded up, lengths still fit when their coarse rows do; one too long for a coarse row becomes
    # exactly one, so it gets a row to itself.
    coarse = lengths if grain == 1 else np.minimum(-(-lengths // grain), coarse_cap)
    ops, n_rows = _best_greedy_ops(_histogram(coarse, coarse_cap), coarse_cap)
    bfd_ops, bfd_rows = _bfd_ops(_histogram(lengths, max_length), max_length)
    if bfd_rows < n_rows:
        return _plan_from_ops(lengths, bfd_ops, bfd_rows, seed)
    return _plan_from_ops(coarse, ops, n_rows, seed)


def plan_bfd(lengths: np.ndarray, max_length: int, seed: int = 0) -> PackPlan:
    """Global best-fit decreasing (the reference the planner must never lose to), same row order rules."""
    lengths = _checked_lengths(lengths, max_length)
    ops, n_rows = _bfd_ops(_histogram(lengths, max_length), max_length)
    return _plan_from_ops(lengths, ops, n_rows, seed)


# --------------------------------------------------------------------------- input and output


def _checked_lengths(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Lengths as int64, or ValueError naming the first index outside 1..max_length."""
    if int(max_length) < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 1) | (arr > max_length))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"item {i} has length {int(arr[i])}, outside 1..{max_length} "
            f"({bad.size} such item(s)); truncate or drop it before packing"
        )
    return arr


def _histogram(lengths: np.ndarray, cap: int) -> np.ndarray:
    return np.bincount(lengths, minlength=cap + 1).astype(np.int64)


# An op (first_row, n_rows, length, per_row) puts `per_row` items of `length` into each of the rows
# first_row .. first_row + n_rows - 1. Both planners describe their rows this way.
_Op = tuple[int, int, int, int]


def _plan_from_ops(lengths: np.ndarray, ops: list[_Op], n_rows: int, seed: int) -> PackPlan:
    """Turn per-length row slots into item indices: items of a length (as planned) are
    interchangeable, so each length's items are dealt to its slots in a seeded random order;
    rows are shuffled."""
    n = len(lengths)
    if n == 0:
        return PackPlan(np.zeros(0, np.int64), np.zeros(1, np.int64))
    first, rows, length, per_row = (np.array(c, dtype=np.int64) for c in zip(*ops))
    sizes = rows * per_row
    op_of_slot = np.repeat(np.arange(len(ops)), sizes)
    within = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    slot_row = first[op_of_slot] + within // per_row[op_of_slot]
    slot_len = length[op_of_slot]

    small = np.int16 if int(length.max()) < 2**15 else np.int32  # 16 bits: numpy radix-sorts
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)
    items_by_len = shuffled[np.argsort(lengths.astype(small)[shuffled], kind="stable")]
    slot_item = np.empty(n, np.int64)
    slot_item[np.argsort(slot_len.astype(small), kind="stable")] = items_by_len

    out_row = rng.permutation(n_rows)[slot_row]
    order = np.sort(out_row * n + slot_item) % n  # by output row, then ascending item index
    row_starts = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(out_row, minlength=n_rows), out=row_starts[1:])
    return PackPlan(order, row_starts)


# --------------------------------------------------------------------------- best-fit decreasing


def _bfd_ops(hist: np.ndarray, cap: int) -> tuple[list[_Op], int]:
    """Global BFD on the histogram. Items of one length go in as a batch: in BFD each goes to the
    fullest row it fits, so a row with free space f takes f // length of them before the next."""
    free_rows = [0] * (cap + 1)  # open rows per amount of free space
    free_values: list[int] = []  # sorted amounts of free space that some open row has
    ranges: list[list[list[int]]] = [[] for _ in range(cap + 1)]  # [first_row, count] per free space
    ops: list[_Op] = []
    n_rows = 0

    def add_rows(free: int, first: int, count: int) -> None:
        if not free_rows[free] and free:
            bisect.insort(free_values, free)
        free_rows[free] += count
        ranges[free].append([first, count])

    def fill(free: int, count: int, length: int, per_row: int) -> None:
        """Put per_row items of `length` into `count` open rows with `free` space."""
        stack = ranges[free]
        free_rows[free] -= count
        if not free_rows[free]:
            free_values.pop(bisect.bisect_left(free_values, free))
        while count:
            start, size = stack[-1]
            take = min(size, count)
            if take == size:
                stack.pop()
            else:
                stack[-1][1] = size - take
            ops.append((start + size - take, take, length, per_row))
            add_rows(free - per_row * length, start + size - take, take)
            count -= take

    for length in np.flatnonzero(hist)[::-1].tolist():
        left = int(hist[length])
        while left:
            at = bisect.bisect_left(free_values, length)
            if at == len(free_values):  # open new rows, each as full of this length as it gets
                per_row = cap // length
                full, rest = divmod(left, per_row)
                for count, per in ((full, per_row), (int(rest > 0), rest)):
                    if count:
                        ops.append((n_rows, count, length, per))
                        add_rows(cap - per * length, n_rows, count)
                        n_rows += count
                break
            free = free_values[at]
            per_row = free // length
            avail = free_rows[free]
            take = min(avail, left // per_row)
            if take:
                fill(free, take, length, per_row)
                left -= take * per_row
            if left and take < avail:  # the last few go together into one more row
                fill(free, 1, length, left)
                left = 0
    return ops, n_rows


# --------------------------------------------------------------------------- exact-fill greedy


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24."""
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    if n < 2:
        return False
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


class _SubsetSums:
    """Generating function of sub-multiset sums up to ``cap``, coefficients modulo a prime.

    A length l with count c contributes (1 - x^((c+1)l)) / (1 - x^l); changing c multiplies by
    one such factor and divides by another, i.e. a strided cumulative sum and a shifted subtraction.
    Only additions, so a prime below 2^62 / (cap + 1) keeps int64 exact; a coefficient is zero
    modulo the prime while nonzero in truth with probability ~1/p (a missed fill, never a wrong one).
    """

    def __init__(self, hist: np.ndarray, cap: int):
        self.cap = cap
        p = 2**62 // (cap + 1)
        p -= 1 - p % 2
        while not _is_prime(p):
            p -= 2
        self.p = p
        self.counts = hist.copy()
        self.counts[cap // 2 + 1 :] = 0  # too long to ever fill a gap (see _PassState)
        g = np.zeros(cap + 1, np.int64)
        g[0] = 1
        for length in np.flatnonzero(self.counts).tolist():
            g = self.changed(g, length, 0, int(self.counts[length]))
        self.initial = g

    def changed(self, g: np.ndarray, length: int, old: int, new: int) -> np.ndarray:
        """g with the count of `length` changed from old to new (a new array, or g when no-op)."""
        return self._times_one_minus(self._over_one_minus(g, (old + 1) * length), (new + 1) * length)

    def _over_one_minus(self, g: np.ndarray, step: int) -> np.ndarray:
        if step > self.cap:
            return g
        n_blocks = -(-len(g) // step)
        buf = np.zeros(n_blocks * step, np.int64)
        buf[: len(g)] = g
        out = np.cumsum(buf.reshape(n_blocks, step), axis=0).ravel()[: len(g)]
        return out % self.p

    def _times_one_minus(self, g: np.ndarray, step: int) -> np.ndarray:
        if step > self.cap:
            return g
        out = g.copy()
        out[step:] -= g[:-step]
        return out % self.p


def _best_greedy_ops(hist: np.ndarray, cap: int) -> tuple[list[_Op], int]:
    """Best of up to _PASSES greedy passes; each pass boosts the lengths the last one left in
    under-filled rows, so they get placed while partners for them remain."""
    sums = _SubsetSums(hist, cap)
    bound = lower_bound_rows(int(np.dot(hist, np.arange(cap + 1))), cap)
    priority = np.ones(cap + 1)
    best: tuple[list[_Op], int] | None = None
    for _ in range(_PASSES):
        ops, n_rows, stranded = _greedy_pass(hist, cap, sums, priority)
        if best is None or n_rows < best[1]:
            best = (ops, n_rows)
        if best[1] <= bound:
            break
        priority = priority * (1.0 + _BOOST * stranded / np.maximum(hist, 1))
    assert best is not None
    return best


def _greedy_pass(
    hist: np.ndarray, cap: int, sums: _SubsetSums, priority: np.ndarray
) -> tuple[list[_Op], int, np.ndarray]:
    """One exact-fill greedy pass: the ops, the row count, and per length how many items ended in
    under-filled rows."""
    state = _PassState(hist, sums, priority)
    ops: list[_Op] = []
    n_rows = 0
    stranded = np.zeros(cap + 1, np.int64)
    while state.longest.size:
        opener = int(state.longest[0])
        gap = cap - opener
        state.take(opener, gap)  # also brings g up to date below the gap
        target = int(np.flatnonzero(state.g[: gap + 1])[-1])
        waste = gap - target
        picks = [opener]
        while target:
            length = state.pick_filler(target)
            if length is None:  # only if a modular count hit zero by chance: leave the gap
                waste += target
                break
            picks.append(length)
            target -= length
        n_rows = state.commit_row(picks, ops, n_rows, stranded if waste else None)
    return ops, n_rows, stranded


def _best_first(score: np.ndarray, best: int):
    """Indices by descending score, `best` first; sorting only if `best` is turned down."""
    yield best
    yield from np.argsort(-score, kind="stable").tolist()


class _PassState:
    """Counts left during a pass, and `g`, the subset-sum function, kept valid for sums up to the
    current gap only.

    Reachability of sums <= t depends on the count c of a length l only through min(c, t // l),
    so `g` may lag behind a count until the gap reaches l * (c + 1): in the bulk a pick is a lookup
    and `g` is updated rarely. Lengths over cap / 2 never matter (a gap is at most cap minus the
    longest item left) and are left out of `g` altogether.
    """

    def __init__(self, hist: np.ndarray, sums: _SubsetSums, priority: np.ndarray):
        self.sums = sums
        self.cnt = hist.copy()  # items left, counting the picks of the row being built
        self.g = sums.initial
        self.g_cnt = sums.counts.copy()  # the counts `g` reflects
        self.lagging: list[tuple[int, int]] = []  # heap of (gap from which g must follow, length)
        self.weight = np.arange(len(hist)) * priority  # tokens per item, times priority
        self.score = self.cnt * self.weight
        self.longest = np.flatnonzero(self.cnt)[::-1]  # lengths left, longest first

    def take(self, length: int, rest: int) -> None:
        """Take one item of `length`, leaving a gap of `rest` that g must stay valid for."""
        self.cnt[length] -= 1
        self.score[length] -= self.weight[length]
        self._lag(length)
        self.catch_up(rest)

    def catch_up(self, gap: int) -> None:
        """Bring g up to date for every length whose count matters for sums <= gap."""
        while self.lagging and self.lagging[0][0] <= gap:
            length = heapq.heappop(self.lagging)[1]
            if self.g_cnt[length] != self.cnt[length]:
                self.g = self.sums.changed(self.g, length, int(self.g_cnt[length]), int(self.cnt[length]))
                self.g_cnt[length] = self.cnt[length]

    def _lag(self, length: int) -> None:
        if length <= self.sums.cap // 2:
            heapq.heappush(self.lagging, (length * (int(self.cnt[length]) + 1), length))

    def pick_filler(self, target: int) -> int | None:
        """Take the filler for gap `target`, or None if no length keeps the rest reachable.

        Among lengths whose removal leaves target - length reachable, the one carrying the most
        tokens (times its priority) wins; ties go to the longer one.
        """
        ls = self.longest[np.searchsorted(-self.longest, -target) :]
        score = self.score[ls] * (self.g[target - ls] != 0)
        best = int(np.argmax(score))
        if score[best] <= 0:
            return None
        for i in _best_first(score, best):
            length = int(ls[i])
            if score[i] <= 0:
                break
            rest = target - length
            if self.cnt[length] - 1 < rest // length:  # the count matters below the rest: test it
                trial = self.sums.changed(self.g, length, int(self.g_cnt[length]), int(self.cnt[length]) - 1)
                if not trial[rest]:
                    continue
                self.g, self.g_cnt[length] = trial, self.cnt[length] - 1
            self.take(length, rest)
            return length
        return None

    def commit_row(
        self, picks: list[int], ops: list[_Op], n_rows: int, stranded: np.ndarray | None
    ) -> int:
        """Record the row, repeated as often as the counts allow; returns the new row count.
        `stranded` (for an under-filled row) counts its items."""
        per_row: dict[int, int] = {}
        for length in picks:
            per_row[length] = per_row.get(length, 0) + 1
        repeats = 1 + min(int(self.cnt[length]) // k for length, k in per_row.items())
        for length, k in per_row.items():
            ops.append((n_rows, repeats, length, k))
            self.cnt[length] -= (repeats - 1) * k
            self.score[length] = self.cnt[length] * self.weight[length]
            self._lag(length)
            if stranded is not None:
                stranded[length] += repeats * k
        if not all(self.cnt[length] for length in per_row):
            self.longest = np.flatnonzero(self.cnt)[::-1]
        return n_rows + repeats
