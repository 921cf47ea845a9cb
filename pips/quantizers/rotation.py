"""The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick").

Instead of copying the gradient from the code ``q`` to the input ``e`` (straight-through), the code
is written as a rotation and rescaling of ``e``, ``q = sg[lambda R] e`` with ``lambda = ||q|| / ||e||``
and ``R`` the rotation taking ``e / ||e||`` to ``q / ||q||`` (Sec. 4.2, Eq. 4, a Householder form)::

    r = (e_hat + q_hat) / ||e_hat + q_hat||,   R = I - 2 r r^T + 2 q_hat e_hat^T

so the gradient reaching ``e`` is ``lambda R^T g``: it keeps the angle between the gradient and the
code and carries how far ``e`` sits from its code inside the Voronoi cell. ``R`` is never formed:
with ``2 r r^T = (e_hat + q_hat)(e_hat + q_hat)^T / (1 + e_hat.q_hat)``,
``lambda R^T g = alpha g + beta e + gamma q`` with per-vector scalars from five dot products. Forward and backward are one
fused autograd function together with the commitment loss, like the straight-through one.
"""

from __future__ import annotations

import torch

_EPS = 1e-8


class _RotationWithCommitment(torch.autograd.Function):
    """Forward: ``(codes, mean((inputs - codes)^2))``, the first output exactly ``codes``.
    Backward: ``lambda R^T g`` to ``inputs`` from the first output plus ``2 (inputs - codes) / numel``
    from the second; ``codes`` gets no gradient."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, codes: torch.Tensor):
        difference = inputs - codes
        ctx.save_for_backward(inputs, codes)
        flat_difference = difference.reshape(-1)
        commitment = torch.dot(flat_difference, flat_difference) / flat_difference.numel()
        return codes.view_as(codes), commitment

    @staticmethod
    def backward(ctx, grad_quantized: torch.Tensor | None, grad_commitment: torch.Tensor | None):
        inputs, codes = ctx.saved_tensors
        # lambda R^T g + k (e - q) as alpha g + beta e + gamma q, with per-vector scalars from five
        # dot products: fewer passes over [N, dim] than forming r, e_hat and q_hat (see module doc).
        commitment_scale = (
            0.0 if grad_commitment is None else grad_commitment * (2.0 / inputs.numel())
        )
        if grad_quantized is None:
            return (inputs - codes) * commitment_scale, None
        g = grad_quantized
        input_norm = _row_dot(inputs, inputs).sqrt().clamp_min(_EPS)  # [..., 1]
        code_norm = _row_dot(codes, codes).sqrt().clamp_min(_EPS)
        cosine = _row_dot(inputs, codes) / (input_norm * code_norm)  # e_hat . q_hat
        input_dot = _row_dot(inputs, g) / input_norm  # e_hat . g
        code_dot = _row_dot(codes, g) / code_norm  # q_hat . g
        # R^T g = g - (e_hat + q_hat) (e_hat.g + q_hat.g) / (1 + cos) + 2 e_hat (q_hat.g)
        shared = (input_dot + code_dot) / (1 + cosine).clamp_min(_EPS)
        scale = code_norm / input_norm  # lambda
        beta = scale * (2 * code_dot - shared) / input_norm + commitment_scale
        gamma = -scale * shared / code_norm - commitment_scale
        grad = torch.addcmul(g * scale, inputs, beta)
        return grad.addcmul_(codes, gamma), None


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dot products of matching vectors, ``[..., dim] x [..., dim] -> [..., 1]``."""
    return torch.linalg.vecdot(x, y).unsqueeze(-1)


def rotation_trick_with_commitment(
    inputs: torch.Tensor, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantized, commitment)`` like
    :func:`~pips.quantizers.base.straight_through_with_commitment`, but the gradient of
    ``quantized`` reaches ``inputs`` through the rotation trick: ``quantized`` equals ``codes``
    exactly, its gradient to ``inputs [..., dim]`` is ``(||q|| / ||e||) R^T g`` per vector."""
    return _RotationWithCommitment.apply(inputs, codes.detach())
