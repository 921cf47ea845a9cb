"""Latent pooling: a fixed number of learned queries attend to a variable number of tokens.

Each block lets the latents attend to each other, then cross-attend to the encoded tokens (whose
keys carry their 2D RoPE positions), each with a residual path and pre-norms; a final RMSNorm.
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
        padding_mask: torch.Tensor,  # [B, L] True = padding
    ) -> torch.Tensor:
        latents = self.latent_queries.expand(tokens.shape[0], -1, -1)  # [B, N, D]
        for block in self.blocks:
            latents = block(
                latents, context=tokens, context_rope=rope, context_padding_mask=padding_mask
            )
        return self.norm(latents)  # [B, N, D]
