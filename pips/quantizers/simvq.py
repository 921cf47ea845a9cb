"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer").

The codebook is a frozen random basis ``B: [K, dim]`` times one learned linear map ``W``:
``C = B W``. The nearest code of ``C`` is taken by squared L2 as in VQ-VAE, and ``W`` is trained by
the codebook loss ``||sg[z] - C_k||^2`` (Sec. 3, Eq. 6). Because every code moves with ``W``, a
gradient from the codes that are used also moves the unused ones towards the features, so the
codebook does not collapse the way a per-code update can (Sec. 3.2). Commitment
``beta ||z - sg[C_k]||^2``; straight-through gradient, or the rotation trick.

The paper draws ``B`` from a Gaussian; by default here its rows are random vectors of the first
training batch instead (``basis_init="sample"``), the same data-based start as
:class:`~pips.quantizers.vq.VectorQuantizer`, so the codes begin at the features' scale in anyone's
model (a unit-scale basis left 4% of 256 codes in use in ``benchmarks/dropin.py``, the sampled one
86%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pips.quantizers.base import (
    DEAD_CODES_STAT_THRESHOLD,
    Quantizer,
    QuantizerOutput,
    broadcast_from_rank0,
    counts_stats,
    dead_code_mask,
    nearest_code_indices,
    perplexity_of_counts,
    sample_codes,
    straight_through_with_commitment,
    update_usage_ema,
)
from pips.quantizers.rotation import rotation_trick_with_commitment

BASIS_INITS = ("sample", "gaussian")


class SimVQ(Quantizer):
    """Vector quantizer whose codebook is ``basis @ W``: a frozen random basis, one learned map.

    Args:
        dim: feature size of ``z``.
        codebook_size: number of codes ``K``.
        commitment_weight: ``beta`` of the commitment loss.
        codebook_weight: weight of the codebook loss that trains ``W``.
        rotation_trick: the gradient to ``z`` by the rotation trick instead of straight-through.
        basis_init: ``"sample"``: ``K`` vectors of the first training batch (rank 0's under DDP);
            ``"gaussian"``: ``N(0, 1 / dim)`` entries (codes of norm about 1), as in the paper.
        seed: seeds the basis.

    ``W`` starts as the identity, so the first codes are the basis itself. Buffer ``ema_count [K]``
    (EMA of the code counts, training only) gives ``stats["dead_codes"]``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        rotation_trick: bool = False,
        usage_decay: float = 0.99,
        basis_init: str = "sample",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"SimVQ codebook_size must be >= 1; got {codebook_size}")
        if basis_init not in BASIS_INITS:
            raise ValueError(
                f"SimVQ basis_init must be one of {', '.join(BASIS_INITS)}; got {basis_init!r}"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.rotation_trick = rotation_trick
        self.usage_decay = usage_decay
        self.generator = torch.Generator().manual_seed(seed)
        basis = torch.randn(codebook_size, dim, generator=self.generator) * dim**-0.5
        self.register_buffer("basis", basis)  # [K, dim], frozen
        self.linear = nn.Linear(dim, dim, bias=False)  # W, the one learned map
        nn.init.eye_(self.linear.weight)
        self.register_buffer("ema_count", torch.ones(codebook_size))  # [K]
        self.register_buffer("initialized", torch.tensor(basis_init == "gaussian"))
        self._initialized_known = bool(self.initialized)  # Python mirror, avoids a sync

    @property
    def codebook(self) -> torch.Tensor:
        """The codes ``B W``: ``[K, dim]`` (differentiable with respect to ``W``)."""
        return self.linear(self.basis.float())

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"SimVQ expects z of shape [..., {self.dim}]; got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().reshape(-1, self.dim)  # [N, dim]
            if self.training and not self._initialized_known:
                self._maybe_sample_basis(flat.detach())
            codebook = self.codebook  # [K, dim]
            indices = nearest_code_indices(flat.detach(), codebook.detach(), owner=self)  # [N]
            codes = F.embedding(indices, codebook)  # [N, dim], gradient to W
            estimator = (
                rotation_trick_with_commitment
                if self.rotation_trick
                else straight_through_with_commitment
            )
            quantized, commitment = estimator(flat, codes)
            codebook_loss = F.mse_loss(codes, flat.detach())
            loss = self.commitment_weight * commitment + self.codebook_weight * codebook_loss
            counts = torch.bincount(indices, minlength=self.codebook_size).float()  # [K]
            if self.training:
                update_usage_ema(self.ema_count, counts, self.usage_decay)
        stats = counts_stats(counts.unsqueeze(0))
        dead = dead_code_mask(self.ema_count, DEAD_CODES_STAT_THRESHOLD)
        stats["dead_codes"] = dead.sum().float().detach()
        stats["ema_perplexity"] = perplexity_of_counts(self.ema_count).detach()
        quantized = quantized.reshape(z.shape).to(z.dtype)
        return QuantizerOutput(quantized, indices.reshape(z.shape[:-1]), loss, None, stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook.detach())  # [..., dim]

    @torch.no_grad()
    def _maybe_sample_basis(self, flat: torch.Tensor) -> None:
        if not bool(self.initialized):  # one sync, once (a loaded checkpoint is initialised)
            self.basis.copy_(sample_codes(flat.unsqueeze(0), self.codebook_size, self.generator)[0])
            broadcast_from_rank0(self.basis)
            self.initialized.fill_(True)
        self._initialized_known = True

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        self._initialized_known = False  # re-read the `initialized` buffer on the next call
