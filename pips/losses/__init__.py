"""Losses of discrete latent models. Depends on torch alone."""

from pips.losses.reconstruction import cell_weights, shape_cross_entropy, weighted_cross_entropy

__all__ = ["cell_weights", "shape_cross_entropy", "weighted_cross_entropy"]
