"""SimVQ (Zhu et al. 2024): codebook = frozen basis x one learned map, against a slow reference."""

from __future__ import annotations

import pytest
import torch

from pips.quantizers import SimVQ


def reference_simvq(z: torch.Tensor, basis: torch.Tensor, weight: torch.Tensor, beta: float):
    """Brute-force nearest code of ``C = B W^T`` and ``beta ||z - sg[q]||^2 + ||sg[z] - q||^2``."""
    codebook = basis @ weight.t()  # [K, dim]
    distances = (z.unsqueeze(1) - codebook.unsqueeze(0)).pow(2).sum(-1)  # [N, K]
    indices = distances.argmin(-1)
    codes = codebook[indices]
    loss = beta * (z - codes.detach()).pow(2).mean() + (z.detach() - codes).pow(2).mean()
    return indices, codes, loss


def test_simvq_matches_the_reference_in_codes_loss_and_gradient_to_the_map():
    torch.manual_seed(0)
    simvq = SimVQ(6, 32, commitment_weight=0.25, basis_init="gaussian")
    with torch.no_grad():
        simvq.linear.weight.add_(0.3 * torch.randn(6, 6))
    z = torch.randn(50, 6, requires_grad=True)
    out = simvq(z)
    weight = simvq.linear.weight.detach().clone().requires_grad_()
    indices, codes, loss = reference_simvq(z, simvq.basis, weight, beta=0.25)
    assert torch.equal(out.indices, indices)
    assert torch.equal(out.quantized, codes.detach())  # the value is exactly the code
    torch.testing.assert_close(out.loss, loss)
    (grad_weight,) = torch.autograd.grad(out.loss, simvq.linear.weight, retain_graph=True)
    (expected,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(grad_weight, expected)
    assert not simvq.basis.requires_grad and "basis" not in dict(simvq.named_parameters())
    (grad_z,) = torch.autograd.grad(out.quantized.sum(), z)
    torch.testing.assert_close(grad_z, torch.ones_like(z))  # straight-through by default


def test_training_the_map_moves_the_codes_no_input_chose():
    torch.manual_seed(0)
    simvq = SimVQ(4, 16, basis_init="gaussian")
    z = 0.1 * torch.randn(64, 4) + 2.0  # a cluster far from every code: few codes are chosen
    out = simvq(z)
    unused = torch.bincount(out.indices, minlength=16) == 0
    assert unused.sum() > 8
    before = simvq.codebook.detach().clone()
    optimizer = torch.optim.SGD(simvq.parameters(), lr=0.5)
    out.loss.backward()
    optimizer.step()
    moved = (simvq.codebook.detach() - before).norm(dim=-1)
    assert (moved[unused] > 1e-3).all()  # one shared map: the unused codes follow the used ones


def test_sample_basis_is_drawn_from_the_first_batch():
    z = 1e-2 * torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    simvq = SimVQ(5, 32)
    out = simvq(z)
    assert ((simvq.basis.unsqueeze(1) - z).abs().sum(-1).min(-1).values == 0).all()
    assert out.stats["used_codes"] > 16
    simvq.eval()
    assert torch.equal(simvq.codes_to_quantized(simvq(z).indices), simvq(z).quantized)


def test_simvq_rejects_an_unknown_basis_init():
    with pytest.raises(ValueError, match="basis_init must be one of sample, gaussian"):
        SimVQ(4, 8, basis_init="kmeans")


def test_a_config_asking_for_kmeans_codes_builds_simvq_with_a_sampled_basis():
    from pips.config import load_config
    from pips.models.build import build_quantizer

    config = load_config(
        overrides=["model.quantizer.kind=simvq", "model.quantizer.codebook_init=kmeans"]
    )
    simvq = build_quantizer(config.model.quantizer, 16, None)
    assert isinstance(simvq, SimVQ) and not bool(simvq.initialized)  # sampled on the first batch
