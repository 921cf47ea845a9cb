"""Radial (periodic) scalar quantization: each channel goes through the triangle wave
``arcsin(sin(x))`` and is rounded to ``base`` levels.

``arcsin(sin(x))`` folds the real line onto ``[-pi/2, pi/2]`` with period ``2 pi``: a channel is an
angle, so unlike FSQ's ``tanh`` bound nothing saturates and the gradient never vanishes far from
zero (its slope is +-1 everywhere). The folded value is mapped to ``[0, base - 1]``, rounded with a
straight-through gradient, and the digit ``k`` becomes the code value ``2 k / (base - 1) - 1`` in
``[-1, 1]``. The index is the base-``base`` number of the digits (first channel least significant),
``codebook_size = base ** num_channels``. Features of another size are projected in and out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pips.quantizers.base import Quantizer, QuantizerOutput, linear_projections, usage_stats
from pips.quantizers.fsq import round_straight_through


def fold(x: torch.Tensor) -> torch.Tensor:
    """``arcsin(sin(x))`` as the triangle wave ``pi/2 - |((x + pi/2) mod 2 pi) - pi|``: the same
    values, and a slope of exactly +-1 (``asin``'s derivative is 0/0 at the turning points)."""
    return math.pi / 2 - (torch.remainder(x + math.pi / 2, 2 * math.pi) - math.pi).abs()


class RadialQuantizer(Quantizer):
    """Periodic scalar quantizer with ``base`` levels per channel.

    Args:
        dim: feature size of ``z``.
        base: levels per channel (>= 2).
        num_channels: quantized channels; with ``codebook_size`` instead, ``num_channels =
            log_base(codebook_size)``; neither: ``dim`` channels, no projection.
        codebook_size: ``base ** num_channels`` (must be a power of ``base``).
    """

    def __init__(
        self,
        dim: int,
        base: int = 4,
        num_channels: int | None = None,
        codebook_size: int | None = None,
    ) -> None:
        super().__init__()
        if base < 2:
            raise ValueError(f"RadialQuantizer base must be >= 2; got {base}")
        if codebook_size is not None:
            channels = round(math.log(codebook_size, base)) if codebook_size > 1 else 0
            if channels < 1 or base**channels != codebook_size:
                raise ValueError(
                    f"RadialQuantizer codebook_size must be a power of base={base}; got "
                    f"{codebook_size} (e.g. {base ** max(channels, 1)})"
                )
            if num_channels is not None and num_channels != channels:
                raise ValueError(
                    f"RadialQuantizer got num_channels={num_channels} and codebook_size="
                    f"{codebook_size} = {base}^{channels}, which disagree; give one of them"
                )
            num_channels = channels
        num_channels = num_channels if num_channels is not None else dim
        self.dim = dim
        self.base = base
        self.num_channels = num_channels
        self.codebook_size = base**num_channels
        powers = base ** torch.arange(num_channels, dtype=torch.long)
        self.register_buffer("_powers", powers, persistent=False)  # [c]
        self.project_in, self.project_out = linear_projections(dim, num_channels)

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"RadialQuantizer expects z of shape [..., {self.dim}]; got {tuple(z.shape)}"
            )
        z_channels = self.project_in(z)  # [..., c]
        with torch.autocast(device_type=z.device.type, enabled=False):
            position = (fold(z_channels.float()) / math.pi + 0.5) * (self.base - 1)  # [0, base-1]
            digits = round_straight_through(position)  # integers, identity gradient
            codes = digits * (2 / (self.base - 1)) - 1  # [..., c] in [-1, 1]
            indices = (digits.detach().long() * self._powers).sum(-1)  # [...]
        quantized = self.project_out(codes)
        if isinstance(self.project_out, nn.Identity):
            quantized = quantized.to(z.dtype)
        stats = usage_stats(indices, self.codebook_size)
        loss = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(quantized, indices, loss, None, stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(-1) // self._powers) % self.base  # [..., c]
        return self.project_out(digits.float() * (2 / (self.base - 1)) - 1)
