"""No bottleneck: the identity map, for a plain-autoencoder baseline."""

from __future__ import annotations

import torch

from pips.quantizers.base import Quantizer, QuantizerOutput


class IdentityQuantizer(Quantizer):
    """Pass ``z`` through unchanged; there are no codes (``indices`` is ``None``, zero loss)."""

    codebook_size = 0

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if self.dim is not None and z.shape[-1] != self.dim:
            raise ValueError(
                f"IdentityQuantizer expects z of shape [..., {self.dim}]; got {tuple(z.shape)}"
            )
        loss = z.new_zeros(())
        return QuantizerOutput(quantized=z, indices=None, loss=loss, logits=None, stats={})

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "IdentityQuantizer has no codebook, so there are no codes to decode; "
            "pick a discrete quantizer (vq, fsq, lfq, gumbel, rvq, gvq) to decode from indices"
        )
