"""Losses of discrete latent models. Depends on torch alone.

Each function documents its formula and the shapes it takes: logits ``[B, N, K]`` (batch, latent
slots, codes) unless said otherwise.
"""

from pips.losses.decomposition import (
    KLDecomposition,
    SlotMarginalEMA,
    decompose_kl,
    minibatch_log_weights,
)
from pips.losses.diversity import (
    CodeUsageKL,
    batch_average_entropy,
    entropy_diversity_loss,
    posterior_entropy,
    slot_average_entropy,
)
from pips.losses.kl import (
    exp_concrete_log_prob,
    kl_to_uniform,
    monte_carlo_kl_to_uniform,
    sample_exp_concrete,
)
from pips.losses.pixels import (
    PIXEL_LOSSES,
    PSNR,
    logit_laplace_mean,
    logit_laplace_nll,
    map_pixels,
    pixel_loss,
    psnr,
    unmap_pixels,
)
from pips.losses.reconstruction import cell_weights, shape_cross_entropy, weighted_cross_entropy
from pips.losses.stablemax import log_stablemax, stablemax_cross_entropy, stablemax_s

__all__ = [
    "CodeUsageKL",
    "KLDecomposition",
    "PIXEL_LOSSES",
    "PSNR",
    "SlotMarginalEMA",
    "batch_average_entropy",
    "cell_weights",
    "decompose_kl",
    "entropy_diversity_loss",
    "exp_concrete_log_prob",
    "kl_to_uniform",
    "log_stablemax",
    "logit_laplace_mean",
    "logit_laplace_nll",
    "map_pixels",
    "minibatch_log_weights",
    "monte_carlo_kl_to_uniform",
    "pixel_loss",
    "posterior_entropy",
    "psnr",
    "sample_exp_concrete",
    "shape_cross_entropy",
    "slot_average_entropy",
    "stablemax_cross_entropy",
    "stablemax_s",
    "unmap_pixels",
    "weighted_cross_entropy",
]
