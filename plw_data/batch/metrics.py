"""Eval metrics (docs/training.md) from per-token CE and argmax correctness, by on-device reductions.

Each eval batch contributes a small vector of sums (:func:`eval_sums`); the trainer adds the vectors
over batches, all-reduces them over ranks and turns them into metrics (:func:`metrics_from_sums`).
Logits are never gathered: :func:`plw_data.batch.loss.token_ce_and_argmax` gives [B, L] CE/correct, and
everything here is masks, sums and one scatter-add per example.

Reasoning tokens (category REASONING) count as completion everywhere, and also alone in
``eval_reasoning_loss``, reported only when the eval data has any.

Targets are the tokens whose label is not -100: every token but the first of each example and the
padding, when the batch comes from ``PLWCollator(prompt_loss_weight=1.0, template_weight=1.0,
return_example_ids=True)``. A target's category is that of the predicted token.

Answer accuracy: an example counts as correct when all its completion targets are argmax-correct,
leaving out its last completion token when that token is a closing special token (end-of-turn/EOS,
``closing_ids``). Examples with no scored completion token are left out of the fraction.
Metrics with no tokens to average over are ``None``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schema import COMPLETION, IGNORE_INDEX, PROMPT, REASONING, TEMPLATE
# Layout of the sums vector.
CE = {TEMPLATE: 0, PROMPT: 1, COMPLETION: 2}
COUNT = {TEMPLATE: 3, PROMPT: 4, COMPLETION: 5}
CORRECT_COMPLETION, ANSWER_CORRECT, ANSWER_TOTAL = 6, 7, 8
CE_REASONING, COUNT_REASONING = 9, 10  # reasoning tokens are also counted as completion
N_SUMS = 11


@torch.no_grad()
def eval_sums(
    ce: Tensor,
    correct: Tensor,
    labels: Tensor,
    category: Tensor,
    example_id: Tensor,
    input_ids: Tensor,
    closing_ids: Tensor,
) -> Tensor:
    """The [N_SUMS] float64 sums of one batch; all inputs [B, L] on one device, ``closing_ids`` 1-D."""
    target = (labels != IGNORE_INDEX).flatten()
    cat = category.flatten().long()
    ce = ce.flatten().double()
    correct = correct.flatten()
    sums = torch.zeros(N_SUMS, dtype=torch.float64, device=ce.device)
    reasoning = target & (cat == REASONING)
    for code in (TEMPLATE, PROMPT, COMPLETION):
        sel = target & (cat == code)
        if code == COMPLETION:
            sel = sel | reasoning
        sums[CE[code]] = (ce * sel).sum()
        sums[COUNT[code]] = sel.sum()
    sums[CE_REASONING], sums[COUNT_REASONING] = (ce * reasoning).sum(), reasoning.sum()
    completion = target & ((cat == COMPLETION) | reasoning)
    sums[CORRECT_COMPLETION] = (correct & completion).sum()
    n_correct, n_total = _answer_counts(completion, correct, example_id.flatten(), input_ids.flatten(), closing_ids)
    sums[ANSWER_CORRECT], sums[ANSWER_TOTAL] = n_correct, n_total
    return sums


def _answer_counts(
    completion: Tensor, correct: Tensor, example_id: Tensor, input_ids: Tensor, closing_ids: Tensor
) -> tuple[Tensor, Tensor]:
    """(examples with all scored completion tokens correct, examples with any scored token)."""
    pos = completion.nonzero().squeeze(1)
    if pos.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=completion.device)
        return zero, zero
    ids, inverse = torch.unique(example_id[pos], return_inverse=True)
    last = torch.full((len(ids),), -1, dtype=torch.long, device=pos.device)
    last = last.scatter_reduce(0, inverse, pos, reduce="amax")
    closing = torch.isin(input_ids[last], closing_ids.to(input_ids.device))
    scored = torch.ones_like(pos, dtype=torch.bool)
    scored[torch.isin(pos, last[closing])] = False
    n_scored = torch.zeros(len(ids), dtype=torch.long, device=pos.device).scatter_add_(0, inverse, scored.long())
    n_wrong = torch.zeros_like(n_scored).scatter_add_(0, inverse, (scored & ~correct[pos]).long())
    has = n_scored > 0
    return (has & (n_wrong == 0)).sum().double(), has.sum().double()


def metrics_from_sums(sums: Tensor) -> dict[str, float | None]:
    """The eval metrics of docs/training.md from summed (and all-reduced) :func:`eval_sums` vectors."""
    s = sums.double().cpu().tolist()

    def ratio(num: float, den: float) -> float | None:
        return num / den if den > 0 else None

    ce_all = sum(s[CE[c]] for c in CE)
    n_all = sum(s[COUNT[c]] for c in COUNT)
    metrics = {
        "eval_prompt_loss": ratio(s[CE[PROMPT]], s[COUNT[PROMPT]]),
        "eval_completion_loss": ratio(s[CE[COMPLETION]], s[COUNT[COMPLETION]]),
        "eval_template_loss": ratio(s[CE[TEMPLATE]], s[COUNT[TEMPLATE]]),
        "eval_full_loss": ratio(ce_all, n_all),
        "eval_token_accuracy": ratio(s[CORRECT_COMPLETION], s[COUNT[COMPLETION]]),
        "eval_answer_accuracy": ratio(s[ANSWER_CORRECT], s[ANSWER_TOTAL]),
        "eval_tokens": int(n_all),
        "eval_examples": int(s[ANSWER_TOTAL]),
    }
    if s[COUNT_REASONING] > 0:  # only data with reasoning tokens reports it
        metrics["eval_reasoning_loss"] = ratio(s[CE_REASONING], s[COUNT_REASONING])
    return metrics


# -- per source of a mixture (docs/mixtures.md) -----------------------------------------------------


def source_of_tokens(example_id: Tensor, bounds: Tensor) -> Tensor:
    """[B, L] source position of each token from its example_index and the sources' index bounds
    (``plw_data.prepare.mixture.source_ranges``); padding (example_id -1) gets -1."""
    source = torch.searchsorted(bounds.to(example_id.device), example_id.contiguous(), right=True) - 1
    return torch.where(example_id < 0, torch.full_like(source, -1), source)


@torch.no_grad()
def eval_sums_by_source(
    ce: Tensor,
    correct: Tensor,
    labels: Tensor,
    category: Tensor,
    example_id: Tensor,
    input_ids: Tensor,
    closing_ids: Tensor,
    source: Tensor,
    n_sources: int,
) -> Tensor:
    """[n_sources, N_SUMS]: :func:`eval_sums` over each source's tokens alone (``source`` [B, L])."""
    rows = []
    for k in range(n_sources):
        mine = torch.where(source == k, labels, torch.full_like(labels, IGNORE_INDEX))
        rows.append(eval_sums(ce, correct, mine, category, example_id, input_ids, closing_ids))
    return torch.stack(rows)


def metrics_by_source(sums: Tensor, names: list[str]) -> dict[str, float | None]:
    """``eval_completion_loss/race``, ...: the eval metrics of each source, from its row of sums."""
    out: dict[str, float | None] = {}
    for name, row in zip(names, sums):
        out.update({f"{key}/{name}": value for key, value in metrics_from_sums(row).items()})
    return out
