"""LFQ (MAGVIT-v2): sign codes, binary indices, and the entropy loss against brute force over 2^dim."""

from __future__ import annotations

import itertools

import pytest
import torch

from pips.quantizers import LFQ


def brute_force_entropy_loss(z: torch.Tensor, inv_temperature: float, gamma: float) -> torch.Tensor:
    """E[H(q(c|x))] - gamma H(E[q(c|x)]) with q a softmax over all 2^dim codes, in float64."""
    codes = torch.tensor(
        list(itertools.product([-1.0, 1.0], repeat=z.shape[-1])), dtype=torch.float64
    )
    distances = (z.unsqueeze(1) - codes.unsqueeze(0)).pow(2).sum(-1)  # [N, 2^dim]
    probs = torch.softmax(-inv_temperature * distances, dim=-1)
    per_sample = -(probs * probs.log()).sum(-1).mean()
    mean_probs = probs.mean(0)
    return per_sample - gamma * -(mean_probs * mean_probs.log()).sum()


@pytest.mark.parametrize("dim", [1, 4, 7])
@pytest.mark.parametrize("inv_temperature", [1.0, 10.0])
def test_lfq_entropy_loss_equals_brute_force_over_all_codes(dim, inv_temperature):
    torch.manual_seed(dim)
    z = (0.3 * torch.randn(40, dim)).requires_grad_()
    lfq = LFQ(
        dim,
        entropy_weight=1.0,
        commitment_weight=0.0,
        diversity_gamma=0.7,
        inv_temperature=inv_temperature,
    )
    loss = lfq(z).loss
    z64 = z.detach().double().requires_grad_()
    expected = brute_force_entropy_loss(z64, inv_temperature, gamma=0.7)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, z)
    (expected_grad,) = torch.autograd.grad(expected, z64)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=1e-4)


def test_lfq_signs_indices_and_decoding():
    lfq = LFQ(4)
    z = torch.tensor([[0.5, -0.2, 0.1, -3.0], [-1.0, -1.0, -1.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
    out = lfq(z)
    torch.testing.assert_close(out.quantized, torch.sign(z))
    assert out.indices.tolist() == [1 + 4, 0, 15]  # sum_i 2^i [z_i > 0]
    assert torch.equal(
        lfq.codes_to_quantized(torch.arange(16)).gt(0).long().mul(2 ** torch.arange(4)).sum(-1),
        torch.arange(16),
    )
    assert torch.equal(lfq.codes_to_quantized(out.indices), out.quantized)


def test_lfq_gradient_is_straight_through_plus_commitment():
    lfq = LFQ(6, entropy_weight=0.0, commitment_weight=0.25)
    z = torch.randn(8, 6, requires_grad=True)
    upstream = torch.randn(8, 6)
    out = lfq(z)
    (grad,) = torch.autograd.grad((out.quantized * upstream).sum() + out.loss, z)
    torch.testing.assert_close(
        grad, upstream + 0.25 * 2 * (z.detach() - torch.sign(z.detach())) / z.numel()
    )


def test_lfq_stays_practical_for_sixteen_bits():
    lfq = LFQ(16)
    z = torch.randn(2, 256, 16, requires_grad=True)
    out = lfq(z)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and lfq.codebook_size == 2**16
    assert out.stats["used_codes"] <= 512


def test_lfq_projects_features_to_its_bits_and_back():
    torch.manual_seed(0)
    lfq = LFQ(dim=32, codebook_bits=8)
    assert lfq.codebook_size == 256 and lfq.bits == 8
    z = torch.randn(4, 5, 32)
    out = lfq(z)
    assert out.quantized.shape == (4, 5, 32) and out.indices.shape == (4, 5)
    # The same as the 8-bit quantizer between the two linear maps.
    bits_only = LFQ(8)
    inner = bits_only(lfq.project_in(z))
    torch.testing.assert_close(out.quantized, lfq.project_out(inner.quantized))
    assert torch.equal(out.indices, inner.indices)
    torch.testing.assert_close(out.loss, inner.loss)
    torch.testing.assert_close(lfq.codes_to_quantized(out.indices), out.quantized)
    assert LFQ(dim=32, codebook_size=1024).bits == 10


def test_lfq_rejects_a_codebook_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="codebook_size must be a power of 2"):
        LFQ(dim=16, codebook_size=1000)
    with pytest.raises(ValueError, match="disagree"):
        LFQ(dim=16, codebook_bits=4, codebook_size=32)
