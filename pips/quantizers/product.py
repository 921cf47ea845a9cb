"""Product vector quantization: the feature split into chunks, each chunk quantized by its own
codebook, one index per vector (Jégou et al. 2011, "Product Quantization for Nearest Neighbor
Search"; the "hierarchical" VQ of a mixed-radix index).

``z: [..., dim]`` is cut into ``C = len(levels)`` chunks of about ``dim / C`` features; chunk ``i`` has
its own :class:`~pips.quantizers.vq.VectorQuantizer` of ``levels[i]`` codes and the index is the
mixed-radix number ``sum_i k_i prod_{j<i} levels[j]`` (first chunk least significant), so the
codebook holds ``prod(levels)`` codes, of which only ``sum(levels)`` vectors are stored. With
``shared_codebook=True`` every chunk uses one codebook of ``base`` codes (the "carry" VQ: the index
is ``num_chunks`` base-``base`` digits). Unlike :class:`~pips.quantizers.group.GroupVQ`, whose
indices are ``[..., G]``, the index here is one number per vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pips.quantizers.base import Quantizer, QuantizerOutput, usage_stats
from pips.quantizers.vq import VectorQuantizer


class ProductVQ(Quantizer):
    """Chunks of ``z`` quantized by their own codebooks (of their own sizes); indices ``[...]``.

    Args:
        dim: feature size of ``z`` (chunks as even as possible; divisible with a shared codebook).
        levels: codes per chunk, e.g. ``[16, 16]`` (256 codes in two chunks).
        shared_codebook: one codebook of ``base`` codes for all ``num_chunks`` chunks instead.
        base, num_chunks: the shared codebook's size and the number of chunks.
        **vq_kwargs: passed to each chunk's :class:`VectorQuantizer` (chunk ``i`` is seeded with
            ``seed + i``).
    """

    def __init__(
        self,
        dim: int,
        levels: list[int] | None = None,
        shared_codebook: bool = False,
        base: int | None = None,
        num_chunks: int | None = None,
        **vq_kwargs,
    ) -> None:
        super().__init__()
        if shared_codebook:
            if base is None or num_chunks is None or base < 2 or num_chunks < 1:
                raise ValueError(
                    "ProductVQ with shared_codebook=True needs base >= 2 codes and num_chunks >= 1; "
                    f"got base={base}, num_chunks={num_chunks}"
                )
            levels = [base] * num_chunks
        elif not levels or any(level < 2 for level in levels):
            raise ValueError(
                f"ProductVQ levels must be a non-empty list of sizes >= 2; got {levels}"
            )
        levels = [int(level) for level in levels]
        num_chunks = len(levels)
        if dim < num_chunks or (shared_codebook and dim % num_chunks != 0):
            raise ValueError(
                f"ProductVQ dim must be {'divisible by' if shared_codebook else 'at least'} the "
                f"number of chunks; got dim={dim}, {num_chunks} chunks"
            )
        self.dim = dim
        self.levels = levels
        self.num_chunks = num_chunks
        # chunk sizes as even as possible: the first dim % C chunks get one feature more
        self.chunk_dims = [dim // num_chunks + (i < dim % num_chunks) for i in range(num_chunks)]
        self.shared_codebook = shared_codebook
        self.codebook_size = math.prod(levels)
        seed = vq_kwargs.pop("seed", 0)
        sizes = levels[:1] if shared_codebook else levels
        self.chunks = nn.ModuleList(
            VectorQuantizer(chunk_dim, size, seed=seed + index, **vq_kwargs)
            for index, (size, chunk_dim) in enumerate(zip(sizes, self.chunk_dims, strict=False))
        )
        radix = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("_radix", radix, persistent=False)  # [C]
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)  # [C]

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"ProductVQ expects z of shape [..., {self.dim}]; got {tuple(z.shape)}"
            )
        if self.shared_codebook:
            chunked = z.reshape(*z.shape[:-1], self.num_chunks, -1)  # [..., C, dim/C]
            out = self.chunks[0](chunked, **schedule_values)  # the chunks are more inputs
            quantized, digits, loss, chunk_stats = out.quantized, out.indices, out.loss, [out.stats]
        else:
            chunks = z.split(self.chunk_dims, dim=-1)
            outs = [
                vq(chunk, **schedule_values) for chunk, vq in zip(chunks, self.chunks, strict=True)
            ]
            quantized = torch.cat([out.quantized for out in outs], dim=-1)
            digits = torch.stack([out.indices for out in outs], dim=-1)  # [..., C]
            loss = torch.stack([out.loss for out in outs]).mean()  # a mean over all features
            chunk_stats = [out.stats for out in outs]
        indices = (digits * self._radix).sum(-1)  # [...], mixed radix
        stats = usage_stats(indices, self.codebook_size)
        for key in ("dead_codes", "ema_perplexity"):
            stats[key] = torch.stack([chunk[key] for chunk in chunk_stats]).mean()
        stats["chunk_perplexity"] = torch.stack([c["perplexity"] for c in chunk_stats]).mean()
        return QuantizerOutput(quantized.reshape(z.shape), indices, loss, None, stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(-1) // self._radix) % self._levels  # [..., C]
        if self.shared_codebook:
            chunks = self.chunks[0].codes_to_quantized(digits)  # [..., C, dim/C]
            return chunks.reshape(*indices.shape, self.dim)
        return torch.cat(
            [vq.codes_to_quantized(digits[..., i]) for i, vq in enumerate(self.chunks)], dim=-1
        )
