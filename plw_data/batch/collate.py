"""Batch prepared rows (packed or not) into tensors for a weighted-loss causal-LM step.

Every token carries the weight of *predicting* it: completion tokens ``completion_weight`` (1),
prompt tokens ``prompt_loss_weight`` (PLW), template tokens ``template_weight`` (default: PLW).
Optional columns refine it: reasoning tokens (``reasoning_mask``, a subset of completion) weigh
``completion_weight * reasoning_weight``; ``message_weight`` multiplies a token's weight by its
message's weight; with ``source_index`` (a mixture) the PLW and template weight may be given per
source, as ``{"race": 0.01, "alpaca": 1.0}`` with ``sources`` naming the manifest's order::

    tokens     <s> U U U <a> R R R A A </a> | <s> U U <a> A A </a>
    source     race                         | alpaca
    weight     0   p p p  p  c·r ... c c  c  | 0   P P  P  c c  c     p = PLW[race], P = PLW[alpaca]
                                               (first token of each example: never a target)
``labels`` and ``loss_weights`` are aligned with ``input_ids``; the loss shifts by one as
transformers does (hidden state t predicts token t+1), see :mod:`plw_data.batch.loss`. The first token of
every example is never a target: nothing of its own example precedes it.

Layout. Rows are right-padded to the longest row (optionally a multiple of ``pad_to_multiple_of``).
``position_ids`` restart at 0 at every example; the padding at the end of a row forms one more
pseudo-example whose positions also restart at 0 (0, 1, 2, ...). That keeps every attention
backend correct: real tokens never share a segment with padding, the padding segment attends only
to itself (no fully masked row, so no NaN), and causal attention means trailing padding cannot
reach any earlier token. ``cu_seq_lens_q/k`` (optional) list the same segments, padding included,
over the whole batch flattened to ``B*L`` tokens, which is what transformers' flash-attention
varlen path expects when it reshapes ``[B, L]`` to one stream.

How to call a transformers (5.x) model with a batch::

    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    # or: model(**model_inputs(batch))

and never pass ``attention_mask`` for packed rows. Why each matters:

- ``position_ids`` restarting at 0 are how transformers detects packed sequences and builds a
  block-diagonal causal mask (eager, sdpa, flex), so examples packed in one row cannot see each
  other.
- ``use_cache=False``: with the default ``use_cache=True`` the model creates a KV cache before
  building the mask, and packed-sequence detection is skipped whenever a cache exists: attention
  silently leaks across the examples of a row (tests/test_collate.py pins this down).
- no ``attention_mask``: a 2-D padding mask also switches packed-sequence detection off (leak);
  it is not needed for right padding (see Layout). A hand-made boolean 4-D mask is taken as-is and
  is wrong under eager attention, which adds the mask to the scores.
- flash-attention infers segment boundaries from ``position_ids`` only at batch size 1; for
  ``B > 1`` build the collator with ``emit_cu_seqlens=True`` and pass ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` too (``model_inputs`` does).

``max_length_q/k`` are Python ints, as transformers' ``DataCollatorWithFlattening`` gives them:
flash attention takes them as host integers.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import schema as S
from ..schema import COMPLETION, IGNORE_INDEX, PROMPT, REASONING, TEMPLATE  # noqa: F401  (codes of `category`)

#: ``category`` code of padding (returned with ``return_example_ids=True``; the others are the schema's,
#: REASONING included).
PAD = -1
_PAD_CODE = REASONING + 1  # padding's row in the weight table (weight 0)
_MASKS = S.MASK_COLUMNS  # index == category code
_MODEL_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class PLWCollator:
    """Collate rows of a prepared split into ``input_ids``, ``position_ids``, ``labels``, ``loss_weights``.

    Args:
        prompt_loss_weight: weight of prompt tokens (PLW).
        template_weight: weight of template tokens; ``None`` means the same as ``prompt_loss_weight``.
        completion_weight: weight of completion tokens.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        pad_token_id: id written into ``input_ids`` at padding (never a target).
        emit_cu_seqlens: add ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (int) for flash attention.
        return_example_ids: add ``category`` [B,L] int8 (0 template, 1 prompt, 2 completion, -1 pad) and
            ``example_id`` [B,L] int64 (the row's ``example_index`` of each token, -1 on padding),
            for per-category eval losses and per-example answer accuracy.
        return_attention_mask: add ``attention_mask`` (1 real, 0 pad) when the batch has padding. Off by
            default: transformers must not get it for packed rows (see the module docstring).
    """

    def __init__(
        self,
        prompt_loss_weight: float | Mapping[str, float] = 0.0,
        template_weight: float | Mapping[str, float] | None = None,
        completion_weight: float = 1.0,
        pad_to_multiple_of: int | None = None,
        pad_token_id: int = 0,
        emit_cu_seqlens: bool = False,
        return_example_ids: bool = False,
        return_attention_mask: bool = False,
        reasoning_weight: float = 1.0,
        sources: Sequence[str] | None = None,
    ) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of!r}")
        self.sources = tuple(sources) if sources is not None else None
        self.set_weights(prompt_loss_weight, template_weight, completion_weight, reasoning_weight)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = int(pad_token_id)
        self.emit_cu_seqlens = emit_cu_seqlens
        self.return_example_ids = return_example_ids
        self.return_attention_mask = return_attention_mask

    @classmethod
    def for_prepared(cls, directory: str | Path, **kwargs: Any) -> PLWCollator:
        """A collator for a prepared DIR: ``sources`` (for a PLW per source) from its manifest, in order."""
        sources = S.read_manifest(directory).get("sources")
        return cls(**{"sources": list(sources) if sources else None, **kwargs})

    def set_weights(self, prompt_loss_weight: float | Mapping[str, float], template_weight: float | Mapping[str, float] | None = None,
                    completion_weight: float = 1.0, reasoning_weight: float | None = None) -> None:
        """Change the weights (a PLW schedule does, every update) without building a new collator.

        ``reasoning_weight`` None keeps the current one."""
        if reasoning_weight is None:
            reasoning_weight = getattr(self, "reasoning_weight", 1.0)
        template = prompt_loss_weight if template_weight is None else template_weight
        plw = self._per_source("prompt_loss_weight", prompt_loss_weight)
        tw = self._per_source("template_weight", template)
        for name, value in (("completion_weight", completion_weight), ("reasoning_weight", reasoning_weight)):
            _check_weight(name, value)
        self.prompt_loss_weight = prompt_loss_weight if isinstance(prompt_loss_weight, Mapping) else float(prompt_loss_weight)
        self.template_weight = template if isinstance(template, Mapping) else float(template)
        self.completion_weight = float(completion_weight)
        self.reasoning_weight = float(reasoning_weight)
        self._by_source = isinstance(prompt_loss_weight, Mapping) or isinstance(template, Mapping)
        # [source, code]: codes TEMPLATE, PROMPT, COMPLETION, REASONING, then _PAD_CODE (weight 0).
        table = np.zeros((max(len(plw), len(tw)), _PAD_CODE + 1), np.float32)
        table[:, TEMPLATE], table[:, PROMPT] = tw, plw
        table[:, COMPLETION] = completion_weight
        table[:, REASONING] = completion_weight * reasoning_weight
        self._weight_table = table

    def _per_source(self, name: str, value: float | Mapping[str, float]) -> np.ndarray:
        """One weight per source (in ``sources`` order), or one for all."""
        if not isinstance(value, Mapping):
            _check_weight(name, value)
            return np.array([value], np.float32)
        if self.sources is None:
            raise ValueError(f"{name} per source needs sources=[names in the prepared DIR's manifest order]")
        unknown = sorted(set(value) - set(self.sources))
        missing = [s for s in self.sources if s not in value]
        if unknown or missing:
            what = f"unknown source(s) {', '.join(unknown)}" if unknown else f"no value for source(s) {', '.join(missing)}"
            raise ValueError(f"{name}: {what} (sources: {', '.join(self.sources)})")
        for source, v in value.items():
            _check_weight(f"{name}[{source}]", v)
        return np.array([value[s] for s in self.sources], np.float32)

    def __repr__(self) -> str:
        return (
            f"PLWCollator(prompt_loss_weight={self.prompt_loss_weight}, template_weight={self.template_weight}, "
            f"completion_weight={self.completion_weight}, reasoning_weight={self.reasoning_weight})"
        )

    def __call__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Collate ``rows`` (a list of row dicts, or one dict of columns as ``dataset[i:j]`` gives)."""
        per_source = self._by_source
        cols = _columns(rows, self.return_example_ids)
        n_rows = len(cols[S.INPUT_IDS])
        if n_rows == 0:
            raise ValueError("PLWCollator got an empty batch")
        row_len = _lengths(cols[S.INPUT_IDS])
        if (row_len == 0).any():
            raise ValueError(f"row {int(np.argmin(row_len))}: field '{S.INPUT_IDS}' is empty")
        for field in _MASKS:
            _check_lengths(cols, field, row_len)

        ids = _concat(cols[S.INPUT_IDS], np.int64, S.INPUT_IDS)
        category = _category(cols, row_len)
        seq, n_ex = _segments(cols, row_len)

        width = int(row_len.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = width - row_len

        # Segments over the flattened [B*L] grid: each row's examples, then its padding (if any).
        pad_slot = np.cumsum(n_ex) + np.arange(n_rows)
        is_pad = np.zeros(len(seq) + n_rows, dtype=bool)
        is_pad[pad_slot] = True
        seg = np.empty(len(is_pad), dtype=np.int64)
        seg[pad_slot] = pad
        seg[~is_pad] = seq
        if (pad == 0).any():
            keep = seg > 0
            seg, is_pad = seg[keep], is_pad[keep]
        seg_start = np.cumsum(seg) - seg
        total = n_rows * width

        position = np.arange(total, dtype=np.int64) - np.repeat(seg_start, seg)
        grid_ids = _grid(ids, row_len, width, self.pad_token_id)
        source = _concat(cols[S.SOURCE_INDEX], np.int64, S.SOURCE_INDEX) if S.SOURCE_INDEX in cols else None
        if per_source and source is None:
            raise ValueError(f"a PLW per source needs rows with {S.SOURCE_INDEX!r} (a DIR prepared with --mix)")
        if source is not None:
            _check_lengths(cols, S.SOURCE_INDEX, n_ex)
        grid_cat = _grid(category, row_len, width, _PAD_CODE)
        if not per_source and S.MESSAGE_WEIGHT not in cols:
            weights = self._weight_table[0][grid_cat]  # the common case: one table lookup on the grid
        else:
            flat = self._weight_table[np.repeat(source, seq) if per_source else 0, category]
            if S.MESSAGE_WEIGHT in cols:
                flat = flat * _message_weights(cols[S.MESSAGE_WEIGHT], row_len)
            weights = _grid(flat.astype(np.float32, copy=False), row_len, width, 0)
        weights.reshape(-1)[seg_start] = 0.0
        labels = np.where(weights > 0, grid_ids, IGNORE_INDEX)
        real = np.arange(width) < row_len[:, None]

        batch: dict[str, Any] = PLWBatch({
            "input_ids": torch.from_numpy(grid_ids),
            "position_ids": torch.from_numpy(position.reshape(n_rows, width)),
            "labels": torch.from_numpy(labels),
            "loss_weights": torch.from_numpy(weights),
        })
        if self.return_attention_mask and (pad > 0).any():
            batch["attention_mask"] = torch.from_numpy(real.astype(np.int64))
        if self.emit_cu_seqlens:
            cu = np.concatenate(([0], np.cumsum(seg))).astype(np.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.from_numpy(cu)
            batch["max_length_q"] = batch["max_length_k"] = int(seg.max())
        if self.return_example_ids:
            grid_cat[~real] = PAD
            batch["category"] = torch.from_numpy(grid_cat)
            _check_lengths(cols, S.EXAMPLE_INDEX, n_ex)
            example = _concat(cols[S.EXAMPLE_INDEX], np.int64, S.EXAMPLE_INDEX)
            batch["example_id"] = torch.from_numpy(_grid(np.repeat(example, seq), row_len, width, -1))
            if source is not None:
                batch["source_id"] = torch.from_numpy(_grid(np.repeat(source, seq), row_len, width, -1))
        return batch


class PLWBatch(dict):
    """What :class:`PLWCollator` returns: a plain dict to every reader, except one.

    A stock ``transformers.Trainer`` / TRL ``SFTTrainer`` ``compute_loss`` runs ``model(**batch)``: the
    model ignores ``loss_weights`` and trains its own unweighted mean CE, and (``use_cache`` on) attends
    across packed examples, silently. Unpacking a dict subclass with its own ``__iter__`` goes through
    ``keys()``, which refuses when called from such a ``compute_loss`` (docs/hf.md).
    """

    __slots__ = ()

    def __iter__(self):
        return dict.__iter__(self)

    def keys(self):
        caller = sys._getframe(1)
        if caller.f_code.co_name == "compute_loss" and _stock_trainer(caller.f_locals.get("self")):
            raise TypeError(
                f"a PLWCollator batch reached {type(caller.f_locals['self']).__name__}.compute_loss, which would "
                "train the model's unweighted loss and ignore loss_weights: use plw_data.hf.PLWTrainer "
                "(or PLWSFTTrainer for TRL), see docs/hf.md"
            )
        return dict.keys(self)


def _stock_trainer(obj: Any) -> bool:
    """A transformers Trainer (TRL's included) whose loss is not the PLW loss of :mod:`plw_data.hf`."""
    mro = type(obj).__mro__
    return any(c.__name__ == "Trainer" and c.__module__ == "transformers.trainer" for c in mro) and not getattr(
        obj, "computes_plw_loss", False
    )


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments to give a transformers causal LM for ``batch``: no attention_mask, no cache."""
    kwargs = {key: batch[key] for key in _MODEL_KEYS if key in batch}
    kwargs["use_cache"] = False
    return kwargs


def _grid(flat: np.ndarray, row_len: np.ndarray, width: int, fill: int) -> np.ndarray:
    """[B, width] array of the concatenated rows ``flat``, right-padded with ``fill``."""
    if (row_len == width).all():
        return flat.reshape(len(row_len), width)
    out = np.full((len(row_len), width), fill, dtype=flat.dtype)
    start = 0
    for r, n in enumerate(row_len.tolist()):  # one slice copy per row, not per token
        out[r, :n] = flat[start : start + n]
        start += n
    return out


def _columns(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], with_examples: bool) -> dict[str, list]:
    """Column-wise view of the batch; a missing field is an error naming the row and field."""
    fields = (S.INPUT_IDS, *_MASKS, S.SEQ_LENGTHS) + ((S.EXAMPLE_INDEX,) if with_examples else ())
    if isinstance(rows, Mapping):
        missing = [f for f in fields if f not in rows]
        if missing:
            raise KeyError(f"batch has no field {missing[0]!r} (fields: {sorted(rows)})")
        return {f: list(rows[f]) for f in (*fields, *S.OPTIONAL_COLUMNS) if f in rows}
    cols: dict[str, list] = {}
    for field in S.OPTIONAL_COLUMNS:  # present in every row of a DIR that has it
        if rows and field in rows[0]:
            cols[field] = [row.get(field) for row in rows]
    for field in fields:
        try:
            cols[field] = [row[field] for row in rows]
        except KeyError:
            bad = next(i for i, row in enumerate(rows) if field not in row)
            hint = ""
            if not any(f in rows[bad] for f in _MASKS):
                hint = (
                    ": the PLW columns were removed before collation (transformers' Trainer does with "
                    "remove_unused_columns=True); train with plw_data.hf.PLWTrainer, see docs/hf.md"
                )
            raise KeyError(f"row {bad}: missing field {field!r} (fields: {sorted(rows[bad])}){hint}") from None
    return cols


def _lengths(seqs: list) -> np.ndarray:
    return np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))


def _check_lengths(cols: dict[str, list], field: str, expected: np.ndarray) -> None:
    got = _lengths(cols[field])
    bad = np.flatnonzero(got != expected)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"row {i}: field {field!r} has {got[i]} entries, expected {expected[i]}")


def _concat(seqs: list, dtype: type, field: str) -> np.ndarray:
    """Concatenate per-row sequences (lists, numpy arrays, tensors) into one flat array of ``dtype``.

    Lists (what ``datasets`` returns) take C-level paths: ``bytes()`` for 0/1 masks, ``np.fromiter``
    for ids; that is what keeps collation above 10M tokens/s.
    """
    if all(isinstance(s, list) for s in seqs):
        if dtype is np.uint8:
            try:
                return np.frombuffer(b"".join(map(bytes, seqs)), dtype=np.uint8)
            except (ValueError, TypeError):
                pass  # out-of-range values: fall through to the checked path below
        else:
            try:
                count = sum(map(len, seqs))
                return np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=count)
            except (ValueError, TypeError, OverflowError):
                pass
    parts = [np.asarray(s) for s in seqs]
    for i, part in enumerate(parts):
        if part.ndim != 1 or not (np.issubdtype(part.dtype, np.integer) or np.issubdtype(part.dtype, np.bool_)):
            raise ValueError(f"row {i}: field {field!r} must be a 1-D sequence of integers, got {part.dtype} {part.shape}")
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    info = np.iinfo(dtype)
    if len(flat) and (flat.min() < info.min or flat.max() > info.max):
        i = int(np.argmax((flat < info.min) | (flat > info.max)))
        row = int(np.searchsorted(np.cumsum([len(p) for p in parts]), i, side="right"))
        raise ValueError(f"row {row}: field {field!r} has value {flat[i]} outside {np.dtype(dtype).name}")
    return flat.astype(dtype, copy=False)


def _category(cols: dict[str, list], row_len: np.ndarray) -> np.ndarray:
    """Per-token category code (0 template, 1 prompt, 2 completion); exactly one mask must be set."""
    template, prompt, completion = (_concat(cols[f], np.uint8, f) for f in _MASKS)
    count = template.astype(np.int16) + prompt + completion
    bad = np.flatnonzero(count != 1)
    if len(bad):
        i = int(bad[0])
        row = int(np.searchsorted(np.cumsum(row_len), i, side="right"))
        token = i - int(row_len[:row].sum())
        values = {f: int(m[i]) for f, m in zip(_MASKS, (template, prompt, completion))}
        raise ValueError(
            f"row {row}, token {token}: fields {S.PROMPT_MASK}/{S.COMPLETION_MASK}/{S.TEMPLATE_MASK} must have exactly "
            f"one 1 per token, got {values}"
        )
    codes = (prompt * PROMPT + completion * COMPLETION).astype(np.int8)
    if S.REASONING_MASK in cols:
        reasoning = _concat(cols[S.REASONING_MASK], np.uint8, S.REASONING_MASK).astype(bool)
        if (reasoning & (completion == 0)).any():
            i = int(np.argmax(reasoning & (completion == 0)))
            row = int(np.searchsorted(np.cumsum(row_len), i, side="right"))
            raise ValueError(f"row {row}: field {S.REASONING_MASK!r} marks a token that is not completion")
        codes[reasoning] = REASONING
    return codes


def _message_weights(rows: list, row_len: np.ndarray) -> np.ndarray:
    """Per-token message weights; a None row (stored as null) means every weight is 1."""
    parts = [np.ones(n, np.float32) if w is None else np.asarray(w, np.float32) for w, n in zip(rows, row_len.tolist())]
    bad = [i for i, (p, n) in enumerate(zip(parts, row_len.tolist())) if p.shape != (n,)]
    if bad:
        raise ValueError(f"row {bad[0]}: field {S.MESSAGE_WEIGHT!r} has {parts[bad[0]].size} entries, expected {row_len[bad[0]]}")
    flat = np.concatenate(parts)
    if not np.isfinite(flat).all() or (flat < 0).any():
        raise ValueError(f"field {S.MESSAGE_WEIGHT!r} holds a weight that is negative or not finite")
    return flat


def _check_weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _segments(cols: dict[str, list], row_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat example lengths and examples per row; lengths must be positive and sum to the row length."""
    n_ex = _lengths(cols[S.SEQ_LENGTHS])
    seq = _concat(cols[S.SEQ_LENGTHS], np.int64, S.SEQ_LENGTHS)
    if (n_ex == 0).any():
        raise ValueError(f"row {int(np.argmin(n_ex))}: field '{S.SEQ_LENGTHS}' is empty")
    if (seq <= 0).any():
        i = int(np.argmax(seq <= 0))
        row = int(np.searchsorted(np.cumsum(n_ex), i, side="right"))
        raise ValueError(f"row {row}: field '{S.SEQ_LENGTHS}' has a non-positive length {seq[i]}")
    sums = np.add.reduceat(seq, np.cumsum(n_ex) - n_ex)
    bad = np.flatnonzero(sums != row_len)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"row {i}: field '{S.SEQ_LENGTHS}' sums to {sums[i]}, but '{S.INPUT_IDS}' has {row_len[i]} tokens"
        )
    return seq, n_ex
