"""Reconstruction losses of grid cells and grid sizes.

The cell loss is a weighted cross-entropy over the canvas: the grid's colour cells weigh 1 and
PAD/EOS slots weigh ``pad_weight`` (0 ignores them), with optional focal modulation
(Lin et al. 2017, eq. 5: ``(1 - p_t)^gamma * CE``) and label smoothing. The size loss is the
cross-entropy of the height and width classes (class ``h - 1`` for height ``h``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pips.losses.stablemax import log_stablemax


def cell_weights(grid_mask: torch.Tensor, pad_weight: float) -> torch.Tensor:
    """[B, L] weights: 1 on colour cells, ``pad_weight`` on PAD/EOS slots."""
    weights = torch.full(grid_mask.shape, pad_weight, device=grid_mask.device)
    return weights.masked_fill(grid_mask, 1.0)


def weighted_cross_entropy(
    logits: torch.Tensor,  # [B, L, V]
    targets: torch.Tensor,  # [B, L]
    weights: torch.Tensor,  # [B, L]
    focal_gamma: float = 0.0,
    label_smoothing: float = 0.0,
    stablemax: bool = False,
) -> torch.Tensor:
    """Weighted mean of the (focal, label-smoothed) cross-entropy per cell; a scalar. With
    ``stablemax`` the probabilities are StableMax's (:mod:`pips.losses.stablemax`), in float64."""
    if stablemax:
        log_probs = log_stablemax(logits)  # [B, L, V]
    else:
        log_probs = logits.float().log_softmax(dim=-1)  # [B, L, V]
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L]
    if label_smoothing > 0:
        nll = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)
    if focal_gamma > 0:
        target_prob = (
            (-nll).exp()
            if label_smoothing == 0
            else log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
        )
        nll = (1 - target_prob).pow(focal_gamma) * nll
    return ((nll * weights).sum() / weights.sum().clamp_min(1e-8)).float()


def shape_cross_entropy(
    height_logits: torch.Tensor,  # [B, 30]
    width_logits: torch.Tensor,  # [B, 30]
    shapes: torch.Tensor,  # [B, 2] (height, width)
) -> torch.Tensor:
    """Cross-entropy of the height class plus that of the width class, averaged over grids."""
    return F.cross_entropy(height_logits.float(), shapes[:, 0] - 1) + F.cross_entropy(
        width_logits.float(), shapes[:, 1] - 1
    )
