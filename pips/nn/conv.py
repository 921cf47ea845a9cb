"""Residual convolutional encoder and decoder for images (the VQ-VAE / DALL-E / VQGAN family).

``ConvEncoder``: a 3x3 stem, then ``downsample`` times [``res_blocks`` residual blocks, a stride-2
4x4 convolution that halves the resolution], ``res_blocks`` more blocks at the lowest resolution,
and GroupNorm, SiLU and a 1x1 convolution to ``out_dim`` channels::

    [B, in_channels, H, W] -> [B, out_dim, H / 2**downsample, W / 2**downsample]

``ConvDecoder`` mirrors it: a 3x3 stem from ``in_dim``, ``res_blocks`` blocks, then ``downsample``
times [nearest-neighbour x2 upsampling, a 3x3 convolution, ``res_blocks`` blocks], and GroupNorm,
SiLU and a 3x3 convolution to ``out_channels``::

    [B, in_dim, h, w] -> [B, out_channels, h * 2**downsample, w * 2**downsample]

Nearest upsampling followed by a convolution avoids the checkerboard artefacts of transposed
convolutions (Odena et al. 2016). Every hidden layer has ``channels`` channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(channels, 32)`` groups (32 for 64 channels, 4 for 4)."""
    return nn.GroupNorm(math.gcd(channels, 32), channels)


class ResBlock(nn.Module):
    """``x + conv1x1(SiLU(GN(conv3x3(SiLU(GN(x))))))``: a pre-activation residual block that keeps
    the shape ``[B, channels, H, W]``. The last convolution starts at zero, so each block starts
    as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _check(downsample: int, res_blocks: int, channels: int) -> None:
    if downsample < 0:
        raise ValueError(f"downsample must be 0 or more halvings; got {downsample}")
    if res_blocks < 0:
        raise ValueError(f"res_blocks must be 0 or more; got {res_blocks}")
    if channels < 1:
        raise ValueError(f"channels must be at least 1; got {channels}")


class ConvEncoder(nn.Module):
    """``[B, in_channels, H, W] -> [B, out_dim, H / 2**downsample, W / 2**downsample]``.

    ``H`` and ``W`` must be divisible by ``2**downsample`` (each stride-2 convolution halves them
    exactly only then).
    """

    def __init__(
        self, in_channels: int, channels: int, out_dim: int, downsample: int, res_blocks: int
    ):
        super().__init__()
        _check(downsample, res_blocks, channels)
        self.downsample = downsample
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        for _ in range(downsample):
            layers += [ResBlock(channels) for _ in range(res_blocks)]
            layers.append(nn.Conv2d(channels, channels, 4, stride=2, padding=1))
        layers += [ResBlock(channels) for _ in range(res_blocks)]
        layers += [group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        factor = 2**self.downsample
        if images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(
                f"ConvEncoder with {self.downsample} halvings needs a height and width "
                f"divisible by {factor}; got {tuple(images.shape[-2:])}"
            )
        return self.layers(images)


class ConvDecoder(nn.Module):
    """``[B, in_dim, h, w] -> [B, out_channels, h * 2**downsample, w * 2**downsample]``."""

    def __init__(
        self, in_dim: int, channels: int, out_channels: int, downsample: int, res_blocks: int
    ):
        super().__init__()
        _check(downsample, res_blocks, channels)
        layers: list[nn.Module] = [nn.Conv2d(in_dim, channels, 3, padding=1)]
        layers += [ResBlock(channels) for _ in range(res_blocks)]
        for _ in range(downsample):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, channels, 3, padding=1),
            ]
            layers += [ResBlock(channels) for _ in range(res_blocks)]
        layers += [group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)
