"""StableMax cross-entropy (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", Sec. 5).

Softmax Collapse: once a correct logit leads the others by enough, ``softmax`` rounds to exactly
one in floating point, the cross-entropy's gradient is exactly zero and learning stops (absorption
errors, Sec. 4). StableMax replaces ``exp`` by a function that grows linearly for ``x >= 0`` and
decays as ``1 / (1 - x)`` for ``x < 0`` (Eq. 7)::

    s(x) = x + 1 (x >= 0),    1 / (1 - x) (x < 0),    StableMax(x)_i = s(x_i) / sum_j s(x_j)

so probabilities reach one only polynomially. As in the authors' code the loss is computed in
float64; logits that arrive in half precision (mixed precision on an accelerator) are computed
in float32 instead.
"""

from __future__ import annotations

import torch


def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    """``s(x)``: ``x + 1`` for ``x >= 0``, ``1 / (1 - x)`` for ``x < 0`` (continuous, ``s(0) = 1``)."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp_max(0)))


def stablemax_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float32/float64 logits; float32 for half-precision (mixed precision) logits."""
    return torch.float64 if logits.dtype in (torch.float32, torch.float64) else torch.float32


def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log StableMax(logits)`` along ``dim``, in :func:`stablemax_dtype` precision."""
    s = stablemax_s(logits.to(stablemax_dtype(logits)))
    return s.log() - s.sum(dim, keepdim=True).log()


def stablemax_cross_entropy(
    logits: torch.Tensor,  # [N, V]
    targets: torch.Tensor,  # [N]
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean ``-log StableMax(logits)[target]`` (with optional label smoothing), a float32 scalar."""
    log_probs = log_stablemax(logits)  # [N, V]
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    if label_smoothing > 0:
        nll = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)
    return nll.mean().float()
