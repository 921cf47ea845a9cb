"""Every registered quantizer honours the Quantizer contract (DESIGN.md, 'Contracts')."""

from __future__ import annotations

import pytest
import torch

from pips.quantizers import QUANTIZERS, IdentityQuantizer, QuantizerOutput

DIM = 8
SMALL_KWARGS = {
    "gumbel": {"dim": DIM, "codebook_size": 16},
    "vq": {"dim": DIM, "codebook_size": 16},
    "rvq": {"dim": DIM, "codebook_size": 16, "num_stages": 3},
    "gvq": {"dim": DIM, "codebook_size": 16, "groups": 2},
    "fsq": {"levels": [8, 5, 3], "dim": DIM},
    "lfq": {"dim": DIM},
    "simvq": {"dim": DIM, "codebook_size": 16},
    "product_vq": {"dim": DIM, "levels": [4, 8]},
    "residual_fsq": {"levels": [5, 3], "num_stages": 3, "dim": DIM},
    "radial": {"dim": DIM, "base": 4, "codebook_size": 64},
    "none": {"dim": DIM},
}
SCHEDULE_VALUES = {"temperature": 0.7, "hardness": 0.5, "noise_scale": 1.0}


def test_registry_names_every_kind():
    kinds = {"gumbel", "vq", "rvq", "gvq", "fsq", "lfq", "simvq", "product_vq", "residual_fsq"}
    assert set(QUANTIZERS) == kinds | {"radial", "none"} == set(SMALL_KWARGS)


@pytest.mark.parametrize("kind", sorted(SMALL_KWARGS))
def test_forward_contract_and_decoding(kind):
    torch.manual_seed(0)
    quantizer = QUANTIZERS[kind](**SMALL_KWARGS[kind])
    z = torch.randn(3, 5, DIM, requires_grad=True)
    out = quantizer(z, **SCHEDULE_VALUES)  # each uses the schedule values it knows
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.loss.shape == ()
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    if kind == "none":
        assert out.indices is None and out.stats == {}
        with pytest.raises(NotImplementedError, match="no codebook"):
            quantizer.codes_to_quantized(torch.zeros(3, dtype=torch.long))
        return
    assert {"perplexity", "used_codes"} <= set(out.stats)
    assert all(value.dim() == 0 and not value.requires_grad for value in out.stats.values())
    levels = {"rvq": (3,), "gvq": (2,), "residual_fsq": (3,)}.get(kind, ())
    assert out.indices.shape == (3, 5, *levels) and out.indices.dtype == torch.long
    assert quantizer.codebook_size > 1
    quantizer.eval()
    out = quantizer(z, **SCHEDULE_VALUES)
    torch.testing.assert_close(quantizer.codes_to_quantized(out.indices), out.quantized)


@pytest.mark.parametrize("kind", sorted(SMALL_KWARGS))
def test_runs_under_bfloat16_autocast(kind):
    quantizer = QUANTIZERS[kind](**SMALL_KWARGS[kind])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = quantizer(torch.randn(4, DIM), **SCHEDULE_VALUES)
    assert torch.isfinite(out.quantized.float()).all() and torch.isfinite(out.loss)


def test_identity_passes_input_through():
    z = torch.randn(2, 3, DIM)
    out = IdentityQuantizer()(z)
    assert out.quantized is z and out.loss == 0 and out.logits is None


def test_fused_straight_through_matches_the_two_line_reference():
    from pips.quantizers.base import straight_through_with_commitment

    inputs = torch.randn(6, 5, requires_grad=True)
    codes = torch.randn(6, 5, requires_grad=True)
    upstream = torch.randn(6, 5)
    quantized, commitment = straight_through_with_commitment(inputs, codes)
    assert torch.equal(quantized, codes.detach())  # the value is exactly the code
    grads = torch.autograd.grad((quantized * upstream).sum() + 3 * commitment, inputs)

    reference_quantized = codes.detach() + (inputs - inputs.detach())
    reference_commitment = torch.nn.functional.mse_loss(inputs, codes.detach())
    torch.testing.assert_close(commitment, reference_commitment)
    reference = torch.autograd.grad(
        (reference_quantized * upstream).sum() + 3 * reference_commitment, inputs
    )
    torch.testing.assert_close(grads[0], reference[0])
    (only_quantized,) = torch.autograd.grad(
        straight_through_with_commitment(inputs, codes)[0].sum(), inputs
    )
    torch.testing.assert_close(only_quantized, torch.ones(6, 5))


@pytest.mark.parametrize("kind", sorted(SMALL_KWARGS))
def test_a_misspelled_schedule_value_is_refused_not_ignored(kind):
    quantizer = QUANTIZERS[kind](**SMALL_KWARGS[kind])
    with pytest.raises(TypeError, match="unknown schedule value.*temprature"):
        quantizer(torch.randn(4, DIM), temprature=0.5)


@pytest.mark.parametrize("kind", sorted(set(SMALL_KWARGS) - {"none"}))
def test_bits_per_code_counts_every_index_of_a_vector(kind):
    import math

    quantizer = QUANTIZERS[kind](**SMALL_KWARGS[kind]).eval()
    indices = quantizer(torch.randn(2, DIM)).indices
    levels = indices.shape[-1] if indices.dim() == 2 else 1
    assert quantizer.bits_per_code == pytest.approx(levels * math.log2(quantizer.codebook_size))
