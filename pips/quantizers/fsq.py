"""Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of ``d = len(levels)`` channels is bounded to ``L_i`` values, rounded with a straight-through
gradient and rescaled to ``[-1, 1]``; the codebook is the implicit grid of ``prod(levels)`` points.
The arithmetic follows the paper's reference code (Appendix A.1, google-research/finite_scalar_quantization).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pips.quantizers.base import Quantizer, QuantizerOutput, linear_projections, usage_stats


def round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return x.round().detach() + (x - x.detach())  # forward value exactly round(x)


class FSQ(Quantizer):
    """Finite scalar quantizer with an implicit grid codebook of ``prod(levels)`` codes.

    Args:
        levels: number of values per channel, e.g. ``[8, 5, 5, 5]`` (each >= 2).
        dim: feature size of ``z``; when it differs from ``len(levels)`` a linear projection maps
            ``dim -> len(levels)`` before quantizing and back after, so ``quantized`` is ``[..., dim]``.
        eps: shrinks the tanh bound slightly so the extreme levels are reachable but never exceeded.
    """

    def __init__(self, levels: list[int], dim: int | None = None, eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if len(levels) == 0 or any(level < 2 for level in levels):
            raise ValueError(
                f"FSQ levels must be a non-empty list with each level >= 2; got {levels}"
            )
        self.levels = levels
        self.num_channels = len(levels)
        self.dim = dim if dim is not None else self.num_channels
        self.codebook_size = math.prod(levels)
        self.eps = eps

        levels_tensor = torch.tensor(levels, dtype=torch.float32)
        # Mixed radix, first level least significant: basis = [1, L0, L0*L1, ...].
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("_levels", levels_tensor, persistent=False)
        self.register_buffer("_half_width", (levels_tensor // 2), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        # the bound's constants, computed once: scale, the even-level offset and its tanh shift
        half_level = (levels_tensor - 1) * (1 - eps) / 2
        offset = torch.where(levels_tensor % 2 == 1, 0.0, 0.5)
        self.register_buffer("_half_level", half_level, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.tan(offset / half_level), persistent=False)

        self.project_in, self.project_out = linear_projections(self.dim, self.num_channels)

    @property
    def index_factors(self) -> list[tuple[int, int]]:
        """One factor per channel: ``(L_i, prod(L_0..L_{i-1}))``, first channel least significant."""
        return [
            (level, int(weight))
            for level, weight in zip(self.levels, self._basis.tolist(), strict=True)
        ]

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each channel into ``(-(L-1)/2 - offset, (L-1)/2 - offset)`` (offset 0.5 for even L).

        The shift makes ``bound(0) == 0`` up to O(eps) for even levels; like the reference code it
        uses ``tan`` (≈ ``atanh`` at these arguments).
        """
        return torch.tanh(z + self._shift) * self._half_level - self._offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Round the bounded ``z`` to the grid (straight-through) and rescale to ``[-1, 1]``."""
        return round_straight_through(self.bound(z)) / self._half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid points ``[..., d]`` in ``[-1, 1]`` -> mixed-radix indices ``[...]`` (long)."""
        digits = (codes * self._half_width).round().long() + self._half_width.long()  # [..., d]
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Mixed-radix indices ``[...]`` -> grid points ``[..., d]`` in ``[-1, 1]`` (float32)."""
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels.long()  # [..., d]
        return (digits.float() - self._half_width) / self._half_width

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects z of shape [..., {self.dim}]; got {tuple(z.shape)}")
        z_channels = self.project_in(z)  # [..., d]
        with torch.autocast(device_type=z.device.type, enabled=False):
            rounded = round_straight_through(self.bound(z_channels.float()))  # [..., d], integers
            codes = rounded / self._half_width  # grid points in [-1, 1]
            digits = rounded.detach().long() + self._half_width.long()  # [..., d] in [0, L)
            indices = (digits * self._basis).sum(-1)  # [...], mixed radix
        quantized = self.project_out(codes)  # [..., dim]
        if isinstance(self.project_out, nn.Identity):
            quantized = quantized.to(z.dtype)
        stats = usage_stats(indices, self.codebook_size)
        return QuantizerOutput(
            quantized, indices, z.new_zeros((), dtype=torch.float32), None, stats
        )

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.indices_to_codes(indices))
