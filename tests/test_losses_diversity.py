"""Entropy and code-usage terms against hand computations on one 2 x 2 x 3 example."""

import math

import pytest
import torch

from pips.losses.diversity import (
    CodeUsageKL,
    batch_average_entropy,
    entropy_diversity_loss,
    posterior_entropy,
    slot_average_entropy,
)

# q[i, n] for B = 2 items, N = 2 slots, K = 3 codes; logits = log q, so softmax(logits) = q
PROBS = torch.tensor(
    [
        [[0.50, 0.25, 0.25], [0.25, 0.50, 0.25]],  # item 0: slot 0, slot 1
        [[0.25, 0.25, 0.50], [0.70, 0.20, 0.10]],  # item 1: slot 0, slot 1
    ],
    dtype=torch.float64,
)
LOGITS = PROBS.log()


def entropy(*probs: float) -> float:
    return -sum(p * math.log(p) for p in probs)


def test_posterior_entropy_matches_hand_computation():
    # three of the four posteriors are (1/2, 1/4, 1/4) up to order: H = 1.5 log 2
    expected = (3 * 1.5 * math.log(2) + entropy(0.7, 0.2, 0.1)) / 4
    assert posterior_entropy(LOGITS).item() == pytest.approx(expected)


def test_slot_average_entropy_matches_hand_computation():
    # item 0: mean of its slots (0.375, 0.375, 0.25); item 1: (0.475, 0.225, 0.3)
    expected = (entropy(0.375, 0.375, 0.25) + entropy(0.475, 0.225, 0.3)) / 2
    assert slot_average_entropy(LOGITS).item() == pytest.approx(expected)


def test_batch_average_entropy_matches_hand_computation():
    # slot 0: mean over items (0.375, 0.25, 0.375); slot 1: (0.475, 0.35, 0.175)
    expected = (entropy(0.375, 0.25, 0.375) + entropy(0.475, 0.35, 0.175)) / 2
    assert batch_average_entropy(LOGITS).item() == pytest.approx(expected)


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_entropy_diversity_loss_matches_hand_computation(gamma):
    # mean of all four posteriors: (1.7, 1.2, 1.1) / 4
    mean_entropy = (3 * 1.5 * math.log(2) + entropy(0.7, 0.2, 0.1)) / 4
    expected = mean_entropy - gamma * entropy(0.425, 0.3, 0.275)
    assert entropy_diversity_loss(LOGITS, gamma=gamma).item() == pytest.approx(expected)


def test_code_usage_kl_matches_hand_computation_over_two_steps():
    usage_kl = CodeUsageKL(codebook_size=3, decay=0.9)
    # step 1, no history: u = batch usage (0.425, 0.3, 0.275)
    first = usage_kl(LOGITS)
    assert first.item() == pytest.approx(math.log(3) - entropy(0.425, 0.3, 0.275))
    # step 2 with the codes reversed, batch usage (0.275, 0.3, 0.425):
    # u = 0.9 * (0.425, 0.3, 0.275) + 0.1 * (0.275, 0.3, 0.425) = (0.41, 0.3, 0.29)
    reversed_logits = LOGITS.flip(-1).requires_grad_()
    second = usage_kl(reversed_logits)
    assert second.item() == pytest.approx(math.log(3) - entropy(0.41, 0.3, 0.29))
    # running usage: (0.09 * first + 0.1 * second) / (1 - 0.9**2)
    expected_running = torch.tensor([0.06575, 0.057, 0.06725], dtype=torch.float64) / 0.19
    torch.testing.assert_close(usage_kl.running_usage().double(), expected_running)
    second.backward()  # the gradient flows through the current batch's part
    assert torch.isfinite(reversed_logits.grad).all() and reversed_logits.grad.abs().sum() > 0


def test_code_usage_kl_does_not_update_in_eval_mode():
    usage_kl = CodeUsageKL(codebook_size=3).eval()
    usage_kl(LOGITS)
    assert usage_kl.num_updates.item() == 0
    torch.testing.assert_close(usage_kl.running_usage(), torch.full((3,), 1 / 3))


def test_temperature_divides_the_logits():
    for term in (
        posterior_entropy,
        slot_average_entropy,
        batch_average_entropy,
        entropy_diversity_loss,
    ):
        torch.testing.assert_close(term(2 * LOGITS, temperature=2.0), term(LOGITS))


def test_entropies_reach_their_bounds():
    uniform = torch.zeros(4, 3, 5)
    assert posterior_entropy(uniform).item() == pytest.approx(math.log(5))
    one_hot = 100 * torch.eye(5)[torch.tensor([[0, 1, 2], [3, 4, 0]])]  # [2, 3, 5]
    assert posterior_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert slot_average_entropy(one_hot).item() == pytest.approx(math.log(3))  # 3 codes per item
    assert batch_average_entropy(one_hot).item() == pytest.approx(math.log(2))  # 2 codes per slot


def test_gradients_are_finite_for_peaked_logits_and_large_codebooks():
    logits = (
        100 * torch.randn(4, 3, 4096, generator=torch.Generator().manual_seed(0))
    ).requires_grad_()
    total = (
        posterior_entropy(logits)
        + slot_average_entropy(logits, temperature=0.01)
        + batch_average_entropy(logits)
        + entropy_diversity_loss(logits)
        + CodeUsageKL(4096)(logits)
    )
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


def test_bad_inputs_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match=r"\[batch, latents, codes\]"):
        posterior_entropy(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="CodeUsageKL was built for 4 codes; got logits with 3"):
        CodeUsageKL(4)(LOGITS)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\); got 1.0"):
        CodeUsageKL(4, decay=1.0)
