"""Radial quantizer: arcsin(sin(x)) per channel, rounded to base levels, against a scalar loop."""

from __future__ import annotations

import math

import pytest
import torch

from pips.quantizers import RadialQuantizer
from pips.quantizers.radial import fold


def reference_radial(z: torch.Tensor, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar by scalar with math.asin(math.sin(x)): (codes [N, c], indices [N])."""
    codes, indices = torch.zeros_like(z), []
    for row, vector in enumerate(z.tolist()):
        index = 0
        for channel, x in enumerate(vector):
            digit = round((math.asin(math.sin(x)) / math.pi + 0.5) * (base - 1))
            codes[row, channel] = 2 * digit / (base - 1) - 1
            index += digit * base**channel
        indices.append(index)
    return codes, torch.tensor(indices)


@pytest.mark.parametrize("base", [2, 4, 5])
def test_radial_codes_and_indices_match_the_scalar_reference(base):
    torch.manual_seed(base)
    radial = RadialQuantizer(3, base=base)
    z = 4 * torch.randn(200, 3, dtype=torch.float64).float()
    out = radial(z)
    codes, indices = reference_radial(z, base)
    torch.testing.assert_close(out.quantized, codes)
    assert torch.equal(out.indices, indices)
    assert torch.equal(radial.codes_to_quantized(out.indices), out.quantized)
    assert radial.codebook_size == base**3


def test_fold_is_arcsin_sin_with_unit_slope_and_period_two_pi():
    x = torch.linspace(-10, 10, 1001, dtype=torch.float64, requires_grad=True)
    folded = fold(x)
    torch.testing.assert_close(folded, torch.asin(torch.sin(x)))
    (slope,) = torch.autograd.grad(folded.sum(), x)
    assert set(slope.abs().tolist()) == {1.0}
    codes = RadialQuantizer(1, base=4)(torch.tensor([[0.3], [0.3 + 2 * math.pi]])).indices
    assert codes[0] == codes[1]


def test_radial_projects_features_to_log_base_codebook_size_channels():
    radial = RadialQuantizer(32, base=4, codebook_size=256)
    assert radial.num_channels == 4
    z = torch.randn(5, 7, 32, requires_grad=True)
    out = radial(z)
    assert out.quantized.shape == (5, 7, 32) and out.indices.shape == (5, 7)
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    assert grad.abs().sum() > 0  # straight-through rounding, unit-slope fold
    with pytest.raises(ValueError, match="codebook_size must be a power of base=4; got 32"):
        RadialQuantizer(8, base=4, codebook_size=32)
