"""Grouped vector quantization: split the features into groups, quantize each group.

Baevski et al. 2020 ("wav2vec 2.0", Sec. 2) use G groups of codebooks whose codes are concatenated;
here each group is a nearest-neighbour :class:`VectorQuantizer`. Separate codebooks run as one batched
computation (``num_codebooks=G``), not a loop over groups.
"""

from __future__ import annotations

import math

import torch

from pips.quantizers.base import Quantizer, QuantizerOutput
from pips.quantizers.vq import VectorQuantizer


class GroupVQ(Quantizer):
    """``z: [..., dim]`` is viewed as ``[..., G, dim / G]``; each group is quantized; indices ``[..., G]``.

    Args:
        dim: feature size of ``z`` (divisible by ``groups``).
        codebook_size: codes per group's codebook.
        groups: number of groups ``G``.
        shared_codebook: one codebook for all groups instead of one per group.
        **vq_kwargs: passed to :class:`VectorQuantizer`.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        groups: int,
        shared_codebook: bool = False,
        **vq_kwargs,
    ) -> None:
        super().__init__()
        if groups < 1 or dim % groups != 0:
            raise ValueError(
                f"GroupVQ dim must be divisible by groups; got dim={dim}, groups={groups}"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.groups = groups
        self.group_dim = dim // groups
        self.shared_codebook = shared_codebook
        num_codebooks = 1 if shared_codebook else groups
        self.vq = VectorQuantizer(
            self.group_dim, codebook_size, num_codebooks=num_codebooks, **vq_kwargs
        )

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"GroupVQ expects z of shape [..., {self.dim}]; got {tuple(z.shape)}")
        grouped = z.reshape(*z.shape[:-1], self.groups, self.group_dim)  # [..., G, dim/G]
        out = self.vq(grouped, **schedule_values)  # indices [..., G] either way
        return out._replace(quantized=out.quantized.reshape(z.shape))

    @property
    def bits_per_code(self) -> float:
        """Bits of one vector's indices: ``groups`` indices of ``log2(codebook_size)`` bits each."""
        return self.groups * math.log2(self.codebook_size)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        grouped = self.vq.codes_to_quantized(indices)  # [..., G, dim/G]
        return grouped.reshape(*indices.shape[:-1], self.dim)
