"""Lookup-free quantization (Yu et al. 2023, "Language Model Beats Diffusion", MAGVIT-v2, Sec. 3.1).

Each of ``b`` channels is quantized to its sign, ``q = sign(z) in {-1, +1}^b``; the implicit
codebook has ``2^b`` codes and the index is ``sum_i 2^i [z_i > 0]``. Features of another size
``dim`` are projected to the ``b`` bits and back by linear maps (as :class:`~pips.quantizers.fsq.FSQ`
does), so ``LFQ(dim=32, codebook_bits=10)`` drops into a model of 32-dim features. The formulas
below are in the bit space (``dim`` there means ``b``). The entropy penalty (Eq. 5) is
``E_x[H(q(c|x))] - gamma * H(E_x[q(c|x)])`` with ``q(c|x) = softmax_c(-inv_temperature ||z - c||^2)``
over all ``2^dim`` codes.

Because ``||z - c||^2 = sum_i (z_i - c_i)^2``, ``q(c|x)`` factorises into independent per-bit
Bernoullis with ``P(c_i = +1) = sigmoid(4 inv_temperature z_i)``:

- the per-sample entropy is a sum of binary entropies (exact, ``[N, dim]`` work);
- the batch average ``E_x[q]`` does not factorise, but splitting the bits into a low and a high half,
  ``q(c) = q_lo(c_lo) q_hi(c_hi)``, makes it one matrix product
  ``E_x[q] = P_lo^T P_hi / N`` with ``P_lo: [N, 2^(dim/2)]``, exact, never an ``[N, 2^dim]`` tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pips.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    linear_projections,
    straight_through_with_commitment,
    usage_stats,
)

MAX_ENTROPY_DIM = 24  # E[q] over 2^dim codes is held in memory: 2^24 floats = 64 MiB
MAX_USAGE_STATS_DIM = 20  # bincount over 2^dim codes for the usage stats
LOG_PROB_FLOOR = -40.0


def bit_patterns(num_bits: int, device: torch.device | None = None) -> torch.Tensor:
    """All ``2^num_bits`` codes as 0/1 rows, bit ``i`` of code ``c`` in column ``i``: ``[2^b, b]``."""
    codes = torch.arange(2**num_bits, device=device)
    return ((codes.unsqueeze(-1) >> torch.arange(num_bits, device=device)) & 1).float()


def code_log_probs(bit_logits: torch.Tensor) -> torch.Tensor:
    """``log q(c|x)`` of every code of the given bits, ``[N, b]`` bit logits -> ``[N, 2^b]``.

    ``log q(c|x) = sum_i [c_i] l_i - softplus(l_i)`` for independent bits with logits ``l``.
    """
    patterns = bit_patterns(bit_logits.shape[-1], bit_logits.device)  # [2^b, b]
    return bit_logits @ patterns.t() - F.softplus(bit_logits).sum(-1, keepdim=True)  # [N, 2^b]


def lfq_entropy_terms(z: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_x[H(q(c|x))], H(E_x[q(c|x)]))`` in nats for ``z: [N, dim]``, exactly (see module doc)."""
    bit_logits = 4 * inv_temperature * z  # [N, dim]; log P(+1) - log P(-1) per bit
    prob_plus = torch.sigmoid(bit_logits)
    # Binary entropy: -p log p - (1-p) log(1-p), with log p = -softplus(-l), log(1-p) = -softplus(l).
    bit_entropy = prob_plus * F.softplus(-bit_logits) + (1 - prob_plus) * F.softplus(bit_logits)
    per_sample_entropy = bit_entropy.sum(-1).mean()

    # Half-code probabilities below e^-40 are raised to e^-40: it moves the entropies by < 1e-10
    # even at dim 16 and keeps exp and the product out of (very slow) denormal floats on CPU.
    low_bits = z.shape[-1] // 2
    probs_low = (
        code_log_probs(bit_logits[:, :low_bits]).clamp_min(LOG_PROB_FLOOR).exp()
    )  # [N, 2^lo]
    probs_high = (
        code_log_probs(bit_logits[:, low_bits:]).clamp_min(LOG_PROB_FLOOR).exp()
    )  # [N, 2^hi]
    mean_probs = probs_low.t() @ probs_high / z.shape[0]  # [2^lo, 2^hi] = E_x[q(c|x)]
    codebook_entropy = -(mean_probs * mean_probs.clamp_min(1e-30).log()).sum()
    return per_sample_entropy, codebook_entropy


def codebook_bits_of(dim: int, codebook_bits: int | None, codebook_size: int | None) -> int:
    """Bits per code from ``codebook_bits`` or ``codebook_size`` (a power of 2), else ``dim``."""
    if codebook_bits is not None and codebook_size is not None:
        if 2**codebook_bits != codebook_size:
            raise ValueError(
                f"LFQ got codebook_bits={codebook_bits} and codebook_size={codebook_size}, which "
                f"disagree; give one of them"
            )
    if codebook_size is not None:
        bits = round(math.log2(codebook_size)) if codebook_size >= 1 else 0
        if codebook_size < 2 or 2**bits != codebook_size:
            raise ValueError(f"LFQ codebook_size must be a power of 2, >= 2; got {codebook_size}")
        return bits
    bits = codebook_bits if codebook_bits is not None else dim
    if bits < 1 or dim < 1:
        raise ValueError(f"LFQ dim and codebook_bits must be >= 1; got dim={dim}, bits={bits}")
    return bits


class LFQ(Quantizer):
    """Lookup-free quantizer with the MAGVIT-v2 entropy penalty.

    Args:
        dim: feature size of ``z``.
        codebook_bits: bits per code ``b`` (``codebook_size = 2^b``); when it differs from ``dim``
            linear maps project ``dim -> b`` before quantizing and back after, so ``quantized`` is
            ``[..., dim]``. ``None``: ``b = dim`` (no projection) unless ``codebook_size`` is given.
        codebook_size: the same as ``codebook_bits = log2(codebook_size)`` (a power of 2).
        entropy_weight: weight of ``E[H(q(c|x))] - diversity_gamma * H(E[q(c|x)])``.
        commitment_weight: weight of ``||z - sg[q]||^2``.
        diversity_gamma: weight of the codebook-entropy term inside the penalty.
        inv_temperature: sharpness of ``q(c|x) = softmax(-inv_temperature ||z - c||^2)`` (100 as in
            the reference implementation). A constructor argument, so a trainer's ``temperature``
            schedule meant for another quantizer is not picked up by mistake.
    """

    def __init__(
        self,
        dim: int,
        codebook_bits: int | None = None,
        codebook_size: int | None = None,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
    ) -> None:
        super().__init__()
        bits = codebook_bits_of(dim, codebook_bits, codebook_size)
        if entropy_weight > 0 and bits > MAX_ENTROPY_DIM:
            raise ValueError(
                f"LFQ entropy loss holds 2^bits probabilities, so codebook_bits must be <= "
                f"{MAX_ENTROPY_DIM} when entropy_weight > 0; got {bits} (set entropy_weight=0 or "
                f"use fewer bits)"
            )
        self.dim = dim
        self.bits = bits
        self.codebook_size = 2**bits
        self.entropy_weight = entropy_weight
        self.commitment_weight = commitment_weight
        self.diversity_gamma = diversity_gamma
        self.inv_temperature = inv_temperature
        self.register_buffer("_powers", 2 ** torch.arange(bits), persistent=False)  # [b]
        self.project_in, self.project_out = linear_projections(dim, bits)

    @property
    def index_factors(self) -> list[tuple[int, int]]:
        """One binary factor per bit ``(2, 2 ** i)``, first bit least significant."""
        return [(2, int(weight)) for weight in self._powers.tolist()]

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"LFQ expects z of shape [..., {self.dim}]; got {tuple(z.shape)}")
        z_bits = self.project_in(z)  # [..., b]
        with torch.autocast(device_type=z.device.type, enabled=False):
            inputs = z_bits.float()
            positive = inputs > 0  # [..., dim]
            codes = torch.where(positive, 1.0, -1.0)
            indices = (positive.long() * self._powers).sum(-1)  # [...]
            # Straight-through: value exactly +-1, identity gradient; commitment ||z - sg[q]||^2.
            quantized, commitment = straight_through_with_commitment(inputs, codes)
            loss = self.commitment_weight * commitment
            stats: dict[str, torch.Tensor] = {}
            if self.entropy_weight > 0:
                per_sample, codebook = lfq_entropy_terms(
                    inputs.reshape(-1, self.bits), self.inv_temperature
                )
                loss = loss + self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
                stats["per_sample_entropy"] = per_sample.detach()
                stats["codebook_entropy"] = codebook.detach()
        stats.update(self._usage_stats(indices))
        quantized = self.project_out(quantized)  # [..., dim]
        if isinstance(self.project_out, nn.Identity):
            quantized = quantized.to(z.dtype)
        return QuantizerOutput(quantized, indices, loss, None, stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        bits = (indices.unsqueeze(-1) >> torch.arange(self.bits, device=indices.device)) & 1
        return self.project_out(bits.float() * 2 - 1)  # [..., b] -> [..., dim]

    def _usage_stats(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.bits <= MAX_USAGE_STATS_DIM:
            return usage_stats(indices, self.codebook_size)
        _, counts = torch.unique(indices.reshape(-1), return_counts=True)  # too many codes to bin
        probs = counts.float() / counts.sum()
        entropy_bits = -(probs * probs.log2()).sum()
        return {
            "perplexity": entropy_bits.exp2(),
            "used_codes": torch.tensor(float(counts.numel())),
        }
