"""Gumbel-softmax quantizer: a categorical distribution over codes, sampled with a gradient estimator.

Logits come from a linear head (or scaled cosine similarities to learned keys); a one-hot sample
(relaxed, straight-through, or ReinMax, see :mod:`pips.quantizers.estimators`) selects a row of a
learned code embedding table. Jang et al. 2017 "Categorical Reparameterization with Gumbel-Softmax";
Liu et al. 2023 "Bridging Discrete and Backpropagation: Straight-Through and Beyond" (ReinMax).

A large codebook can be a product of ``factors`` smaller ones (as FSQ's and LFQ's are): a code is
one index ``z < K = k ** F``, written in base ``k`` as ``F`` digits drawn independently, each from
its own ``k``-way softmax, and its vector is the sum of its digits' vectors. The posterior then
factorises over the digits (a mean-field family), and the head and codebook cost ``F * k`` rows
instead of ``K``: 65,536 codes from two 256-way factors.
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
        factors: ``F``; ``codebook_size`` must then be a whole ``F``-th power ``k ** F``. Logits
            are ``[..., F, k]`` (one softmax per factor) and indices the combined codes ``[...]``.

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
        factors: int = 1,
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
        factor_size = round(codebook_size ** (1 / max(factors, 1)))
        if factors < 1 or factor_size**factors != codebook_size:
            raise ValueError(
                f"GumbelQuantizer with factors={factors} needs codebook_size = k ** {factors}; got "
                f"{codebook_size}: use e.g. codebook_size={max(factor_size, 2) ** max(factors, 1)} "
                f"or factors=1"
            )
        self.factors = factors
        self.factor_size = factor_size
        self.dim = dim
        self.codebook_size = codebook_size
        self.estimator = estimator
        self.head = head
        self.num_slots = num_slots
        self.sampling = sampling

        slots = () if num_slots is None else (num_slots,)
        rows = factors * factor_size  # K, or F * k for a product codebook
        if head == "linear":
            bound = 1 / math.sqrt(dim)  # nn.Linear's default initialisation
            self.head_weight = nn.Parameter(torch.empty(*slots, dim, rows).uniform_(-bound, bound))
            self.head_bias = nn.Parameter(torch.empty(*slots, rows).uniform_(-bound, bound))
        else:
            self.keys = nn.Parameter(torch.randn(*slots, rows, dim))
            self.log_scale = nn.Parameter(torch.tensor(math.log(cosine_scale)))
        # code embeddings [K, dim], or the factors' digit embeddings [F * k, dim] (their sum is
        # a code's vector, scaled so it starts as large as one row)
        self.codebook = nn.Parameter(torch.randn(rows, dim) / math.sqrt(factors))
        self.register_buffer(
            "digit_weights", factor_size ** torch.arange(factors - 1, -1, -1), persistent=False
        )

    @property
    def index_factors(self) -> list[tuple[int, int]]:
        """One factor per product digit ``(k, k ** (F - 1 - f))``, first factor most significant."""
        return [(self.factor_size, int(weight)) for weight in self.digit_weights.tolist()]

    def compute_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [..., dim]`` (or ``[..., N, dim]`` with slots) -> logits ``[..., K]`` (``[..., N, K]``);
        with factors ``[..., F, k]``."""
        if self.head == "linear":
            if self.num_slots is None:
                logits = F.linear(z, self.head_weight.t(), self.head_bias)  # [..., K]
            else:
                logits = torch.einsum("...nd,ndk->...nk", z, self.head_weight) + self.head_bias
        else:
            z_unit = F.normalize(z.float(), dim=-1)
            keys_unit = F.normalize(self.keys.float(), dim=-1)
            if self.num_slots is None:
                cosine = z_unit @ keys_unit.t()  # [..., K]
            else:
                cosine = torch.einsum("...nd,nkd->...nk", z_unit, keys_unit)  # [..., N, K]
            logits = self.log_scale.exp() * cosine
        if self.factors > 1:
            logits = logits.unflatten(-1, (self.factors, self.factor_size))  # [..., F, k]
        return logits

    def _combine(self, digits: torch.Tensor) -> torch.Tensor:
        """Factor digits ``[..., F]`` -> codes ``[...]`` (base ``k``, first factor most significant)."""
        return (digits * self.digit_weights).sum(-1)

    def _digit_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``[...]`` -> the codebook rows of their digits ``[..., F]``."""
        digits = torch.div(indices.unsqueeze(-1), self.digit_weights, rounding_mode="floor")
        digits = digits % self.factor_size
        return digits + torch.arange(self.factors, device=indices.device) * self.factor_size

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
            indices = sample.detach().argmax(dim=-1)  # [...] (factors: [..., F] digits)
            if self.factors > 1:
                sample = sample.flatten(-2)  # [..., F * k]: one one-hot block per factor
            quantized = sample.to(self.codebook.dtype) @ self.codebook  # [..., dim]
            if self.factors > 1:
                indices = self._combine(indices)
        else:
            indices = logits.argmax(dim=-1)  # [...]
            if self.factors > 1:
                indices = self._combine(indices)
            quantized = self.codes_to_quantized(indices)  # [..., dim]

        stats = usage_stats(indices, self.codebook_size)
        with torch.no_grad():
            # perplexity of the batch-mean softmax (factors: the product of theirs)
            probs = logits.softmax(dim=-1).reshape(-1, self.factors, self.factor_size)
            mean_probs = probs.mean(dim=0)  # [F, k]
            entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
            stats["probs_perplexity"] = entropy.exp()
        loss = logits.new_zeros(())
        return QuantizerOutput(quantized, indices, loss, logits, stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        if self.factors == 1:
            return F.embedding(indices, self.codebook)  # [..., dim]
        return F.embedding(self._digit_rows(indices), self.codebook).sum(-2)  # [..., dim]

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
