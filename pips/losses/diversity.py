"""Entropy and code-usage terms for categorical latents: confidence, diversity, codebook usage.

Every function takes logits ``[B, N, K]`` (batch, latent slots, codes), uses ``q = softmax(logits /
temperature)``, and returns the entropy (or KL) itself, in nats, as a scalar. The sign and weight
belong to the trainer: *subtract* an entropy to encourage spread (``loss -= w * batch_average_entropy``
for codebook usage), *add* it to encourage confident codes (``loss += w * posterior_entropy``).
:func:`entropy_diversity_loss` and :class:`CodeUsageKL` are already losses (lower is more diverse).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pips.losses.kl import _check_logits, _check_temperature, mean_over_ranks


def _log_probs(logits: torch.Tensor, temperature: float, caller: str) -> torch.Tensor:
    _check_logits(logits, caller)
    _check_temperature(temperature)
    return torch.log_softmax(logits / temperature, dim=-1)  # [B, N, K]


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_k p_k log p_k`` over the last dim; ``0 * log 0`` terms underflow to exactly 0."""
    return -(log_probs.exp() * log_probs).sum(-1)


def _log_mean_probs(log_probs: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """``log mean(p)`` over ``dim``, in log space so that no average underflows to ``log 0``."""
    dims = (dim,) if isinstance(dim, int) else dim
    count = math.prod(log_probs.shape[d] for d in dims)
    return log_probs.logsumexp(dim) - math.log(count)


def posterior_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-slot entropy ``mean_{i,n} H(q(z_n | x_i))``: low when each slot is confident.

    In ``[0, log K]``. Adding it to the loss sharpens the posteriors towards one-hot codes.
    """
    log_q = _log_probs(logits, temperature, "posterior_entropy")
    return _entropy(log_q).mean()


def slot_average_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``mean_i H(mean_n q(z_n | x_i))``: entropy of each sample's code histogram over its slots.

    High when a sample spreads its slots over different codes; subtract it from the loss to stop
    all slots of one sample collapsing onto the same code. In ``[0, log min(N, K)]`` for one-hot
    posteriors, ``[0, log K]`` in general.
    """
    log_q = _log_probs(logits, temperature, "slot_average_entropy")
    log_slot_mean = _log_mean_probs(log_q, dim=1)  # [B, K]
    return _entropy(log_slot_mean).mean()


def batch_average_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``mean_n H(mean_i q(z_n | x_i))``: entropy of each slot's code usage over the batch.

    High when each slot uses many codes across the batch; subtract it from the loss for codebook
    usage (the diversity loss of wav2vec 2.0, Baevski et al. 2020, eq. 4, with slots as groups).
    """
    log_q = _log_probs(logits, temperature, "batch_average_entropy")
    log_batch_mean = _log_mean_probs(log_q, dim=0)  # [N, K]
    return _entropy(log_batch_mean).mean()


def entropy_diversity_loss(
    logits: torch.Tensor, gamma: float = 1.0, temperature: float = 1.0
) -> torch.Tensor:
    """LFQ entropy penalty ``E[H(q)] - gamma * H(E[q])`` (Yu et al. 2024, MAGVIT-v2, Sec. 3.1).

    A loss to minimise: confident codes per slot, diverse codes over the batch. As in LFQ, every
    (item, slot) pair is one token drawn from one shared codebook, so ``E`` runs over batch and
    slots together. For per-slot usage, use ``posterior_entropy - gamma * batch_average_entropy``.
    """
    log_q = _log_probs(logits, temperature, "entropy_diversity_loss")
    mean_entropy = _entropy(log_q).mean()
    entropy_of_mean = _entropy(_log_mean_probs(log_q, dim=(0, 1)))  # H of [K]
    return mean_entropy - gamma * entropy_of_mean


class CodeUsageKL(nn.Module):
    """``KL(u || Uniform(K))`` of code usage ``u`` tracked by an exponential moving average.

    ``forward(logits, temperature=1.0)`` pools ``q = softmax(logits / temperature)`` over batch and
    slots into the batch usage ``[K]``, forms ``u = decay * running.detach() + (1 - decay) * batch``
    (the gradient flows through the batch part only) and returns ``sum_k u_k log(u_k K)``, in
    ``[0, log K]``, a loss to minimise. In training mode it then folds the batch usage into the
    running average, which is bias-corrected for its zero start (as in Adam), so the first call
    uses the batch alone. Under data parallelism each process keeps its own running usage.
    """

    def __init__(self, codebook_size: int, decay: float = 0.99) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"CodeUsageKL codebook_size must be at least 2; got {codebook_size}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"CodeUsageKL decay must be in [0, 1); got {decay}.")
        self.codebook_size = codebook_size
        self.decay = decay
        self.register_buffer("ema", torch.zeros(codebook_size))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def running_usage(self) -> torch.Tensor:
        """Bias-corrected running usage ``[K]``; uniform before the first update."""
        correction = 1.0 - self.decay ** self.num_updates.clamp_min(1).to(self.ema.dtype)
        uniform = torch.full_like(self.ema, 1.0 / self.codebook_size)
        return torch.where(self.num_updates > 0, self.ema / correction, uniform)

    def forward(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        log_q = _log_probs(logits, temperature, "CodeUsageKL")
        if logits.shape[-1] != self.codebook_size:
            raise ValueError(
                f"CodeUsageKL was built for {self.codebook_size} codes; got logits with "
                f"{logits.shape[-1]} (shape {tuple(logits.shape)})."
            )
        batch_usage = _log_mean_probs(log_q, dim=(0, 1)).exp()  # [K]
        history_weight = (self.num_updates > 0).to(batch_usage.dtype) * self.decay
        running = self.running_usage().to(batch_usage.dtype)
        usage = history_weight * running + (1.0 - history_weight) * batch_usage  # [K]
        tiny = torch.finfo(usage.dtype).tiny
        kl = (usage * usage.clamp_min(tiny).log()).sum() + math.log(self.codebook_size)
        if self.training:
            self.update(batch_usage)
        return kl

    @torch.no_grad()
    def update(self, batch_usage: torch.Tensor) -> None:
        """Fold one batch's usage ``[K]`` into the running average."""
        self.ema.mul_(self.decay).add_(
            mean_over_ranks(batch_usage.detach().to(self.ema.dtype)), alpha=1 - self.decay
        )
        self.num_updates += 1
