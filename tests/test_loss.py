"""The chunked fused PLW loss equals the full-logits computation, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama_config
from plw_data.batch.loss import (
    IGNORE_INDEX,
    naive_weighted_ce_from_logits,
    naive_weighted_ce_sum,
    token_ce_and_argmax,
    weighted_ce_sum,
)

torch.set_num_threads(1)

B, L, H, V = 3, 37, 24, 101  # 3 * 36 = 108 predicted positions: chunk sizes 5, 7, 64 do not divide it


def _inputs(dtype=torch.float32, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=gen).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, 5:9] = IGNORE_INDEX
    weights = torch.rand(B, L, generator=gen)  # fractional weights
    weights[1, ::3] = 0.0  # zeros
    weights[2, 10:20] = 1.0
    labels[weights == 0] = IGNORE_INDEX
    return hidden, weight, b, labels, weights


def _value_and_grads(fn, hidden, weight, bias, labels, weights, scale=1.0, **kw):
    loss = fn(hidden, weight, labels, weights, lm_head_bias=bias, **kw)
    params = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    return loss.detach(), torch.autograd.grad(loss * scale, params)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 64, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_equals_naive(chunk_size, bias):
    args = _inputs(bias=bias)
    ref, ref_grads = _value_and_grads(naive_weighted_ce_sum, *args, scale=0.37)
    got, got_grads = _value_and_grads(weighted_ce_sum, *args, scale=0.37, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == len(ref_grads) == (3 if bias else 2)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_loss_is_weighted_sum_of_token_ce():
    hidden, weight, bias, labels, weights = _inputs()
    logits = F.linear(hidden, weight, bias)
    expected = sum(
        weights[b, t] * F.cross_entropy(logits[b, t - 1], labels[b, t])
        for b in range(B)
        for t in range(1, L)
        if labels[b, t] != IGNORE_INDEX
    )
    got = weighted_ce_sum(hidden, weight, labels, weights, lm_head_bias=bias, chunk_size=7)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-5)


def test_first_position_and_ignored_labels_are_not_targets():
    hidden, weight, _, labels, weights = _inputs(bias=False)
    weights = torch.ones(B, L)
    labels = torch.randint(0, V, (B, L))
    base = weighted_ce_sum(hidden, weight, labels, weights)
    labels2 = labels.clone()
    labels2[:, 0] = (labels[:, 0] + 1) % V  # position 0 is never predicted
    assert weighted_ce_sum(hidden, weight, labels2, weights) == base
    labels2[1, 4] = IGNORE_INDEX  # an ignored label drops that term even with weight 1
    assert weighted_ce_sum(hidden, weight, labels2, weights) < base


@pytest.mark.parametrize("chunk_size", [16, 50])
def test_bf16_close_to_naive(chunk_size):
    args = _inputs(torch.bfloat16, bias=True)
    ref, ref_grads = _value_and_grads(naive_weighted_ce_sum, *args)
    got, got_grads = _value_and_grads(weighted_ce_sum, *args, chunk_size=chunk_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=2e-2)
    # and close to the fp32 computation on the same (bf16-rounded) values
    fp32 = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in args]
    ref32, _ = _value_and_grads(naive_weighted_ce_sum, *fp32)
    torch.testing.assert_close(got, ref32, atol=0.05, rtol=2e-3)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, _, labels, weights = _inputs(bias=False)
    weight = weight.detach()  # the LoRA case: lm_head frozen
    loss = weighted_ce_sum(hidden, weight, labels, weights, chunk_size=9)
    loss.backward()
    assert weight.grad is None and not weight.requires_grad
    ref = naive_weighted_ce_sum(hidden, weight, labels, weights)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(hidden.grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_second_backward_raises():
    hidden, weight, _, labels, weights = _inputs(bias=False)
    loss = weighted_ce_sum(hidden, weight, labels, weights)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_no_grad_mode_and_no_targets():
    hidden, weight, _, labels, weights = _inputs(bias=False)
    with torch.no_grad():
        loss = weighted_ce_sum(hidden, weight, labels, weights)
    assert not loss.requires_grad
    zero = weighted_ce_sum(hidden, weight, labels, torch.zeros(B, L))
    assert zero.item() == 0.0
    (grad,) = torch.autograd.grad(zero, hidden)
    assert not grad.any()


def test_plw_zero_is_completion_only_mean():
    """With PLW=0, Σw·CE / Σw is the usual completion-only mean CE."""
    hidden, weight, _, labels, _ = _inputs(bias=False)
    completion = torch.zeros(B, L, dtype=torch.bool)
    completion[:, L // 2 :] = True
    weights = completion.float()  # completion 1, prompt 0 (and position 0 is never a target)
    labels = torch.where(completion, labels.clamp(min=0), IGNORE_INDEX)
    got = weighted_ce_sum(hidden, weight, labels, weights) / weights[:, 1:].sum()
    logits = F.linear(hidden[:, :-1], weight)
    mean = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got, mean, atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise():
    hidden, weight, _, labels, weights = _inputs(bias=False)
    bad = labels.clone()
    bad[0, 1] = V
    with pytest.raises(ValueError, match="outside the lm_head vocabulary"):
        weighted_ce_sum(hidden, weight, bad, torch.ones(B, L))
    with pytest.raises(ValueError, match="must match labels"):
        weighted_ce_sum(hidden, weight, labels, weights[:, 1:])
    with pytest.raises(ValueError, match="lm_head_weight"):
        weighted_ce_sum(hidden, weight[:, 1:], labels, weights)
    with pytest.raises(ValueError, match="chunk_size"):
        weighted_ce_sum(hidden, weight, labels, weights, chunk_size=0)


def test_token_ce_and_argmax_matches_full_logits():
    hidden, weight, bias, labels, _ = _inputs()
    with torch.no_grad():
        logits = F.linear(hidden, weight, bias)
    # make a few predictions right so that `correct` is exercised both ways
    labels[:, 1::4] = logits[:, :-1:4].argmax(-1)
    labels[:, 0] = 3
    ce, correct = token_ce_and_argmax(hidden, weight, labels, chunk_size=10, lm_head_bias=bias)
    assert ce.shape == correct.shape == labels.shape and ce.dtype == torch.float32
    target = labels[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(ce[:, 1:].flatten(), ref, atol=1e-5, rtol=1e-5)
    expected = (logits[:, :-1].argmax(-1) == target) & (target != IGNORE_INDEX)
    assert torch.equal(correct[:, 1:], expected)
    assert correct.sum() >= B * 9
    assert not ce[:, 0].any() and not correct[:, 0].any()
    assert not ce[labels == IGNORE_INDEX].any()


@pytest.fixture(scope="module")
def tiny_llama():
    """conftest.py's tiny Llama with a 512-token vocabulary: the fp32 rounding of a softmax over
    SmolLM2's 49,152 tokens would exceed this test's 1e-6 gradient tolerance on the tied embedding."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=512), attn_implementation="eager")


def test_tiny_llama_hidden_state_loss_equals_logits_loss(tiny_llama):
    model = tiny_llama
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 512, (2, 40), generator=gen)
    weights = torch.rand(2, 40, generator=gen)
    weights[:, :10] = 0.1
    weights[0, 30:] = 0.0
    labels = torch.where(weights > 0, input_ids, IGNORE_INDEX)

    model.zero_grad()
    out = model(input_ids=input_ids, use_cache=False)
    ref = naive_weighted_ce_from_logits(out.logits[:, :-1], labels, weights)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    got = weighted_ce_sum(hidden, model.lm_head.weight, labels, weights, chunk_size=13)
    got.backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():  # includes the tied embedding / lm_head
        torch.testing.assert_close(param.grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
