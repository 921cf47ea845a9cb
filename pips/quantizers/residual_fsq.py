"""Residual FSQ: finite scalar quantization of successive residuals, each stage at a finer scale
(the ``ResidualFSQ`` of vector-quantize-pytorch; residual quantization as in Zeghidour et al. 2021,
FSQ as in Mentzer et al. 2023).

Every stage rounds each channel to ``L`` levels spread evenly over ``[-1, 1]`` (the symmetric grid
``2 k / (L - 1) - 1``, so ``[-1, 1]`` splits into steps of ``2 / (L - 1)``). Stage ``s`` quantizes
``r_s / scale_s`` with ``scale_s = (L - 1)^-s`` per channel and returns ``q_s scale_s``: the residual a
stage leaves is at most half its step, ``scale_s / (L - 1) = scale_{s+1}``, which fills the next
stage's ``[-1, 1]`` exactly, so the error shrinks by ``L - 1`` per stage. The input is first bounded
once, softly, by ``c tanh(z / c)`` with ``c = 1 + 1 / (L - 1)`` (everything that rounds onto the
grid); later stages clamp, which changes nothing inside the grid. Output ``sum_s q_s scale_s``, with
every stage's straight-through gradient reaching ``z`` (the residuals subtract the detached codes).
Indices ``[..., S]``, each stage a mixed-radix index (first channel least significant).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pips.quantizers.base import Quantizer, QuantizerOutput, linear_projections, usage_stats
from pips.quantizers.fsq import round_straight_through


class ResidualFSQ(Quantizer):
    """``num_stages`` scalar-quantization stages on successive residuals, ``prod(levels)`` codes each.

    Args:
        levels: values per channel of every stage, e.g. ``[8, 5, 5, 5]`` (each >= 2).
        num_stages: number of stages ``S``.
        dim: feature size of ``z``; when it differs from ``len(levels)`` linear maps project
            ``dim -> len(levels)`` before the first stage and back after the sum.
    """

    def __init__(self, levels: list[int], num_stages: int, dim: int | None = None) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if len(levels) == 0 or any(level < 2 for level in levels):
            raise ValueError(
                f"ResidualFSQ levels must be a non-empty list with each level >= 2; got {levels}"
            )
        if num_stages < 1:
            raise ValueError(f"ResidualFSQ num_stages must be >= 1; got {num_stages}")
        self.levels = levels
        self.num_stages = num_stages
        self.num_channels = len(levels)
        self.dim = dim if dim is not None else self.num_channels
        self.codebook_size = math.prod(levels)
        steps = torch.tensor(levels, dtype=torch.float32) - 1  # [d], L - 1
        stage = torch.arange(num_stages, dtype=torch.float32).unsqueeze(-1)  # [S, 1]
        self.register_buffer("scales", steps**-stage, persistent=False)  # [S, d]
        self.register_buffer("_steps", steps, persistent=False)
        self.register_buffer("_clamp", 1 + 1 / steps, persistent=False)  # [d]
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("_basis", basis, persistent=False)  # [d]
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        self.project_in, self.project_out = linear_projections(self.dim, self.num_channels)

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"ResidualFSQ expects z of shape [..., {self.dim}]; got {tuple(z.shape)}"
            )
        z_channels = self.project_in(z)  # [..., d]
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = torch.tanh(z_channels.float() / self._clamp) * self._clamp  # soft bound
            quantized = torch.zeros_like(residual)
            all_indices, stage_stats = [], []
            for scale in self.scales:  # [d] each
                position = (residual / scale).clamp(-1, 1)
                digits = round_straight_through((position + 1) * self._steps / 2)  # [0, L-1]
                indices = (digits.detach().long() * self._basis).sum(-1)  # [...]
                all_indices.append(indices)
                stage_stats.append(usage_stats(indices, self.codebook_size))
                codes = (digits * 2 / self._steps - 1) * scale
                quantized = quantized + codes
                residual = residual - codes.detach()
        indices = torch.stack(all_indices, dim=-1)  # [..., S]
        out = self.project_out(quantized)
        if isinstance(self.project_out, nn.Identity):
            out = out.to(z.dtype)
        stats = {key: torch.stack([s[key] for s in stage_stats]).mean() for key in stage_stats[0]}
        for index, stats_of_stage in enumerate(stage_stats):
            stats[f"perplexity_stage{index}"] = stats_of_stage["perplexity"]
        loss = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(out, indices, loss, None, stats)

    @property
    def bits_per_code(self) -> float:
        """Bits of one vector's indices: ``num_stages`` indices of ``log2(codebook_size)`` bits each."""
        return self.num_stages * math.log2(self.codebook_size)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the scaled stage codes; ``indices [..., s]`` with ``s <= S`` decodes ``s`` stages."""
        if indices.shape[-1] > self.num_stages:
            raise ValueError(
                f"ResidualFSQ has {self.num_stages} stages; got indices for {indices.shape[-1]}"
            )
        codes = sum(
            (
                ((indices[..., stage, None] // self._basis) % self._levels).float()
                * 2
                / self._steps
                - 1
            )
            * self.scales[stage]
            for stage in range(indices.shape[-1])
        )
        return self.project_out(codes)
