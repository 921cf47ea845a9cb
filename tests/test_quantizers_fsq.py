"""FSQ (Mentzer et al. 2023): grid codes, mixed-radix indices, exact inverse."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pips.quantizers import FSQ

LEVELS = [[3], [4], [8, 5, 5, 5], [2, 3, 4, 5], [7, 6]]


def grid_values(level: int) -> list[float]:
    """The ``level`` grid points in [-1, 1], in float32 like the quantizer."""
    half_width = level // 2
    return ((torch.arange(level, dtype=torch.float32) - half_width) / half_width).tolist()


@pytest.mark.parametrize("levels", LEVELS)
def test_fsq_every_index_maps_to_a_code_and_back(levels):
    fsq = FSQ(levels)
    indices = torch.arange(fsq.codebook_size)
    codes = fsq.codes_to_quantized(indices)  # [K, d]
    assert fsq.codebook_size == math.prod(levels)
    torch.testing.assert_close(fsq.codes_to_indices(codes), indices)
    # The codes are exactly the grid points, each once, first level least significant.
    expected = [
        tuple(reversed(point)) for point in itertools.product(*map(grid_values, reversed(levels)))
    ]
    assert [tuple(row) for row in codes.tolist()] == expected


@pytest.mark.parametrize("levels", LEVELS)
def test_fsq_forward_lands_on_grid_and_indices_decode_to_quantized(levels):
    torch.manual_seed(0)
    fsq = FSQ(levels)
    z = 3 * torch.randn(500, len(levels))
    out = fsq(z)
    for channel, level in enumerate(levels):
        values = set(out.quantized[:, channel].tolist())
        assert values <= set(grid_values(level))
    assert set(out.quantized[:, 0].tolist()) == set(grid_values(levels[0]))  # extremes reachable
    torch.testing.assert_close(fsq.codes_to_quantized(out.indices), out.quantized)
    assert out.indices.min() >= 0 and out.indices.max() < fsq.codebook_size


def test_fsq_bound_matches_reference_formula_and_gradient_is_straight_through():
    levels = torch.tensor([8.0, 5.0])
    fsq = FSQ([8, 5])
    z = torch.randn(20, 2, requires_grad=True)
    half_level = (levels - 1) * (1 - 1e-3) / 2
    offset = torch.tensor([0.5, 0.0])
    reference = torch.tanh(z + torch.tan(offset / half_level)) * half_level - offset
    torch.testing.assert_close(fsq.bound(z), reference)
    upstream = torch.randn(20, 2)
    (grad,) = torch.autograd.grad(fsq(z).quantized, z, upstream)
    (reference_grad,) = torch.autograd.grad(reference / torch.tensor([4.0, 2.0]), z, upstream)
    torch.testing.assert_close(grad, reference_grad)


def test_fsq_projection_when_dim_differs():
    torch.manual_seed(0)
    fsq = FSQ([8, 5, 5], dim=32).eval()
    out = fsq(torch.randn(2, 7, 32), temperature=0.5)
    assert out.quantized.shape == (2, 7, 32) and out.indices.shape == (2, 7)
    torch.testing.assert_close(fsq.codes_to_quantized(out.indices), out.quantized)


def test_fsq_rejects_bad_levels():
    with pytest.raises(ValueError, match=r"each level >= 2; got \[1, 5\]"):
        FSQ([1, 5])
