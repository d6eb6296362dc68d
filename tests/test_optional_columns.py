"""Optional columns (reasoning_mask, message_weight, source_index): staged, written, verified, collated.

The examples are real: SmolLM2 renders of GSM8K questions whose answer (chain of thought, then
"#### n") is split into reasoning and answer tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_tokenizer, require_shared

from plw_data import schema as S
from plw_data.batch.collate import PLWCollator
from plw_data.errors import PLWError
from plw_data.prepare.encoded import EncodedBatch
from plw_data.prepare.pack import plan_packing
from plw_data.prepare.shards import Stage, write_split
from plw_data.prepare.verify_rows import check_split

T, P, C, R = S.TEMPLATE, S.PROMPT, S.COMPLETION, S.REASONING


def _examples(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, staged categories) of n GSM8K rows: template, question (prompt), reasoning, answer."""
    tok = load_tokenizer("smollm2-135m-instruct")
    out = []
    with open(require_shared("gsm8k/train.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            reasoning, _, answer = row["answer"].rpartition("####")
            pieces = [("<|im_start|>user\n", T), (row["question"], P), ("<|im_end|>\n<|im_start|>assistant\n", T),
                      (reasoning, R), ("####" + answer, C), ("<|im_end|>", C)]
            ids, cats = [], []
            for text, cat in pieces:
                piece = tok(text, add_special_tokens=False)["input_ids"]
                ids += piece
                cats += [cat] * len(piece)
            out.append((np.array(ids, np.int32), np.array(cats, np.uint8)))
            if len(out) == n:
                return out
    return out


def _batch(examples, start: int, *, weights: list[float] | None = None, sources: list[int] | None = None) -> EncodedBatch:
    lengths = np.array([len(i) for i, _ in examples], np.int64)
    w = None
    if weights is not None:  # one weight per example, on its non-template tokens
        w = np.concatenate([np.where(c == T, 1.0, wt).astype(np.float32) for (_, c), wt in zip(examples, weights)])
    return EncodedBatch(
        np.arange(start, start + len(examples), dtype=np.int64), lengths,
        np.concatenate([i for i, _ in examples]), np.concatenate([c for _, c in examples]),
        weight=w, source=None if sources is None else np.array(sources, np.int16),
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A split whose first batch has no message weights and whose second has: the stage backfills 1."""
    examples = _examples(24)
    stage = Stage(tmp_path_factory.mktemp("stage"))
    stage.append(_batch(examples[:12], 0, sources=[0, 1] * 6))
    weights = [0.5, 1.0, 2.0, 0.0] * 3
    stage.append(_batch(examples[12:], 12, weights=weights, sources=[1, 0] * 6))
    staged = stage.close()
    optional = staged.optional_columns()
    assert optional == (S.REASONING_MASK, S.MESSAGE_WEIGHT, S.SOURCE_INDEX)
    folder = tmp_path_factory.mktemp("split") / "train"
    plan = plan_packing(staged.lengths, 1024, seed=0)
    entry = write_split(folder, staged, np.arange(24), plan, max_length=1024, packed=True, shard_tokens=10**9,
                        optional=optional)
    expected = {}  # example index -> (ids, staged categories, per-token message weight, source)
    all_w = [1.0] * 12 + weights
    all_s = [0, 1] * 6 + [1, 0] * 6
    for k, (ids, cats) in enumerate(examples):
        expected[k] = (ids, cats, np.where(cats == T, 1.0, all_w[k]).astype(np.float32), all_s[k])
    return folder, entry, expected


def test_written_split_verifies_and_loads(written):
    import datasets

    folder, entry, expected = written
    total_r = sum(int((c == R).sum()) for _, c, _, _ in expected.values())
    assert entry["reasoning_tokens"] == total_r and total_r > 0
    assert entry["completion_tokens"] == sum(int(((c == C) | (c == R)).sum()) for _, c, _, _ in expected.values())
    index = check_split(folder, entry, vocab_size=49152, n_sources=2)
    assert sorted(index.tolist()) == list(range(24))
    with pytest.raises(PLWError, match="source 1 is not one of the manifest's 1 sources"):
        check_split(folder, entry, vocab_size=49152, n_sources=1)
    ds = datasets.load_from_disk(str(folder))
    assert ds.column_names == [*S.SCHEMA.names, S.REASONING_MASK, S.MESSAGE_WEIGHT, S.SOURCE_INDEX]
    for row in ds:  # every example's tokens, masks, weights and source come back as staged
        start = 0
        for length, ex, src in zip(row[S.SEQ_LENGTHS], row[S.EXAMPLE_INDEX], row[S.SOURCE_INDEX]):
            ids, cats, w, source = expected[ex]
            sl = slice(start, start + length)
            assert row[S.INPUT_IDS][sl] == ids.tolist() and src == source
            assert row[S.REASONING_MASK][sl] == (cats == R).astype(int).tolist()
            assert row[S.COMPLETION_MASK][sl] == ((cats == C) | (cats == R)).astype(int).tolist()
            got_w = [1.0] * length if row[S.MESSAGE_WEIGHT] is None else row[S.MESSAGE_WEIGHT][sl]
            assert np.allclose(got_w, w)
            start += length


def test_collated_weights_are_per_source_plw_times_reasoning_and_message_weight(written):
    import datasets

    folder, _, expected = written
    rows = list(datasets.load_from_disk(str(folder)))
    plw = {"race": 0.01, "alpaca": 0.5}
    collate = PLWCollator(prompt_loss_weight=plw, template_weight=0.2, reasoning_weight=0.3, sources=["race", "alpaca"],
                          return_example_ids=True)
    batch = collate(rows)
    for r, row in enumerate(rows):
        start = 0
        for length, ex in zip(row[S.SEQ_LENGTHS], row[S.EXAMPLE_INDEX]):
            _, cats, w, source = expected[ex]
            base = np.select([cats == T, cats == P, cats == C, cats == R],
                             [0.2, [0.01, 0.5][source], 1.0, 0.3], 0.0).astype(np.float32) * w
            base[0] = 0.0  # the first token of an example is never a target
            got = batch["loss_weights"][r, start : start + length].numpy()
            assert np.allclose(got, base), (ex, source)
            assert (batch["source_id"][r, start : start + length] == source).all()
            start += length
    assert (batch["category"] == R).sum() == sum(int((c == R).sum()) for _, c, _, _ in expected.values())


def test_reasoning_weight_zero_is_answer_only_and_one_is_the_old_completion_loss(written):
    import datasets

    from plw_data.batch.loss import weighted_ce_sum

    folder, _, _ = written
    rows = list(datasets.load_from_disk(str(folder)))
    plain = [{k: v for k, v in row.items() if k in S.COLUMNS} for row in rows]  # an old DIR's rows
    torch.manual_seed(0)
    width = max(len(r[S.INPUT_IDS]) for r in rows)
    hidden, head = torch.randn(len(rows), width, 16), torch.randn(49152, 16)

    def loss(collate, data):
        b = collate(data)
        return weighted_ce_sum(hidden[:, : b["labels"].shape[1]], head, b["labels"], b["loss_weights"]) / b["loss_weights"][:, 1:].sum()

    one = loss(PLWCollator(0.1, reasoning_weight=1.0), [{**r, S.MESSAGE_WEIGHT: None} for r in rows])
    assert torch.allclose(one, loss(PLWCollator(0.1), plain))
    zero = PLWCollator(0.1, reasoning_weight=0.0)(rows)
    reasoning = torch.tensor([[*r[S.REASONING_MASK], *[0] * (width - len(r[S.INPUT_IDS]))] for r in rows]).bool()
    assert (zero["loss_weights"][reasoning] == 0).all() and (zero["labels"][reasoning] == S.IGNORE_INDEX).all()


def test_per_source_plw_needs_sources():
    with pytest.raises(ValueError, match="needs sources"):
        PLWCollator({"race": 0.1})
    with pytest.raises(ValueError, match="unknown source"):
        PLWCollator({"race": 0.1, "nope": 1.0}, sources=["race"])
    with pytest.raises(ValueError, match=S.SOURCE_INDEX):
        PLWCollator({"race": 0.1}, sources=["race"])([{S.INPUT_IDS: [1, 2], S.PROMPT_MASK: [1, 0], S.COMPLETION_MASK: [0, 1],
                                                      S.TEMPLATE_MASK: [0, 0], S.SEQ_LENGTHS: [2]}])
