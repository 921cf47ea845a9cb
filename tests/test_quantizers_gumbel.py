"""Gradient estimators and the Gumbel quantizer, checked against closed forms and Algorithm 2."""

from __future__ import annotations

import pytest
import torch

from pips.quantizers import GumbelQuantizer
from pips.quantizers.estimators import gumbel_noise, gumbel_softmax, reinmax, straight_through

TEMPERATURES = [0.3, 1.0, 2.5]


def softmax_vjp(probs: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """Closed-form vector-Jacobian product of softmax at output ``probs``: (diag(p) - p p^T) g."""
    return probs * (upstream - (probs * upstream).sum(-1, keepdim=True))


def reinmax_algorithm2(theta: torch.Tensor, one_hot: torch.Tensor, tau: float) -> torch.Tensor:
    """Liu et al. 2023, Algorithm 2, line by line (with the sample D given)."""
    pi0 = torch.softmax(theta, dim=-1)
    pi1 = (one_hot + torch.softmax(theta / tau, dim=-1)) / 2
    pi1 = torch.softmax((torch.log(pi1) - theta).detach() + theta, dim=-1)
    pi2 = 2 * pi1 - 0.5 * pi0
    return pi2 - pi2.detach() + one_hot


def assert_one_hot(x: torch.Tensor) -> None:
    assert torch.all((x == 0) | (x == 1))
    assert torch.all(x.sum(-1) == 1)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_reinmax_gradient_equals_algorithm2(tau):
    torch.manual_seed(0)
    logits = (2 * torch.randn(6, 4, 9)).requires_grad_()
    upstream = torch.randn(6, 4, 9)
    out = reinmax(logits, tau)
    assert_one_hot(out.detach())
    (grad,) = torch.autograd.grad(out, logits, upstream)

    theta = logits.detach().clone().requires_grad_()
    reference = reinmax_algorithm2(theta, out.detach(), tau)
    (reference_grad,) = torch.autograd.grad(reference, theta, upstream)
    torch.testing.assert_close(grad, reference_grad)

    # The same gradient in closed form: 2 J_softmax(pi1)^T g - 1/2 J_softmax(pi0)^T g.
    pi0 = torch.softmax(theta.detach(), -1)
    pi1 = (out.detach() + torch.softmax(theta.detach() / tau, -1)) / 2
    closed_form = 2 * softmax_vjp(pi1, upstream) - 0.5 * softmax_vjp(pi0, upstream)
    torch.testing.assert_close(grad, closed_form, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tau", [0.1, 5.0])
def test_reinmax_samples_from_softmax_without_temperature(tau):
    torch.manual_seed(1)
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    samples = reinmax(logits.expand(40_000, 4), tau)
    frequencies = samples.mean(0)
    torch.testing.assert_close(frequencies, logits.softmax(-1), atol=0.01, rtol=0)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_straight_through_forward_is_argmax_and_gradient_is_relaxed(tau):
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(2)).requires_grad_()
    upstream = torch.randn(5, 7)
    out = straight_through(logits, tau, generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(out, logits, upstream)

    noise = gumbel_noise(logits, generator=torch.Generator().manual_seed(7))
    theta = logits.detach().clone().requires_grad_()
    relaxed = torch.softmax((theta + noise) / tau, dim=-1)
    (reference_grad,) = torch.autograd.grad(relaxed, theta, upstream)
    expected = torch.nn.functional.one_hot((logits.detach() + noise).argmax(-1), 7).float()
    torch.testing.assert_close(out.detach(), expected)
    torch.testing.assert_close(grad, reference_grad)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_gumbel_softmax_gradient_is_softmax_jacobian_over_tau(tau):
    logits = torch.randn(5, 7).requires_grad_()
    upstream = torch.randn(5, 7)
    out = gumbel_softmax(logits, tau)  # relaxed: forward value is the soft sample
    torch.testing.assert_close(out.sum(-1), torch.ones(5))
    (grad,) = torch.autograd.grad(out, logits, upstream)
    torch.testing.assert_close(grad, softmax_vjp(out.detach(), upstream) / tau)


def test_gumbel_softmax_hard_flag_is_straight_through():
    logits = torch.randn(3, 5)
    hard = gumbel_softmax(logits, 0.5, hard=True, generator=torch.Generator().manual_seed(3))
    st = straight_through(logits, 0.5, generator=torch.Generator().manual_seed(3))
    assert_one_hot(hard)
    torch.testing.assert_close(hard, st)


def test_zero_noise_scale_is_deterministic_tempered_softmax():
    logits = torch.randn(4, 6)
    torch.testing.assert_close(
        gumbel_softmax(logits, 0.7, noise_scale=0.0), (logits / 0.7).softmax(-1)
    )


# --- GumbelQuantizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["soft", "hard", "reinmax"])
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_gumbel_quantizer_trains_all_parameters(estimator, head):
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(8, 16, estimator=estimator, head=head)
    z = torch.randn(4, 5, 8, requires_grad=True)
    out = quantizer(z, temperature=0.5, hardness=0.3, noise_scale=1.0)
    assert out.quantized.shape == (4, 5, 8) and out.indices.shape == (4, 5)
    assert out.logits.shape == (4, 5, 16)
    assert {"perplexity", "used_codes"} <= set(out.stats)
    out.quantized.pow(2).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, parameter in quantizer.named_parameters():
        assert parameter.grad is not None, name


def test_gumbel_quantizer_eval_is_argmax_without_noise():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(8, 16).eval()
    z = torch.randn(10, 8)
    first, second = quantizer(z, noise_scale=1.0), quantizer(z, noise_scale=1.0)
    torch.testing.assert_close(first.indices, second.indices)
    torch.testing.assert_close(first.indices, first.logits.argmax(-1))
    torch.testing.assert_close(first.quantized, quantizer.codes_to_quantized(first.indices))
    torch.testing.assert_close(first.quantized, quantizer.codebook[first.logits.argmax(-1)])


def test_gumbel_hardness_interpolates_forward_value_but_keeps_relaxed_gradient():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(4, 6, estimator="soft", sampling=False)
    z = torch.randn(3, 4)
    logits = quantizer.compute_logits(z).detach()
    soft = (logits / 0.5).softmax(-1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), 6).float()
    for hardness in (0.0, 0.25, 1.0):
        out = quantizer(z, temperature=0.5, hardness=hardness)
        expected = ((1 - hardness) * soft + hardness * hard) @ quantizer.codebook
        torch.testing.assert_close(out.quantized, expected)
    upstream = torch.randn(3, 4)
    grads = []
    for hardness in (0.0, 0.7):
        quantizer.zero_grad()
        (quantizer(z, temperature=0.5, hardness=hardness).quantized * upstream).sum().backward()
        grads.append(quantizer.head_weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_gumbel_slot_heads_are_independent_per_position():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(8, 16, num_slots=3)
    z = torch.randn(2, 3, 8)
    logits = quantizer.compute_logits(z)  # [2, 3, 16]
    for slot in range(3):
        expected = z[:, slot] @ quantizer.head_weight[slot] + quantizer.head_bias[slot]
        torch.testing.assert_close(logits[:, slot], expected)
    with pytest.raises(ValueError, match="num_slots=3"):
        quantizer(torch.randn(2, 4, 8))


def test_gumbel_rejects_unknown_estimator():
    with pytest.raises(
        ValueError, match="estimator must be one of soft, hard, reinmax; got 'gumbel'"
    ):
        GumbelQuantizer(8, 16, estimator="gumbel")


# --- product codebooks (factors > 1) -----------------------------------------------------------


def test_a_product_codebook_is_the_outer_sum_of_its_factors():
    """factors=2, K = 7 ** 2: the eval code is the argmax of the full K-way logits l1[a] + l2[b]
    (the product of the factors' softmaxes), written a * 7 + b, and its vector e1[a] + e2[b]."""
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(8, 49, factors=2).eval()
    z = torch.randn(6, 3, 8)
    out = quantizer(z)
    assert out.logits.shape == (6, 3, 2, 7) and out.indices.shape == (6, 3)
    first, second = out.logits.unbind(-2)  # [6, 3, 7] each
    full = (first.unsqueeze(-1) + second.unsqueeze(-2)).flatten(-2)  # [6, 3, 49]
    torch.testing.assert_close(out.indices, full.argmax(-1))
    a, b = out.indices // 7, out.indices % 7
    expected = quantizer.codebook[a] + quantizer.codebook[7 + b]
    torch.testing.assert_close(out.quantized, expected)
    torch.testing.assert_close(quantizer.codes_to_quantized(out.indices), expected)
    # the posterior of a code is the product of its digits' probabilities
    probs = out.logits.softmax(-1)
    torch.testing.assert_close(
        full.softmax(-1), (probs[..., 0, :, None] * probs[..., 1, None, :]).flatten(-2)
    )


@pytest.mark.parametrize("estimator", ["soft", "hard", "reinmax"])
def test_a_product_codebook_trains_every_factor_with_each_estimator(estimator):
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(8, 64, estimator=estimator, factors=3)  # 4 x 4 x 4
    z = torch.randn(5, 4, 8, requires_grad=True)
    out = quantizer(z, temperature=0.7, noise_scale=1.0)
    assert out.indices.shape == (5, 4) and int(out.indices.max()) < 64
    if estimator != "soft":  # a straight-through forward value is the code's own vector
        torch.testing.assert_close(out.quantized, quantizer.codes_to_quantized(out.indices))
    out.quantized.pow(2).sum().backward()
    assert quantizer.head_weight.grad.view(8, 3, 4).abs().sum((0, 2)).min() > 0
    assert quantizer.codebook.grad.view(3, 4, 8).abs().sum((1, 2)).min() > 0


def test_a_product_codebook_size_must_be_a_whole_power():
    with pytest.raises(ValueError, match="factors=2 needs codebook_size = k \\*\\* 2; got 50"):
        GumbelQuantizer(8, 50, factors=2)
