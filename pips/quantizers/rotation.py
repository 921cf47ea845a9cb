"""The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick").

Instead of copying the gradient from the code ``q`` to the input ``e`` (straight-through), the code
is written as a rotation and rescaling of ``e``, ``q = sg[lambda R] e`` with ``lambda = ||q|| / ||e||``
and ``R`` the rotation taking ``e / ||e||`` to ``q / ||q||`` (Sec. 4.2, Eq. 4, a Householder form)::

    r = (e_hat + q_hat) / ||e_hat + q_hat||,   R = I - 2 r r^T + 2 q_hat e_hat^T

so the gradient reaching ``e`` is ``lambda R^T g``: it keeps the angle between the gradient and the
code and carries how far ``e`` sits from its code inside the Voronoi cell. ``R`` is never formed:
``R^T g = g - 2 r (r.g) + 2 e_hat (q_hat.g)``, ``O(dim)`` per vector. Forward and backward are one
fused autograd function together with the commitment loss, like the straight-through one.
"""

from __future__ import annotations

import torch

_EPS = 1e-8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


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
        grad = torch.zeros_like(inputs)
        if grad_quantized is not None:
            input_norm = inputs.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # [..., 1]
            code_norm = codes.norm(dim=-1, keepdim=True)
            input_unit, code_unit = inputs / input_norm, _unit(codes)
            r = _unit(input_unit + code_unit)  # [..., dim]
            r_dot = (r * grad_quantized).sum(-1, keepdim=True)
            code_dot = (code_unit * grad_quantized).sum(-1, keepdim=True)
            rotated = grad_quantized - 2 * r * r_dot + 2 * input_unit * code_dot  # R^T g
            grad = rotated * (code_norm / input_norm)
        if grad_commitment is not None:
            scale = grad_commitment * (2.0 / inputs.numel())
            grad = torch.addcmul(grad, inputs - codes, scale)
        return grad, None


def rotation_trick_with_commitment(
    inputs: torch.Tensor, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantized, commitment)`` like
    :func:`~pips.quantizers.base.straight_through_with_commitment`, but the gradient of
    ``quantized`` reaches ``inputs`` through the rotation trick: ``quantized`` equals ``codes``
    exactly, its gradient to ``inputs [..., dim]`` is ``(||q|| / ||e||) R^T g`` per vector."""
    return _RotationWithCommitment.apply(inputs, codes.detach())
