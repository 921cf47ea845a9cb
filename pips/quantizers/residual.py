"""Residual vector quantization (Zeghidour et al. 2021, "SoundStream", Algorithm 1).

Stage ``s`` quantizes the residual ``r_s = z - sum_{j<s} q_j`` left by the previous stages; the
output is ``sum_s q_s`` with one straight-through gradient to ``z``. Each stage's commitment loss
compares the stage's code with *its own* residual input ``r_s`` (not with ``z``, a known bug elsewhere).
``rotation_trick=True`` rotates ``z`` onto ``sum_s q_s`` (Fifty et al. 2024) instead of the
straight-through copy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pips.quantizers.base import Quantizer, QuantizerOutput, straight_through_with_commitment
from pips.quantizers.rotation import rotation_trick_with_commitment
from pips.quantizers.vq import VectorQuantizer


class ResidualVQ(Quantizer):
    """``num_stages`` vector quantizers applied to successive residuals; indices ``[..., S]``.

    Args:
        dim, codebook_size: as for :class:`VectorQuantizer` (``codebook_size`` per stage).
        num_stages: number of residual stages ``S``.
        shared_codebook: one codebook used by every stage (updated once per stage call).
        rotation_trick: the gradient from ``sum_s q_s`` to ``z`` by the rotation trick.
        **vq_kwargs: passed to each stage's :class:`VectorQuantizer` (``ema_decay``,
            ``commitment_weight``, ``codebook_init``, ``dead_code_threshold``, ...); stage ``s`` is
            seeded with ``seed + s``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_stages: int,
        shared_codebook: bool = False,
        rotation_trick: bool = False,
        **vq_kwargs,
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"ResidualVQ num_stages must be >= 1; got {num_stages}")
        if vq_kwargs.get("num_codebooks", 1) != 1:
            raise ValueError(
                "ResidualVQ stages hold one codebook each; use GroupVQ for num_codebooks > 1"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_stages = num_stages
        self.shared_codebook = shared_codebook
        self.rotation_trick = rotation_trick
        seed = vq_kwargs.pop("seed", 0)
        num_modules = 1 if shared_codebook else num_stages
        self.stages = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, seed=seed + stage, **vq_kwargs)
            for stage in range(num_modules)
        )

    def stage(self, index: int) -> VectorQuantizer:
        return self.stages[0 if self.shared_codebook else index]

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"ResidualVQ expects z of shape [..., {self.dim}]; got {tuple(z.shape)}"
            )
        residual = z.float()
        codes_sum = torch.zeros_like(residual)
        loss = residual.new_zeros(())
        all_indices, stage_stats = [], []
        for index in range(self.num_stages):
            out = self.stage(index)(residual, **schedule_values)  # commitment vs. this residual
            codes = out.quantized.detach()  # forward value is exactly the stage's code
            codes_sum = codes_sum + codes
            residual = residual - codes  # still differentiable w.r.t. z for the next commitment
            loss = loss + out.loss
            all_indices.append(out.indices)
            stage_stats.append(out.stats)
        indices = torch.stack(all_indices, dim=-1)  # [..., S]
        estimator = (
            rotation_trick_with_commitment
            if self.rotation_trick
            else straight_through_with_commitment
        )
        quantized, _ = estimator(z.float(), codes_sum)  # one gradient path to z
        stats = {
            key: torch.stack([stats[key] for stats in stage_stats]).mean() for key in stage_stats[0]
        }  # mean over stages
        for index, stats_of_stage in enumerate(stage_stats):
            stats[f"perplexity_stage{index}"] = stats_of_stage["perplexity"]
        return QuantizerOutput(quantized.to(z.dtype), indices, loss, None, stats)

    @property
    def bits_per_code(self) -> float:
        """Bits of one vector's indices: ``num_stages`` indices of ``log2(codebook_size)`` bits each."""
        return self.num_stages * math.log2(self.codebook_size)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the stage codes; ``indices [..., s]`` with ``s <= S`` decodes the first ``s`` stages."""
        if indices.shape[-1] > self.num_stages:
            raise ValueError(
                f"ResidualVQ has {self.num_stages} stages; got indices for {indices.shape[-1]}"
            )
        return sum(
            self.stage(index).codes_to_quantized(indices[..., index])
            for index in range(indices.shape[-1])
        )
