"""Gumbel-softmax quantizer: a categorical distribution over codes, sampled with a gradient estimator.

Logits come from a linear head (or scaled cosine similarities to learned keys); a one-hot sample
(relaxed, straight-through, or ReinMax, see :mod:`pips.quantizers.estimators`) selects a row of a
learned code embedding table. Jang et al. 2017 "Categorical Reparameterization with Gumbel-Softmax";
Liu et al. 2023 "Bridging Discrete and Backpropagation: Straight-Through and Beyond" (ReinMax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pips.quantizers.base import Quantizer, QuantizerOutput, usage_stats
from pips.quantizers.estimators import ESTIMATORS, _one_hot_argmax

HEADS = ("linear", "cosine")


class GumbelQuantizer(Quantizer):
    """Categorical quantizer trained through a Gumbel / straight-through / ReinMax estimator.

    Args:
        dim: feature size of ``z``.
        codebook_size: number of codes ``K``.
        estimator: ``"soft"`` (relaxed Gumbel-softmax; ``hardness`` blends it towards one-hot),
            ``"hard"`` (straight-through) or ``"reinmax"`` (Liu et al. 2023, Algorithm 2).
        head: ``"linear"`` logits ``W z + b``, or ``"cosine"``: ``s * <z/|z|, k/|k|>`` with learned
            keys ``k`` and a learned scale ``s`` (initialised to ``cosine_scale``).
        num_slots: if set, one head per latent slot; ``forward`` then expects ``z: [..., num_slots, dim]``.
        sampling: ``False`` turns off the Gumbel noise (a plain tempered softmax / argmax).
        cosine_scale: initial logit scale of the cosine head.

    ``forward(z, temperature=1.0, hardness=0.0, noise_scale=1.0)``: ``temperature`` is the softmax
    temperature of the gradient path; ``hardness`` in ``[0, 1]`` (``"soft"`` only) sets the forward
    value to ``(1 - h) * relaxed + h * one_hot`` while the gradient stays the relaxed one;
    ``noise_scale`` scales the Gumbel noise. In eval mode the code is ``argmax(logits)``, no noise.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        estimator: str = "soft",
        head: str = "linear",
        num_slots: int | None = None,
        sampling: bool = True,
        cosine_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"GumbelQuantizer estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}"
            )
        if head not in HEADS:
            raise ValueError(
                f"GumbelQuantizer head must be one of {', '.join(HEADS)}; got {head!r}"
            )
        if codebook_size < 2:
            raise ValueError(f"GumbelQuantizer codebook_size must be >= 2; got {codebook_size}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.estimator = estimator
        self.head = head
        self.num_slots = num_slots
        self.sampling = sampling

        slots = () if num_slots is None else (num_slots,)
        if head == "linear":
            bound = 1 / math.sqrt(dim)  # nn.Linear's default initialisation
            self.head_weight = nn.Parameter(
                torch.empty(*slots, dim, codebook_size).uniform_(-bound, bound)
            )
            self.head_bias = nn.Parameter(
                torch.empty(*slots, codebook_size).uniform_(-bound, bound)
            )
        else:
            self.keys = nn.Parameter(torch.randn(*slots, codebook_size, dim))
            self.log_scale = nn.Parameter(torch.tensor(math.log(cosine_scale)))
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))  # code embeddings [K, dim]

    def compute_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [..., dim]`` (or ``[..., N, dim]`` with slots) -> logits ``[..., K]`` (``[..., N, K]``)."""
        if self.head == "linear":
            if self.num_slots is None:
                return F.linear(z, self.head_weight.t(), self.head_bias)  # [..., K]
            return (
                torch.einsum("...nd,ndk->...nk", z, self.head_weight) + self.head_bias
            )  # [..., N, K]
        z_unit = F.normalize(z.float(), dim=-1)
        keys_unit = F.normalize(self.keys.float(), dim=-1)
        if self.num_slots is None:
            cosine = z_unit @ keys_unit.t()  # [..., K]
        else:
            cosine = torch.einsum("...nd,nkd->...nk", z_unit, keys_unit)  # [..., N, K]
        return self.log_scale.exp() * cosine

    def forward(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        hardness: float = 0.0,
        noise_scale: float = 1.0,
        **ignored: float,
    ) -> QuantizerOutput:
        self._check_shape(z)
        logits = self.compute_logits(z).float()  # [..., K]
        if self.training:
            if temperature <= 0:
                raise ValueError(f"GumbelQuantizer temperature must be > 0; got {temperature}")
            if not 0.0 <= hardness <= 1.0:
                raise ValueError(f"GumbelQuantizer hardness must be in [0, 1]; got {hardness}")
            noise = noise_scale if self.sampling else 0.0
            sample = ESTIMATORS[self.estimator](logits, temperature, noise_scale=noise)  # [..., K]
            if self.estimator == "soft" and hardness > 0:
                # Forward value (1 - h) * soft + h * one_hot; gradient of the soft sample.
                sample = sample + hardness * (_one_hot_argmax(sample.detach()) - sample).detach()
            indices = sample.detach().argmax(dim=-1)  # [...]
            quantized = sample.to(self.codebook.dtype) @ self.codebook  # [..., dim]
        else:
            indices = logits.argmax(dim=-1)  # [...]
            quantized = F.embedding(indices, self.codebook)  # [..., dim]

        stats = usage_stats(indices, self.codebook_size)
        with torch.no_grad():
            mean_probs = logits.softmax(dim=-1).reshape(-1, self.codebook_size).mean(dim=0)  # [K]
            entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
            stats["probs_perplexity"] = entropy.exp()  # perplexity of the batch-mean softmax
        loss = logits.new_zeros(())
        return QuantizerOutput(quantized, indices, loss, logits, stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook)  # [..., dim]

    def _check_shape(self, z: torch.Tensor) -> None:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"GumbelQuantizer expects z of shape [..., {self.dim}]; got {tuple(z.shape)}"
            )
        if self.num_slots is not None and (z.dim() < 2 or z.shape[-2] != self.num_slots):
            raise ValueError(
                f"GumbelQuantizer with num_slots={self.num_slots} expects z of shape "
                f"[..., {self.num_slots}, {self.dim}]; got {tuple(z.shape)}"
            )
