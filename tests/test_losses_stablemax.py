"""StableMax cross-entropy (Prieto et al. 2025, Eq. 7) on a hand-worked example."""

from __future__ import annotations

import math

import torch

from pips.losses import log_stablemax, stablemax_cross_entropy, stablemax_s, weighted_cross_entropy


def test_s_is_linear_above_zero_and_reciprocal_below():
    x = torch.tensor([2.0, 0.0, -1.0, -3.0])
    torch.testing.assert_close(stablemax_s(x), torch.tensor([3.0, 1.0, 0.5, 0.25]))


def test_stablemax_cross_entropy_and_gradient_on_a_hand_worked_example():
    # s([2, 0, -1]) = [3, 1, 1/2], sum 9/2: probabilities [2/3, 2/9, 1/9].
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    torch.testing.assert_close(
        log_stablemax(logits).exp(), torch.tensor([[2 / 3, 2 / 9, 1 / 9]], dtype=torch.float64)
    )
    loss = stablemax_cross_entropy(logits, torch.tensor([0]))
    torch.testing.assert_close(loss, torch.tensor(math.log(3 / 2)))
    # d/dx_j [-log s(x_t) + log S] = -[j = t] s'(x_t) / s(x_t) + s'(x_j) / S, s'(x) = 1 (x >= 0),
    # 1 / (1 - x)^2 (x < 0): [-1/3 + 2/9, 2/9, (1/4) (2/9)] = [-1/9, 2/9, 1/18].
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 9, 2 / 9, 1 / 18]]))


def test_stablemax_keeps_a_gradient_where_float32_softmax_collapses():
    logits = torch.tensor([[120.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0])
    softmax_loss = torch.nn.functional.cross_entropy(logits, target)
    (softmax_grad,) = torch.autograd.grad(softmax_loss, logits)
    assert softmax_loss == 0 and (softmax_grad == 0).all()  # Softmax Collapse: nothing to learn
    loss = stablemax_cross_entropy(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, torch.tensor(math.log(123 / 121)))
    assert (grad != 0).all()


def test_stablemax_runs_in_float64_and_in_float32_for_half_precision_logits():
    logits = torch.randn(4, 5)
    assert log_stablemax(logits).dtype == torch.float64
    assert log_stablemax(logits.bfloat16()).dtype == torch.float32
    assert stablemax_cross_entropy(logits, torch.zeros(4, dtype=torch.long)).dtype == torch.float32


def test_weighted_cell_loss_with_stablemax_equals_the_plain_stablemax_loss_at_unit_weights():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 6, 10), torch.randint(10, (2, 6))
    cells = weighted_cross_entropy(logits, targets, torch.ones(2, 6), stablemax=True)
    plain = stablemax_cross_entropy(logits.reshape(-1, 10), targets.reshape(-1))
    torch.testing.assert_close(cells, plain)
