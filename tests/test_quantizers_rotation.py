"""The rotation trick (Fifty et al. 2024) against its Householder formula, differentiated by autograd."""

from __future__ import annotations

import pytest
import torch

from pips.quantizers import ResidualVQ, VectorQuantizer
from pips.quantizers.rotation import rotation_trick_with_commitment


def reference_rotation(inputs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``sg[lambda R] e`` with the explicit ``[N, dim, dim]`` matrices of Sec. 4.2:
    ``R = I - 2 r r^T + 2 q_hat e_hat^T``, ``r = (e_hat + q_hat) / ||e_hat + q_hat||``,
    ``lambda = ||q|| / ||e||``."""
    e, q = inputs.detach(), codes.detach()
    e_hat = e / e.norm(dim=-1, keepdim=True)
    q_hat = q / q.norm(dim=-1, keepdim=True)
    r = (e_hat + q_hat) / (e_hat + q_hat).norm(dim=-1, keepdim=True)
    eye = torch.eye(e.shape[-1], dtype=e.dtype).expand(e.shape[0], -1, -1)
    rotation = (
        eye - 2 * r.unsqueeze(-1) * r.unsqueeze(-2) + 2 * q_hat.unsqueeze(-1) * e_hat.unsqueeze(-2)
    )
    scale = q.norm(dim=-1) / e.norm(dim=-1)
    return scale[:, None] * torch.einsum("nij,nj->ni", rotation, inputs)


def test_rotation_maps_the_input_onto_the_code_and_its_gradient_is_lambda_r_transpose():
    torch.manual_seed(0)
    inputs = torch.randn(32, 6, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(32, 6, dtype=torch.float64)
    upstream = torch.randn(32, 6, dtype=torch.float64)
    quantized, commitment = rotation_trick_with_commitment(inputs, codes)
    assert torch.equal(quantized, codes)  # the forward value is exactly the code
    reference = reference_rotation(inputs, codes)
    torch.testing.assert_close(reference, codes)  # the formula's R e lands on the code too
    (grad,) = torch.autograd.grad((quantized * upstream).sum() + 3 * commitment, inputs)
    reference_commitment = (inputs - codes).pow(2).mean()
    (expected,) = torch.autograd.grad(
        (reference * upstream).sum() + 3 * reference_commitment, inputs
    )
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(commitment, reference_commitment)


def test_rotation_gradient_keeps_its_norm_times_the_norm_ratio():
    torch.manual_seed(1)
    inputs = torch.randn(10, 5, requires_grad=True)
    codes = 3 * torch.randn(10, 5)
    upstream = torch.randn(10, 5)
    quantized, _ = rotation_trick_with_commitment(inputs, codes)
    (grad,) = torch.autograd.grad((quantized * upstream).sum(), inputs)
    ratio = codes.norm(dim=-1) / inputs.detach().norm(dim=-1)
    torch.testing.assert_close(grad.norm(dim=-1), upstream.norm(dim=-1) * ratio)  # R is orthogonal
    assert not torch.allclose(grad, upstream)  # not straight-through


@pytest.mark.parametrize(
    "make",
    [
        lambda: VectorQuantizer(6, 16, rotation_trick=True),
        lambda: VectorQuantizer(6, 16, rotation_trick=True, num_codebooks=2),
        lambda: ResidualVQ(6, 16, num_stages=3, rotation_trick=True),
    ],
)
def test_quantizers_with_the_rotation_trick_output_codes_and_rotated_gradients(make):
    torch.manual_seed(0)
    quantizer = make()
    shape = (40, 2, 6) if getattr(quantizer, "num_codebooks", 1) == 2 else (40, 6)
    quantizer(torch.randn(shape))  # initialise the codes from data
    quantizer.eval()
    z = torch.randn(shape, dtype=torch.float32, requires_grad=True)
    upstream = torch.randn(shape)
    out = quantizer(z)
    codes = quantizer.codes_to_quantized(out.indices)
    assert torch.equal(out.quantized, codes)
    (grad,) = torch.autograd.grad((out.quantized * upstream).sum(), z)
    flat_z, flat_codes = z.reshape(-1, 6), codes.reshape(-1, 6)
    (expected,) = torch.autograd.grad(
        (reference_rotation(flat_z, flat_codes) * upstream.reshape(-1, 6)).sum(), z
    )
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
