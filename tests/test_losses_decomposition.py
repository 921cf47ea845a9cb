"""beta-TCVAE decomposition for categorical latents: closed forms, estimator bias, the KL identity."""

import math

import pytest
import torch

from pips.losses.decomposition import (
    KLDecomposition,
    SlotMarginalEMA,
    decompose_kl,
    minibatch_log_weights,
)
from pips.losses.kl import kl_to_uniform

PEAK = 100.0  # logit of the chosen code in a "one-hot" posterior: other codes get e^-100


def terms(result: KLDecomposition) -> list[float]:
    return [
        result.mutual_information.item(),
        result.total_correlation.item(),
        result.dimension_wise_kl.item(),
    ]


def one_hot_logits(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Codes ``[B, N]`` -> near one-hot logits ``[B, N, K]`` in float64."""
    return PEAK * torch.nn.functional.one_hot(codes, codebook_size).double()


def correlated_batch(codebook_size: int, num_latents: int, copies: int) -> torch.Tensor:
    """Item ``i`` puts every slot on code ``i mod K``: slots perfectly correlated, codes balanced."""
    codes = torch.arange(codebook_size * copies) % codebook_size  # [B]
    return one_hot_logits(codes[:, None].expand(-1, num_latents), codebook_size)


@pytest.mark.parametrize(
    "options", [{"exact": True}, {"estimator": "mss"}, {"estimator": "mss", "dataset_size": 1000}]
)
def test_uniform_posteriors_give_zero_for_every_term(options):
    logits = torch.zeros(6, 3, 5, dtype=torch.float64)
    result = decompose_kl(logits, generator=torch.Generator().manual_seed(0), **options)
    assert [result.kl.item(), *terms(result)] == pytest.approx([0.0] * 4, abs=1e-9)


def test_mws_on_uniform_posteriors_is_off_by_its_stated_bias():
    """Identical posteriors: MWS puts log q(z) low by log D, so MI +log D, TC +(N-1) log D, DWKL -N log D."""
    num_latents, dataset_size = 3, 1000
    logits = torch.zeros(6, num_latents, 5, dtype=torch.float64)
    result = decompose_kl(
        logits, dataset_size=dataset_size, estimator="mws", generator=torch.Generator()
    )
    log_d = math.log(dataset_size)
    assert terms(result) == pytest.approx([log_d, (num_latents - 1) * log_d, -num_latents * log_d])


@pytest.mark.parametrize("options", [{"exact": True}, {"estimator": "mss"}])
def test_perfectly_correlated_slots_have_total_correlation_n_minus_one_log_k(options):
    codebook_size, num_latents = 4, 3
    logits = correlated_batch(codebook_size, num_latents, copies=5)
    result = decompose_kl(logits, generator=torch.Generator().manual_seed(0), **options)
    log_k = math.log(codebook_size)
    assert result.kl.item() == pytest.approx(num_latents * log_k)
    # MI: H(z) - 0 = log K (K distinct posteriors, equally frequent); DWKL: marginals are uniform
    assert terms(result) == pytest.approx([log_k, (num_latents - 1) * log_k, 0.0], abs=1e-9)


def test_mws_on_correlated_slots_is_off_by_log_batch_per_log_density():
    codebook_size, num_latents, copies = 4, 3, 5
    logits = correlated_batch(codebook_size, num_latents, copies)
    result = decompose_kl(logits, estimator="mws", generator=torch.Generator())
    log_k, log_b = math.log(codebook_size), math.log(codebook_size * copies)
    expected = [log_k + log_b, (num_latents - 1) * (log_k + log_b), -num_latents * log_b]
    assert terms(result) == pytest.approx(expected)


@pytest.mark.parametrize("options", [{"exact": True}, {"estimator": "mss"}])
def test_mutual_information_of_one_hot_posteriors_is_the_entropy_of_the_code_histogram(options):
    distinct = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [0, 7], [3, 3]])  # six different codes
    result = decompose_kl(one_hot_logits(distinct, 8), **options)
    assert result.mutual_information.item() == pytest.approx(math.log(6))
    repeated = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 3]])  # histogram (3/4, 1/4)
    result = decompose_kl(one_hot_logits(repeated, 8), **options)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert result.mutual_information.item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "options", [{"exact": True}, {"estimator": "mss"}, {"estimator": "mws"}, {"dataset_size": 500}]
)
def test_terms_sum_to_the_analytic_kl(options):
    """Exact for the exact terms; also exact for the sampled ones, whose log q(z) terms telescope."""
    logits = 2 * torch.randn(
        12, 2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    result = decompose_kl(logits, generator=torch.Generator().manual_seed(2), **options)
    torch.testing.assert_close(result.kl, kl_to_uniform(logits))
    total = result.mutual_information + result.total_correlation + result.dimension_wise_kl
    torch.testing.assert_close(total, result.kl, rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", [{"exact": True}, {"estimator": "mss"}, {"estimator": "mws"}])
def test_total_correlation_is_not_identically_zero_for_correlated_slots(options):
    """Guards the published bug where TC = KL - MI - DWKL from the same terms, hence always 0."""
    first_slot = 5 * torch.randn(
        32, 1, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    logits = first_slot.expand(-1, 2, -1)  # slot 2 copies slot 1
    result = decompose_kl(logits, generator=torch.Generator().manual_seed(4), **options)
    assert result.total_correlation.item() > 0.2  # exact: 0.56 nats


def test_mws_equals_mss_shifted_by_log_batch_when_the_batch_is_the_dataset():
    logits = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    samples = torch.randint(0, 4, (10, 3), generator=torch.Generator().manual_seed(6))
    mss = decompose_kl(logits, estimator="mss", samples=samples)
    mws = decompose_kl(logits, estimator="mws", samples=samples)
    log_b = math.log(10)
    expected = [
        t + shift for t, shift in zip(terms(mss), [log_b, 2 * log_b, -3 * log_b], strict=True)
    ]
    assert terms(mws) == pytest.approx(expected)


@pytest.mark.parametrize("dataset_size", [None, 10**6])
def test_minibatch_estimates_approach_the_exact_population_terms_as_the_batch_grows(dataset_size):
    """Data are 4 equally likely kinds of item; the population's exact terms are those of the 4.

    A batch draws kinds at random, then one z per item, so the estimate has sampling error; its
    spread over seeds is about 0.11 nats at B = 64 and 0.02 at B = 1024 (tolerances: about 4 of them).
    """
    generator = torch.Generator().manual_seed(7)
    prototypes = 2 * torch.randn(4, 2, 4, generator=generator, dtype=torch.float64)  # [kinds, N, K]
    population = decompose_kl(prototypes, exact=True)
    for batch_size, tolerance in ((64, 0.45), (1024, 0.1)):
        kinds = torch.randint(0, 4, (batch_size,), generator=generator)
        estimate = decompose_kl(prototypes[kinds], dataset_size=dataset_size, generator=generator)
        assert terms(estimate) == pytest.approx(terms(population), abs=tolerance)


def test_exact_refuses_more_joint_codes_than_the_limit():
    with pytest.raises(ValueError, match=r"4096\*\*2 .*max_joint_codes=1048576; use exact=False"):
        decompose_kl(torch.zeros(2, 2, 4096), exact=True)
    decompose_kl(torch.zeros(2, 2, 8), exact=True, max_joint_codes=64)  # exactly at the limit


def test_clamp_zeroes_negative_terms_and_reports_which():
    logits = torch.zeros(6, 3, 5, dtype=torch.float64)  # MWS makes DWKL = -3 log D here
    unclamped = decompose_kl(logits, dataset_size=1000, estimator="mws")
    assert not any(flag.item() for flag in unclamped.clamped.values())
    assert unclamped.dimension_wise_kl.item() < 0
    clamped = decompose_kl(logits, dataset_size=1000, estimator="mws", clamp=True)
    assert {name: flag.item() for name, flag in clamped.clamped.items()} == {
        "mutual_information": False,
        "total_correlation": False,
        "dimension_wise_kl": True,
    }
    assert clamped.dimension_wise_kl.item() == 0.0
    assert clamped.mutual_information.item() == pytest.approx(unclamped.mutual_information.item())


@pytest.mark.parametrize("options", [{"exact": True}, {"estimator": "mss"}, {"estimator": "mws"}])
def test_gradients_reach_the_logits_through_every_term(options):
    logits = torch.randn(8, 2, 5, generator=torch.Generator().manual_seed(8)).requires_grad_()
    result = decompose_kl(logits, generator=torch.Generator().manual_seed(9), **options)
    for value in terms_tensors(result):
        (grad,) = torch.autograd.grad(value, logits, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def terms_tensors(result: KLDecomposition) -> list[torch.Tensor]:
    return [result.mutual_information, result.total_correlation, result.dimension_wise_kl]


@pytest.mark.parametrize("options", [{"exact": True}, {"estimator": "mss"}, {"estimator": "mws"}])
def test_gradients_are_finite_for_peaked_logits(options):
    generator = torch.Generator().manual_seed(10)
    codebook_size = 16 if options.get("exact") else 4096
    logits = (100 * torch.randn(8, 2, codebook_size, generator=generator)).requires_grad_()
    result = decompose_kl(logits, generator=generator, **options)
    sum(terms_tensors(result)).backward()
    assert all(math.isfinite(value) for value in terms(result))
    assert torch.isfinite(logits.grad).all()


def test_the_same_generator_seed_gives_the_same_estimate():
    logits = torch.randn(8, 3, 6, generator=torch.Generator().manual_seed(11))
    first = decompose_kl(logits, generator=torch.Generator().manual_seed(12))
    second = decompose_kl(logits, generator=torch.Generator().manual_seed(12))
    assert terms(first) == terms(second)


def test_mss_weights_average_to_one_and_are_uniform_when_the_batch_is_the_dataset():
    weights = minibatch_log_weights(5, 40, "mss", torch.float64).exp()
    torch.testing.assert_close(weights.sum(1), torch.ones(5, dtype=torch.float64))
    assert weights[0, 0].item() == pytest.approx(1 / 40) and weights[0, 1].item() == pytest.approx(
        39 / 160
    )
    torch.testing.assert_close(minibatch_log_weights(5, None, "mss").exp(), torch.full((5, 5), 0.2))
    torch.testing.assert_close(
        minibatch_log_weights(5, 40, "mws").exp(), torch.full((5, 5), 1 / 200)
    )
    with pytest.raises(ValueError, match=r"dataset_size \(3\) is smaller than the batch \(5\)"):
        minibatch_log_weights(5, 3)


def test_slot_marginal_ema_tracks_a_bias_corrected_running_average():
    ema = SlotMarginalEMA(num_latents=1, codebook_size=2, decay=0.5)
    first = torch.tensor([[[0.8, 0.2]], [[0.6, 0.4]]]).log()  # batch marginals [0.7, 0.3]
    second = torch.tensor([[[0.1, 0.9]], [[0.3, 0.7]]]).log()  # batch marginals [0.2, 0.8]
    torch.testing.assert_close(ema.running_marginals(), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(ema(first), torch.tensor([[0.7, 0.3]]))  # no history: batch alone
    torch.testing.assert_close(ema(second), torch.tensor([[0.45, 0.55]]))  # 0.5 * 0.7 + 0.5 * 0.2
    # running = (0.25 * first + 0.5 * second) / (1 - 0.5**2): newer batches weigh more
    torch.testing.assert_close(
        ema.running_marginals(), torch.tensor([[0.275 / 0.75, 0.475 / 0.75]])
    )
    ema.eval()
    ema(first)
    assert ema.num_updates.item() == 2  # eval mode does not update


def test_slot_marginals_replace_the_minibatch_estimate_of_each_slot():
    """Correlated one-hot slots with the true (uniform) marginals: DWKL 0, TC (N-1) log K."""
    logits = correlated_batch(codebook_size=4, num_latents=3, copies=2)
    ema = SlotMarginalEMA(num_latents=3, codebook_size=4)
    marginals = ema(logits).double()
    torch.testing.assert_close(marginals, torch.full((3, 4), 0.25, dtype=torch.float64))
    result = decompose_kl(logits, slot_marginals=marginals, generator=torch.Generator())
    assert terms(result) == pytest.approx([math.log(4), 2 * math.log(4), 0.0], abs=1e-9)
    with pytest.raises(ValueError, match="takes no samples or slot_marginals"):
        decompose_kl(logits, exact=True, slot_marginals=marginals)
