"""Pixel reconstruction losses and PSNR for images in ``[0, 1]``.

Shapes: predictions, ``mu``, ``log_scale`` and targets are ``[B, C, H, W]`` (any shape works as
long as they match); every loss is the mean over all elements, a scalar.

- ``l2``: ``mean((x_hat - x)^2)``; ``l1``: ``mean(|x_hat - x|)``. ``params`` is ``x_hat``.
- ``logit_laplace`` (DALL-E, Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", section
  on the logit-Laplace distribution): pixels are squeezed away from 0 and 1 by
  ``y = (1 - 2 eps) x + eps`` with ``eps = 0.1``, and ``y`` has the density of a Laplace
  distribution in logit space::

      f(y | mu, b) = 1 / (2 b y (1 - y)) * exp(-|logit(y) - mu| / b)

  where ``1 / (y (1 - y))`` is the Jacobian of ``logit``. The loss is the negative log-density
  in nats per sub-pixel, with ``b = exp(log_scale)``::

      nll = log 2 + log_scale + log y + log(1 - y) + |logit(y) - mu| * exp(-log_scale)

  ``params`` is the pair ``(mu, log_scale)``. It is a density of ``y``: the density of ``x``
  adds the constant ``-log(1 - 2 eps)``, which changes no gradient. A continuous density on
  8-bit data can fall below zero and without bound when ``b -> 0``; a model should floor
  ``log_scale`` (:class:`~pips.models.image_ae.ImageAutoencoder` floors it at -7).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

PIXEL_LOSSES = ("l2", "l1", "logit_laplace")
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """``x in [0, 1] -> y = (1 - 2 eps) x + eps in [eps, 1 - eps]`` (DALL-E's ``map_pixels``)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(y: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """``y -> clamp((y - eps) / (1 - 2 eps), 0, 1)``, the inverse of :func:`map_pixels`."""
    return ((y - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def logit_laplace_nll(
    mu: torch.Tensor,
    log_scale: torch.Tensor,
    target: torch.Tensor,
    eps: float = LOGIT_LAPLACE_EPS,
) -> torch.Tensor:
    """Per-element negative log-density (nats) of the target pixels ``x in [0, 1]``:
    ``log 2 + log_scale + log y + log(1 - y) + |logit(y) - mu| exp(-log_scale)`` with
    ``y = (1 - 2 eps) x + eps``. All three tensors have one shape; so has the result."""
    y = map_pixels(target.float(), eps)
    mu, log_scale = mu.float(), log_scale.float()
    logit = torch.log(y) - torch.log1p(-y)
    return (
        math.log(2.0)
        + log_scale
        + torch.log(y)
        + torch.log1p(-y)
        + (logit - mu).abs() * torch.exp(-log_scale)
    )


def logit_laplace_mean(mu: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """The pixels a logit-Laplace decoder reconstructs: ``clamp((sigmoid(mu) - eps) / (1 - 2 eps),
    0, 1)``, as DALL-E decodes (``unmap_pixels(sigmoid(mu))``). ``sigmoid(mu)`` is the median of
    ``y`` (logit is monotone and ``mu`` is the Laplace's median); the mean has no closed form."""
    return unmap_pixels(torch.sigmoid(mu.float()), eps)


def pixel_loss(
    kind: str,
    params: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    target: torch.Tensor,
) -> torch.Tensor:
    """The scalar pixel loss ``kind`` (``l2``, ``l1`` or ``logit_laplace``) of ``target``
    ``[B, C, H, W]`` in ``[0, 1]``; ``params`` is the prediction (same shape) for ``l2``/``l1``
    and ``(mu, log_scale)`` for ``logit_laplace``. Mean over every element."""
    if kind == "logit_laplace":
        if not isinstance(params, tuple | list) or len(params) != 2:
            raise ValueError(
                "pixel loss logit_laplace takes params (mu, log_scale); got a single tensor, "
                "so build the model with images.reconstruction=logit_laplace"
            )
        mu, log_scale = params
        return logit_laplace_nll(mu, log_scale, target).mean()
    if kind not in ("l2", "l1"):
        raise ValueError(f"pixel loss {kind!r} is unknown; use one of {', '.join(PIXEL_LOSSES)}")
    if isinstance(params, tuple | list):
        raise ValueError(
            f"pixel loss {kind} takes one prediction tensor; got a tuple of {len(params)}, so "
            f"build the model with images.reconstruction={kind}"
        )
    if kind == "l2":
        return F.mse_loss(params.float(), target.float())
    return F.l1_loss(params.float(), target.float())


class PSNR(NamedTuple):
    per_image: torch.Tensor  # [B] dB
    mean: torch.Tensor  # scalar dB, the mean of per_image


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, max_value: float = 1.0) -> PSNR:
    """Peak signal-to-noise ratio in dB of each image ``[B, C, H, W]`` (or ``[B, ...]``):
    ``10 log10(max_value^2 / MSE_b)`` with ``MSE_b`` the mean squared error over the image's
    channels and pixels (floored at 1e-10, so an exact copy scores ``10 log10(max^2) + 100``).
    ``mean`` averages the per-image values (not the PSNR of the mean MSE)."""
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"psnr needs matching shapes; got {tuple(reconstruction.shape)} and "
            f"{tuple(target.shape)}"
        )
    error = (reconstruction.float() - target.float()).pow(2).flatten(1).mean(1)  # [B]
    per_image = 10.0 * torch.log10(max_value**2 / error.clamp_min(1e-10))
    return PSNR(per_image, per_image.mean())
