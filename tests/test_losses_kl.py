"""KL to the uniform prior: analytic against torch.distributions, Monte Carlo against closed forms."""

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from pips.losses.kl import (
    exp_concrete_log_prob,
    kl_to_uniform,
    monte_carlo_kl_to_uniform,
    sample_exp_concrete,
)

EULER_GAMMA = 0.5772156649015329


def relaxed_kl_closed_form(probs: torch.Tensor) -> float:
    """``KL(ExpConcrete(q, tau) || ExpConcrete(uniform, tau))`` for distinct ``q_k``, any ``tau``.

    Per sample the log-ratio is ``sum_k log q_k + K [log sum_k E_k / q_k - log sum_k E_k]`` with
    ``E_k = exp(-g_k)`` i.i.d. Exp(1). ``sum_k E_k ~ Gamma(K)`` so ``E log`` of it is ``digamma(K)``;
    ``sum_k w_k E_k`` is hypoexponential, ``E log`` of it is ``sum_k c_k log w_k - gamma`` with
    ``c_k = prod_{j != k} w_k / (w_k - w_j)``.
    """
    weights = (1 / probs).tolist()
    size = len(weights)
    coefficients = [
        math.prod(weights[k] / (weights[k] - weights[j]) for j in range(size) if j != k)
        for k in range(size)
    ]
    expected_log_weighted = (
        sum(c * math.log(w) for c, w in zip(coefficients, weights, strict=True)) - EULER_GAMMA
    )
    expected_log_plain = torch.special.digamma(torch.tensor(float(size))).item()
    return probs.log().sum().item() + size * (expected_log_weighted - expected_log_plain)


def test_kl_to_uniform_matches_torch_categorical_kl():
    logits = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    uniform = Categorical(logits=torch.zeros_like(logits))
    expected = kl_divergence(Categorical(logits=logits), uniform).sum(-1).mean()
    torch.testing.assert_close(kl_to_uniform(logits), expected)
    torch.testing.assert_close(kl_to_uniform(logits, per_latent=True), expected / 3)


def test_kl_to_uniform_is_zero_for_uniform_and_n_log_k_for_one_hot():
    assert kl_to_uniform(torch.zeros(2, 3, 7)).item() == pytest.approx(0.0, abs=1e-5)
    one_hot = 100.0 * torch.eye(7)[torch.tensor([1, 4])][:, None, :].expand(2, 3, 7)
    assert kl_to_uniform(one_hot).item() == pytest.approx(3 * math.log(7), abs=1e-5)


def test_exp_concrete_log_prob_matches_torch_exp_relaxed_categorical():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 6, generator=generator, dtype=torch.float64)
    log_sample = sample_exp_concrete(
        logits, 0.4, num_samples=5, generator=generator
    )  # [5, 3, 2, 6]
    reference = ExpRelaxedCategorical(torch.tensor(0.4, dtype=torch.float64), logits=logits)
    torch.testing.assert_close(
        exp_concrete_log_prob(log_sample, logits, 0.4), reference.log_prob(log_sample)
    )


@pytest.mark.parametrize("prior_temperature", [None, 0.25])
def test_monte_carlo_kl_is_the_mean_log_density_ratio_of_torch_distributions(prior_temperature):
    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(3, 2, 6, generator=generator, dtype=torch.float64)
    log_sample = sample_exp_concrete(logits, 0.5, num_samples=4, generator=generator)
    posterior = ExpRelaxedCategorical(torch.tensor(0.5, dtype=torch.float64), logits=logits)
    prior_tau = torch.tensor(prior_temperature or 0.5, dtype=torch.float64)
    prior = ExpRelaxedCategorical(prior_tau, logits=torch.zeros_like(logits))
    expected = (posterior.log_prob(log_sample) - prior.log_prob(log_sample)).sum(-1).mean()
    estimate = monte_carlo_kl_to_uniform(
        logits, 0.5, log_sample=log_sample, prior_temperature=prior_temperature
    )
    torch.testing.assert_close(estimate, expected)


def test_relaxed_kl_does_not_depend_on_temperature_for_the_same_noise():
    logits = torch.tensor([[[0.6, 0.3, 0.1]]], dtype=torch.float64).log()
    values = [
        monte_carlo_kl_to_uniform(
            logits, tau, num_samples=2000, generator=torch.Generator().manual_seed(3)
        )
        for tau in (1.0, 0.3, 0.05, 0.01)
    ]
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], rtol=0, atol=1e-9)


def test_relaxed_kl_converges_to_its_closed_form():
    """Tolerance: 4 standard errors of the mean, the per-sample spread measured on the samples."""
    probs = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    logits = probs.log().view(1, 1, 3)
    num_samples = 200_000
    log_sample = sample_exp_concrete(
        logits, 0.1, num_samples, generator=torch.Generator().manual_seed(4)
    )
    per_sample = exp_concrete_log_prob(log_sample, logits, 0.1) - exp_concrete_log_prob(
        log_sample, torch.zeros_like(logits), 0.1
    )  # [S, 1, 1]
    estimate = monte_carlo_kl_to_uniform(logits, 0.1, log_sample=log_sample)
    torch.testing.assert_close(estimate, per_sample.mean())
    standard_error = per_sample.std().item() / math.sqrt(num_samples)
    assert abs(estimate.item() - relaxed_kl_closed_form(probs)) < 4 * standard_error


def test_relaxed_kl_stays_above_categorical_kl_as_temperature_shrinks():
    """Data processing: argmax of either relaxation is the categorical, so the gap never closes."""
    probs = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    logits = probs.log().view(1, 1, 3)
    analytic = kl_to_uniform(logits).item()  # 0.2007 nats
    for tau in (0.5, 0.05, 0.005):
        relaxed = monte_carlo_kl_to_uniform(
            logits, tau, num_samples=20_000, generator=torch.Generator().manual_seed(5)
        ).item()
        assert relaxed == pytest.approx(relaxed_kl_closed_form(probs), abs=0.03)  # 0.611 nats
        assert relaxed > analytic + 0.35


def test_relaxed_kl_is_zero_for_a_uniform_posterior():
    logits = torch.zeros(2, 3, 5, dtype=torch.float64)
    kl = monte_carlo_kl_to_uniform(logits, 0.3, num_samples=10, generator=torch.Generator())
    assert kl.item() == pytest.approx(0.0, abs=1e-9)


def test_gradients_are_finite_for_peaked_logits_and_large_codebooks():
    generator = torch.Generator().manual_seed(6)
    logits = (100 * torch.randn(2, 3, 4096, generator=generator)).requires_grad_()
    kl = kl_to_uniform(logits) + monte_carlo_kl_to_uniform(
        logits, 0.1, num_samples=2, generator=generator
    )
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(logits.grad).all()


def test_bad_shapes_and_temperatures_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match=r"\[batch, latents, codes\].*unsqueeze"):
        kl_to_uniform(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="temperature must be positive; got 0"):
        monte_carlo_kl_to_uniform(torch.zeros(1, 1, 3), 0.0)
    with pytest.raises(ValueError, match="log_sample must have shape"):
        monte_carlo_kl_to_uniform(torch.zeros(1, 1, 3), 1.0, log_sample=torch.zeros(1, 1, 4))
