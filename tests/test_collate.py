"""PLWCollator on real rows (RACE, Alpaca, SmolLM2 tokenizer) and a tiny random Llama.

The central property: an example packed with others in a row, and in a right-padded batch, gets
exactly the logits it gets alone, under eager and sdpa attention, when the model is called as the
collator documents (position_ids, use_cache=False, no attention_mask).
"""

from __future__ import annotations

import gzip
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import load_tokenizer, require_shared
from plw_data.batch.collate import COMPLETION, IGNORE_INDEX, PAD, PROMPT, TEMPLATE, PLWCollator, model_inputs
from plw_data.batch.loss import naive_weighted_ce_from_logits, weighted_ce_sum

torch.set_num_threads(1)
TOKENIZER = "smollm2-135m-instruct"


def _race_messages(n: int) -> list[list[dict]]:
    out = []
    with gzip.open(require_shared("race/train.jsonl.gz"), "rt") as f:
        for line in itertools.islice(f, n):
            r = json.loads(line)
            options = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", r["options"]))
            # the article is cut to keep the CPU model small; the rest of the row is as stored
            prompt = f"{r['article'][:400]}\n\n{r['question']}\n{options}"
            out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": r["answer"]}])
    return out


def _alpaca_messages(n: int) -> list[list[dict]]:
    rows = json.loads(require_shared("alpaca/alpaca_data_first5000.json").read_text())[:n]
    return [
        [
            {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}".strip()},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in rows
    ]


def _example(tok, messages: list[dict]) -> dict[str, list[int]]:
    """One example in the prepared schema; masks derived simply (the exact masks are prepare's job)."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    prefix = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[: len(prefix)] == prefix
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    newline = ids[-1]
    category = []
    in_header = False
    for i, t in enumerate(ids):
        if i >= len(prefix):
            category.append(COMPLETION if i < len(ids) - 1 else TEMPLATE)  # content + <|im_end|>; final "\n"
            continue
        after_end = i > 0 and ids[i - 1] == end
        in_header = t == start or (in_header and ids[i - 1] != newline)
        category.append(TEMPLATE if t in (start, end) or in_header or after_end else PROMPT)
    cat = np.array(category)
    return {
        "input_ids": ids,
        "template_mask": (cat == TEMPLATE).astype(int).tolist(),
        "prompt_mask": (cat == PROMPT).astype(int).tolist(),
        "completion_mask": (cat == COMPLETION).astype(int).tolist(),
    }


def _pack(examples: list[dict], indices: list[int]) -> dict[str, list[int]]:
    row = {k: sum((e[k] for e in examples), []) for k in ("input_ids", "prompt_mask", "completion_mask", "template_mask")}
    row["seq_lengths"] = [len(e["input_ids"]) for e in examples]
    row["example_index"] = indices
    return row


def _single(example: dict, index: int) -> dict:
    return _pack([example], [index])


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    tok = load_tokenizer(TOKENIZER)
    return [_example(tok, m) for m in _race_messages(2) + _alpaca_messages(4)]


@pytest.fixture(scope="module")
def rows(examples) -> list[dict]:
    """Row 0 packs 4 examples (RACE, Alpaca, RACE, Alpaca); row 1 packs 2 and is shorter (right padding)."""
    e = examples
    return [_pack([e[0], e[2], e[1], e[3]], [0, 2, 1, 3]), _pack([e[4], e[5]], [4, 5])]


def _tiny_llama(folder, attn: str):
    """conftest.py's tiny random Llama (SmolLM2 vocabulary) under the given attention implementation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request, tiny_model):
    return _tiny_llama(tiny_model, request.param)


def _alone_logits(model, example) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]


def _segments(rows):
    """(row, start, example) for every example of the batch."""
    for r, row in enumerate(rows):
        starts = np.cumsum([0] + row["seq_lengths"][:-1])
        yield from ((r, int(s), n) for s, n in zip(starts, row["seq_lengths"]))


def test_packed_padded_logits_equal_alone(model, rows, examples):
    # cu_seq_lens go to the model too (model_inputs): non-flash attention must ignore them
    batch = PLWCollator(0.1, emit_cu_seqlens=True)(rows)
    assert batch["input_ids"].shape[0] == 2
    assert len(rows[1]["input_ids"]) < batch["input_ids"].shape[1], "row 1 must be padded"
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    by_index = dict(zip(range(6), examples))
    seen = 0
    for (r, start, n), index in zip(_segments(rows), rows[0]["example_index"] + rows[1]["example_index"]):
        alone = _alone_logits(model, by_index[index])
        assert alone.shape[0] == n
        diff = (logits[r, start : start + n] - alone).abs().max().item()
        assert diff <= 1e-5, f"example {index}: packed logits differ from alone by {diff}"
        seen += 1
    assert seen == 6


def test_packed_weighted_loss_equals_per_example(rows, examples, tiny_model):
    model = _tiny_llama(tiny_model, "sdpa")
    collate = PLWCollator(0.1, template_weight=0.05)
    batch = collate(rows)
    with torch.no_grad():
        hidden = model.model(**model_inputs(batch)).last_hidden_state
        packed = weighted_ce_sum(hidden, model.lm_head.weight, batch["labels"], batch["loss_weights"], chunk_size=97)
        logits = model(**model_inputs(batch)).logits
        naive = naive_weighted_ce_from_logits(logits[:, :-1], batch["labels"], batch["loss_weights"])
        per_example = []
        for i, e in enumerate(examples):
            single = collate([_single(e, i)])
            h = model.model(**model_inputs(single)).last_hidden_state
            per_example.append(weighted_ce_sum(h, model.lm_head.weight, single["labels"], single["loss_weights"]))
    torch.testing.assert_close(packed, naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed, torch.stack(per_example).sum(), atol=1e-4, rtol=1e-5)
    # Σw is also additive: the trainer's normaliser is the same packed or not
    total_w = sum(collate([_single(e, i)])["loss_weights"].sum() for i, e in enumerate(examples))
    torch.testing.assert_close(batch["loss_weights"].sum(), total_w)


def test_default_use_cache_leaks_across_packed_examples(rows, examples, tiny_model):
    """Why use_cache=False: with the default cache, packed-sequence detection is skipped."""
    model = _tiny_llama(tiny_model, "sdpa")
    assert model.config.use_cache
    batch = PLWCollator(0.1)(rows)
    second = _alone_logits(model, examples[2])  # row 0's second example
    r, start, n = list(_segments(rows))[1]
    with torch.no_grad():
        isolated = model(**model_inputs(batch)).logits[r, start : start + n]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[r, start : start + n]
        masked = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            use_cache=False,
        ).logits[r, start : start + n]
    assert (isolated - second).abs().max() <= 1e-5
    assert (cached - second).abs().max() > 1e-3, "use_cache=True no longer leaks: update the collate docstring"
    assert (masked - second).abs().max() > 1e-3, "attention_mask no longer disables packing: update the docstring"


def test_positions_labels_and_weights(rows, examples):
    for plw, template in [(0.0, None), (0.1, None), (1.0, None), (0.1, 0.5), (0.0, 1.0)]:
        collate = PLWCollator(plw, template_weight=template, return_example_ids=True)
        batch = collate(rows)
        expected_template = plw if template is None else template
        for r, start, n in _segments(rows):
            pos = batch["position_ids"][r, start : start + n]
            assert torch.equal(pos, torch.arange(n))
            lab = batch["labels"][r, start : start + n]
            w = batch["loss_weights"][r, start : start + n]
            cat = batch["category"][r, start : start + n]
            ids = batch["input_ids"][r, start : start + n]
            assert lab[0] == IGNORE_INDEX and w[0] == 0
            table = torch.tensor([expected_template, plw, 1.0])
            assert torch.equal(w[1:], table[cat[1:].long()])
            assert torch.equal(lab[1:], torch.where(w[1:] > 0, ids[1:], IGNORE_INDEX))
        real = batch["category"] != PAD
        assert batch["loss_weights"].dtype == torch.float32
        assert not batch["loss_weights"][~real].any() and (batch["labels"][~real] == IGNORE_INDEX).all()
        assert (batch["input_ids"][~real] == 0).all()
    # PLW=0 on real chat rows: only completion tokens (the answer letters, Alpaca outputs) are targets
    batch = PLWCollator(0.0, return_example_ids=True)(rows)
    targets = batch["labels"] != IGNORE_INDEX
    assert torch.equal(targets, (batch["category"] == COMPLETION) & (batch["position_ids"] > 0))


def test_padding_positions_restart_and_attention_mask_flag(rows):
    batch = PLWCollator(0.1, pad_to_multiple_of=64, return_attention_mask=True, return_example_ids=True)(rows)
    width = batch["input_ids"].shape[1]
    assert width % 64 == 0 and width >= len(rows[0]["input_ids"])
    for r, row in enumerate(rows):
        n, pad = len(row["input_ids"]), width - len(row["input_ids"])
        assert torch.equal(batch["position_ids"][r, n:], torch.arange(pad))
        assert torch.equal(batch["attention_mask"][r], (torch.arange(width) < n).long())
    assert "attention_mask" not in PLWCollator(0.1, return_attention_mask=True)([rows[0]])


def test_cu_seq_lens_match_transformers_flash_kwargs(rows):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = PLWCollator(0.1, emit_cu_seqlens=True, pad_to_multiple_of=8)(rows)
    width = batch["input_ids"].shape[1]
    segments = [n for row in rows for n in row["seq_lengths"] + [width - len(row["input_ids"])] if n]
    expected = torch.tensor(np.concatenate([[0], np.cumsum(segments)]), dtype=torch.int32)
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert torch.equal(batch["cu_seq_lens_q"], expected) and torch.equal(batch["cu_seq_lens_k"], expected)
    assert batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    assert batch["max_length_q"] == batch["max_length_k"] == max(segments)
    # what transformers infers from our position_ids over the flattened batch is the same
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(cu_q, expected) and int(max_q) == max(segments)


def test_example_ids_and_category(rows):
    batch = PLWCollator(0.1, return_example_ids=True)(rows)
    for (r, start, n), index in zip(_segments(rows), rows[0]["example_index"] + rows[1]["example_index"]):
        assert (batch["example_id"][r, start : start + n] == index).all()
    real = batch["category"] != PAD
    assert (batch["example_id"][~real] == -1).all()
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        cat = np.array(row["prompt_mask"]) * PROMPT + np.array(row["completion_mask"]) * COMPLETION
        assert torch.equal(batch["category"][r, :n], torch.from_numpy(cat.astype(np.int8)))
    assert batch["category"].dtype == torch.int8 and batch["example_id"].dtype == torch.int64


def test_matches_data_collator_with_flattening(examples):
    """With every weight 1, labels and positions equal transformers' flattening collator's."""
    from transformers import DataCollatorWithFlattening

    ref = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": e["input_ids"]} for e in examples])
    ours = PLWCollator(1.0, emit_cu_seqlens=True)([_pack(examples, list(range(len(examples))))])
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(ours[key], ref[key]), key
    assert torch.equal(ours["cu_seq_lens_q"], ref["cu_seq_lens_q"])
    assert ours["max_length_q"] == ref["max_length_q"]


def test_prepared_split_numpy_and_column_inputs(rows, tmp_path):
    """Rows straight from datasets.load_from_disk (lists), numpy-formatted rows and dataset[i:j] agree."""
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "train"))
    split = datasets.load_from_disk(str(tmp_path / "train"))
    collate = PLWCollator(0.1, emit_cu_seqlens=True, return_example_ids=True)
    ref = collate(rows)
    for batch in (
        collate([split[i] for i in range(len(split))]),
        collate([split.with_format("numpy")[i] for i in range(len(split))]),
        collate(split[0:2]),
    ):
        assert batch.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(batch[key], value) if torch.is_tensor(value) else batch[key] == value, key


def _row(**over):
    row = {
        "input_ids": [5, 6, 7, 8],
        "prompt_mask": [1, 1, 0, 0],
        "completion_mask": [0, 0, 1, 1],
        "template_mask": [0, 0, 0, 0],
        "seq_lengths": [4],
        "example_index": [0],
    }
    row.update(over)
    return row


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (_row(prompt_mask=[1, 1, 1, 0]), r"row 1, token 2: .*exactly one"),
        (_row(template_mask=[0, 0, 0, 1]), r"row 1, token 3: .*exactly one"),
        (_row(completion_mask=[0, 0, 1]), r"row 1: field 'completion_mask' has 3 entries, expected 4"),
        (_row(seq_lengths=[2, 1]), r"row 1: field 'seq_lengths' sums to 3"),
        (_row(seq_lengths=[4, 0]), r"row 1: field 'seq_lengths' has a non-positive length"),
        (_row(input_ids=[], prompt_mask=[], completion_mask=[], template_mask=[]), r"row 1: field 'input_ids' is empty"),
    ],
)
def test_bad_rows_name_row_and_field(row, message):
    with pytest.raises(ValueError, match=message):
        PLWCollator(0.1)([_row(), row])


def test_missing_field_and_bad_options():
    row = _row()
    del row["seq_lengths"]
    with pytest.raises(KeyError, match="row 1: missing field 'seq_lengths'"):
        PLWCollator()([_row(), row])
    with pytest.raises(ValueError, match="row 0: field 'example_index' has 2 entries, expected 1"):
        PLWCollator(return_example_ids=True)([_row(example_index=[0, 1])])
    with pytest.raises(ValueError, match="prompt_loss_weight"):
        PLWCollator(-0.1)
    with pytest.raises(ValueError, match="template_weight"):
        PLWCollator(0.1, template_weight=float("nan"))
    with pytest.raises(ValueError, match="empty batch"):
        PLWCollator()([])
