"""The prompt-loss-weighted cross-entropy, from final hidden states, without full logits.

Shift convention (as transformers): ``labels`` and ``loss_weights`` are aligned with ``input_ids``
(see :class:`plw_data.batch.collate.PLWCollator`); the hidden state at position t predicts ``labels[t+1]``
with weight ``loss_weights[t+1]``. So ``hidden[:, :-1]`` pairs with ``labels[:, 1:]`` and position 0
is never a target. A target counts when its label is not -100 and its weight is not 0.

:func:`weighted_ce_sum` returns the weighted **sum** Σ_t w_t·CE_t, not a mean: the trainer divides by
the global Σw over its accumulation window and all ranks, so that every token weighs the same
whatever micro-batch or rank it lands on.

Memory: the loss is a fused autograd function. Its forward walks the target tokens in chunks,
computes each chunk's logits, log-sum-exp (fp32), loss and, right away, the chunk's gradients
w.r.t. the hidden states, the lm_head weight and bias; backward only scales those stored gradients by
``grad_output``. Full ``[tokens, vocab]`` logits never exist: the peak extra memory is one chunk's
logits (``chunk_size * vocab`` fp32 values, plus their bf16 originals for bf16 inputs), gradients the
size of the inputs, and an fp32 accumulator for the lm_head gradient when the weight is trained.
Only tokens that are targets are computed, so PLW=0 skips the prompt's vocabulary projection.

Notes for the trainer:

- Call it with the model's final hidden states (``model.model(...)`` output, i.e. after the last
  norm) and ``model.get_output_embeddings().weight``. Tied embeddings (SmolLM2) work: the gradient
  flows into the shared parameter and autograd adds it to the embedding's own gradient.
- A frozen lm_head (LoRA) gets no gradient and costs no gradient work.
- DeepSpeed ZeRO-3 partitions the lm_head weight: gather it around the call, e.g.
  ``with deepspeed.zero.GatheredParameters([weight]): loss = weighted_ce_sum(h, weight, ...)``
  (``modifier_rank=None``; its gradient is then reduced by DeepSpeed as usual).
- Models that scale or soft-cap their final logits (e.g. Gemma 2, Cohere, Granite) are not covered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..schema import IGNORE_INDEX

#: The automatic chunk holds at most this many logits (128 MiB in fp32).
CHUNK_ELEMENTS = 1 << 25


def weighted_ce_sum(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    loss_weights: Tensor,
    *,
    chunk_size: int | None = None,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """Σ_t w_t · CE(logits_t, labels[t+1]) with logits_t = hidden_t @ W.T (+ b); fp32 scalar.

    Args:
        hidden: [B, L, H] final hidden states (any float dtype; log-sum-exp runs in fp32 per chunk).
        lm_head_weight: [V, H].
        labels: [B, L] aligned with input_ids; -100 = no target.
        loss_weights: [B, L] aligned with input_ids (weight of predicting that token).
        chunk_size: target tokens per chunk; ``None`` keeps one chunk's logits under ``CHUNK_ELEMENTS``.
        lm_head_bias: optional [V].

    Backward may run once per call (the stored gradients are scaled in place): no ``retain_graph``.
    """
    _check_shapes(hidden, lm_head_weight, labels, loss_weights, lm_head_bias)
    chunk = _chunk(chunk_size, lm_head_weight.shape[0])
    grad = torch.is_grad_enabled()  # needs_input_grad ignores no_grad(): skip the gradient work there
    return _WeightedCE.apply(hidden, lm_head_weight, lm_head_bias, labels, loss_weights, chunk, grad)


def naive_weighted_ce_sum(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    loss_weights: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """Reference for :func:`weighted_ce_sum` with full logits and plain autograd (tests, benchmarks)."""
    _check_shapes(hidden, lm_head_weight, labels, loss_weights, lm_head_bias)
    logits = F.linear(hidden[:, :-1], lm_head_weight, lm_head_bias).float()
    return naive_weighted_ce_from_logits(logits, labels, loss_weights)


def naive_weighted_ce_from_logits(shifted_logits: Tensor, labels: Tensor, loss_weights: Tensor) -> Tensor:
    """Σ w·CE from logits of positions ``0..L-2`` (``model(...).logits[:, :-1]``), fp32."""
    targets, weights = labels[:, 1:], loss_weights[:, 1:].float()
    ce = F.cross_entropy(
        shifted_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return (ce * weights.flatten() * (targets.flatten() != IGNORE_INDEX)).sum()


@torch.no_grad()
def token_ce_and_argmax(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    lm_head_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token CE and argmax correctness for eval, chunked (no full logits), aligned with ``labels``.

    Position t holds the CE of predicting ``labels[t]`` from ``hidden[t-1]`` (fp32) and whether the
    argmax equals it. Position 0 and labels == -100 get ``ce = 0`` and ``correct = False``.
    For per-category eval losses every predicted token needs a label: build the eval batches with
    ``PLWCollator(prompt_loss_weight=1.0)`` (all weights > 0) and select categories with its
    ``category`` tensor.
    """
    _check_shapes(hidden, lm_head_weight, labels, None, lm_head_bias)
    chunk = _chunk(chunk_size, lm_head_weight.shape[0])
    ce = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    correct = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    target_pos = _target_positions(labels, None)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    _check_targets(flat_labels[target_pos], lm_head_weight.shape[0])
    for start in range(0, len(target_pos), chunk):
        pos = target_pos[start : start + chunk]
        logits = _logits(flat_hidden.index_select(0, pos - 1), lm_head_weight, lm_head_bias)
        target = flat_labels[pos]
        correct.view(-1)[pos] = logits.argmax(dim=-1) == target
        ce.view(-1)[pos] = _ce_exp_(logits.float(), target[:, None])[0]
        del logits  # before the next chunk allocates
    return ce, correct


class _WeightedCE(torch.autograd.Function):
    """Loss and all gradients in one chunked forward; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, loss_weights, chunk, grad_enabled):  # type: ignore[override]
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        target_pos = _target_positions(labels, loss_weights)
        target_weight = loss_weights.reshape(-1)[target_pos].float()
        _check_targets(flat_labels[target_pos], weight.shape[0])

        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(flat_hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, len(target_pos), chunk):
            # One call per chunk: its logits are freed on return, before the next chunk allocates.
            total += _chunk_loss_and_grads(
                flat_hidden,
                weight,
                bias,
                target_pos[start : start + chunk],
                flat_labels,
                target_weight[start : start + chunk],
                grad_h,
                grad_w,
                grad_b,
            )
        # Kept on ctx, not save_for_backward: backward scales them in place and drops them, so no second
        # copy of the lm_head gradient exists; a second backward through the same graph raises.
        ctx.grads = (
            grad_h.view(hidden.shape) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if not hasattr(ctx, "grads"):
            raise RuntimeError("weighted_ce_sum: backward can run only once per forward (no retain_graph)")
        grads, scale = ctx.grads, float(grad_output)  # a Python scalar multiplies in fp32 for bf16 grads too
        del ctx.grads
        return (*(None if g is None else g.mul_(scale) for g in grads), None, None, None, None)


def _chunk_loss_and_grads(
    flat_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos: Tensor,
    flat_labels: Tensor,
    w: Tensor,
    grad_h: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> Tensor:
    """Σ w·CE over the targets at flat positions ``pos``; adds this chunk's gradients into ``grad_*`` (if given)."""
    h = flat_hidden.index_select(0, pos - 1)
    target = flat_labels[pos][:, None]
    logits = _logits(h, weight, bias)
    dtype = logits.dtype
    probs = logits.float()  # a fresh fp32 buffer for low-precision logits; the logits themselves for fp32
    del logits  # only one chunk-sized buffer stays alive below, plus its low-precision copy at the end
    ce, norm = _ce_exp_(probs, target)
    loss = (w * ce).sum()
    if grad_h is None and grad_w is None and grad_b is None:
        return loss
    # d CE / d logits = softmax - onehot, times the token weight; computed in place.
    probs.div_(norm).scatter_add_(1, target, probs.new_full(target.shape, -1.0)).mul_(w[:, None])
    grad_logits = probs.to(dtype)
    del probs
    if grad_h is not None:
        grad_h.index_copy_(0, pos - 1, (grad_logits @ weight.to(grad_logits.dtype)).to(grad_h.dtype))
    if grad_w is not None:  # accumulate in place (addmm_) when the dtypes allow: no [V, H] temporary
        if grad_w.dtype == grad_logits.dtype:
            grad_w.addmm_(grad_logits.T, h.to(grad_logits.dtype))
        else:
            grad_w += grad_logits.T @ h.to(grad_logits.dtype)
    if grad_b is not None:
        grad_b += grad_logits.sum(0, dtype=torch.float32)
    return loss


def _ce_exp_(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row CE of fp32 ``logits`` [n, V] for ``target`` [n, 1]; overwrites ``logits`` with exp(logits - max).

    Returns (ce [n], norm [n, 1]) with softmax = logits / norm afterwards. Done in place because
    ``torch.logsumexp`` allocates a second chunk-sized buffer.
    """
    target_logit = logits.gather(1, target)
    peak = logits.amax(dim=1, keepdim=True)
    norm = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
    return (peak + norm.log() - target_logit).squeeze(1), norm


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Chunk logits in the promoted dtype of hidden and weight (a mixed bf16/fp32 pair computes in fp32)."""
    dtype = torch.promote_types(h.dtype, weight.dtype)
    return F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def _target_positions(labels: Tensor, loss_weights: Tensor | None) -> Tensor:
    """Flat positions t >= 1 of each row whose label is a target (and whose weight is non-zero)."""
    valid = labels != IGNORE_INDEX
    if loss_weights is not None:
        valid &= loss_weights != 0
    valid[:, 0] = False
    return valid.reshape(-1).nonzero().squeeze(1)


def _chunk(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _check_targets(targets: Tensor, vocab: int) -> None:
    if len(targets) and (targets.min() < 0 or targets.max() >= vocab):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"labels hold token id {bad}, outside the lm_head vocabulary of {vocab}")


def _check_shapes(
    hidden: Tensor, weight: Tensor, labels: Tensor, loss_weights: Tensor | None, bias: Tensor | None
) -> None:
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden must be [B, L, H] and labels [B, L]; got {tuple(hidden.shape)}, {tuple(labels.shape)}")
    if loss_weights is not None and loss_weights.shape != labels.shape:
        raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must match labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"lm_head_bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
