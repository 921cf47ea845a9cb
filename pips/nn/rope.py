"""Rotary position embeddings (Su et al. 2021) in one and two dimensions.

2D RoPE: half of each head's dimensions rotate with the row, the other half with the column, each
axis with its own base, so the attention score between two cells depends only on their (row, col)
offset (and the contents), never on where the pair sits on the grid.

1D RoPE (:class:`Rope1D`) produces (cos, sin) in the same layout, so the same
:func:`apply_rope_2d` (what :class:`pips.nn.transformer.Attention` calls) applies it: the
``head_dim / 2`` frequencies ``base**(-k / (head_dim / 2))`` are split over the two halves (the
faster half on the first half of the dimensions), each rotating its pairs by ``position * freq``,
so the score between two tokens depends only on their offset.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive halves: x = [a, b] -> [a cos - b sin, b cos + a sin] on the last dim."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Rope2D(nn.Module):
    """Precomputes (cos, sin) for (row, col) positions; :func:`apply_rope_2d` applies them."""

    def __init__(self, head_dim: int, base_row: float = 100.0, base_col: float = 100.0):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"2D RoPE needs a head dimension divisible by 4; got {head_dim}")
        quarter = head_dim // 4
        exponents = torch.arange(quarter, dtype=torch.float32) / quarter
        self.register_buffer("inv_freq_row", base_row**-exponents, persistent=False)
        self.register_buffer("inv_freq_col", base_col**-exponents, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L, 2] (row, col) -> cos, sin each [B, 1, L, head_dim / 2]."""
        positions = positions.float()
        row_angles = positions[..., 0:1] * self.inv_freq_row  # [B, L, hd/4]
        col_angles = positions[..., 1:2] * self.inv_freq_col  # [B, L, hd/4]
        angles = torch.cat([row_angles, col_angles], dim=-1).unsqueeze(1)  # [B, 1, L, hd/2]
        return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, H, L, head_dim]: first half rotated by row angles, second half by column angles."""
    cos, sin = rope  # [B, 1, L, hd/2]
    quarter = x.shape[-1] // 4
    x_row, x_col = x.chunk(2, dim=-1)  # each [B, H, L, hd/2]
    cos_row, cos_col = cos[..., :quarter], cos[..., quarter:]
    sin_row, sin_col = sin[..., :quarter], sin[..., quarter:]
    return torch.cat([rotate(x_row, cos_row, sin_row), rotate(x_col, cos_col, sin_col)], dim=-1)


class Rope1D(nn.Module):
    """Precomputes (cos, sin) for positions along one axis, in :class:`Rope2D`'s layout.

    Frequency ``k`` of ``head_dim / 2`` is ``base**(-k / (head_dim / 2))``; angles are
    ``position * freq``. :func:`apply_rope_2d` rotates the first half of each head with the first
    ``head_dim / 4`` frequencies and the second half with the rest, which is plain 1D RoPE with
    its dimension pairs ordered differently.
    """

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(
                f"1D RoPE (applied by apply_rope_2d) needs a head dimension divisible by 4; got "
                f"{head_dim}; pick width / heads divisible by 4"
            )
        half = head_dim // 2
        exponents = torch.arange(half, dtype=torch.float32) / half
        self.register_buffer("inv_freq", base**-exponents, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] (or [L]) -> cos, sin each [B, 1, L, head_dim / 2] (B = 1 for [L])."""
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        angles = (positions.float().unsqueeze(-1) * self.inv_freq).unsqueeze(1)  # [B, 1, L, hd/2]
        return angles.cos(), angles.sin()
