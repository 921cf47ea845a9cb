"""Residual FSQ against a slow reference: FSQ on successive residuals, stage scales (L - 1)^-s."""

from __future__ import annotations

import math

import torch

from pips.quantizers import ResidualFSQ


def reference_residual_fsq(z: torch.Tensor, levels: list[int], stages: int):
    """Loops over vectors, stages and channels: soft bound ``c tanh(x / c)``, ``c = 1 + 1/(L-1)``,
    then stage ``s`` rounds ``r / (L-1)^-s`` to the grid ``2k/(L-1) - 1``. Returns (quantized
    ``[N, d]``, indices ``[N, S]``)."""
    quantized, indices = torch.zeros_like(z), torch.zeros(z.shape[0], stages, dtype=torch.long)
    for row, vector in enumerate(z.tolist()):
        residual = [
            math.tanh(x / (1 + 1 / (level - 1))) * (1 + 1 / (level - 1))
            for x, level in zip(vector, levels, strict=True)
        ]
        for stage in range(stages):
            index, radix = 0, 1
            for channel, level in enumerate(levels):
                scale = (level - 1) ** -stage
                position = min(max(residual[channel] / scale, -1.0), 1.0)
                digit = round((position + 1) * (level - 1) / 2)
                value = (2 * digit / (level - 1) - 1) * scale
                quantized[row, channel] += value
                residual[channel] -= value
                index += digit * radix
                radix *= level
            indices[row, stage] = index
    return quantized, indices


def test_residual_fsq_matches_the_reference_and_decodes_its_indices():
    torch.manual_seed(0)
    levels = [8, 5, 3]
    rfsq = ResidualFSQ(levels, num_stages=3)
    z = 1.5 * torch.randn(64, 3)
    out = rfsq(z)
    expected_quantized, expected_indices = reference_residual_fsq(z, levels, 3)
    assert torch.equal(out.indices, expected_indices)
    torch.testing.assert_close(out.quantized, expected_quantized)  # float32 against float64
    torch.testing.assert_close(rfsq.codes_to_quantized(out.indices), out.quantized)
    assert rfsq.codebook_size == 120 and out.indices.shape == (64, 3)


def test_each_stage_shrinks_the_error_by_the_number_of_steps():
    torch.manual_seed(0)
    rfsq = ResidualFSQ([7, 7], num_stages=4)
    z = 0.9 * (2 * torch.rand(500, 2) - 1)  # inside the soft bound's near-linear range
    indices = rfsq(z).indices
    bounded = (7 / 6) * torch.tanh(z / (7 / 6))  # what the stages quantize
    errors = [
        (bounded - rfsq.codes_to_quantized(indices[:, : stage + 1])).abs().max().item()
        for stage in range(4)
    ]
    for stage, error in enumerate(errors):  # at most half a step of the last stage: 6^-(s+1) / 1
        assert error <= 6.0 ** -(stage + 1) + 1e-6, errors


def test_residual_fsq_projects_features_and_every_stage_reaches_the_input():
    torch.manual_seed(0)
    rfsq = ResidualFSQ([5, 5, 5], num_stages=2, dim=16)
    z = torch.randn(10, 16, requires_grad=True)
    out = rfsq(z)
    assert out.quantized.shape == (10, 16)
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert {"perplexity", "used_codes", "perplexity_stage1"} <= set(out.stats)
