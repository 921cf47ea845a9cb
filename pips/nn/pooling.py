"""Latent pooling: a fixed number of learned queries attend to a variable number of tokens.

Each block lets the latents attend to each other, then cross-attend to the encoded tokens (whose
keys carry their 2D RoPE positions), each with a residual path and pre-norms; a final RMSNorm.
The queries can start from given features (e.g. region averages, :func:`region_matrix`).
"""

from __future__ import annotations

import torch
from torch import nn

from pips.nn.transformer import Block, Rope


class LatentPooling(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        num_latents: int,
        num_layers: int = 1,
        mlp: str = "swiglu",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.latent_queries = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp, mlp_ratio, dropout, cross_attention=True)
            for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(width)

    def forward(
        self,
        tokens: torch.Tensor,  # [B, L, D]
        rope: Rope,
        padding_mask: torch.Tensor,  # [B, L] True = padding, or [B, N, L] per latent
        initial: torch.Tensor | None = None,  # [B, N, D] added to the learned queries
    ) -> torch.Tensor:
        latents = self.latent_queries.expand(tokens.shape[0], -1, -1)  # [B, N, D]
        if initial is not None:
            latents = latents + initial
        for block in self.blocks:
            latents = block(
                latents, context=tokens, context_rope=rope, context_padding_mask=padding_mask
            )
        return self.norm(latents)  # [B, N, D]


def region_matrix(lengths: torch.Tensor, size: int, regions: int) -> torch.Tensor:
    """[B, regions, size] averaging weights of adaptive pooling along one axis.

    Sample b has ``lengths[b]`` real positions (the rest padding); region r averages positions
    ``floor(r * n / R) <= i < ceil((r + 1) * n / R)`` (torch's adaptive pooling), so every
    region sees at least one real position, and neighbouring regions share one when n < R.
    """
    n = lengths.clamp_min(1).to(torch.float64).view(-1, 1, 1)  # [B, 1, 1]
    r = torch.arange(regions, device=lengths.device, dtype=torch.float64).view(1, -1, 1)
    i = torch.arange(size, device=lengths.device, dtype=torch.float64).view(1, 1, -1)
    start = torch.floor(r * n / regions)
    end = torch.ceil((r + 1) * n / regions)
    inside = ((i >= start) & (i < end)).float()  # [B, R, size]
    return inside / inside.sum(-1, keepdim=True)


def region_of(lengths: torch.Tensor, size: int, regions: int) -> torch.Tensor:
    """[B, size, regions] one-hot: the region whose span holds each position's centre
    (``floor((i + 0.5) * R / n)``); all zeros at padding positions."""
    n = lengths.clamp_min(1).view(-1, 1)  # [B, 1]
    i = torch.arange(size, device=lengths.device).view(1, -1)  # [1, size]
    index = torch.div((2 * i + 1) * regions, 2 * n, rounding_mode="floor").clamp_max(regions - 1)
    one_hot = torch.nn.functional.one_hot(index, regions).float()  # [B, size, R]
    return one_hot * (i < n).unsqueeze(-1).float()
