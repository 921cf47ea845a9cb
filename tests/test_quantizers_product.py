"""Product VQ: each chunk's nearest code in its own codebook, one mixed-radix index per vector."""

from __future__ import annotations

import pytest
import torch

from pips.quantizers import ProductVQ


def brute_force_product_index(z: torch.Tensor, codebooks: list[torch.Tensor], levels: list[int]):
    """Loop over vectors and chunks: the nearest code of each chunk, digits combined in mixed
    radix (first chunk least significant)."""
    sizes = [codebook.shape[1] for codebook in codebooks]
    indices = []
    for vector in z:
        index, radix, start = 0, 1, 0
        for codebook, size, level in zip(codebooks, sizes, levels, strict=True):
            chunk = vector[start : start + size]
            digit = int(((codebook - chunk) ** 2).sum(-1).argmin())
            index += digit * radix
            radix *= level
            start += size
        indices.append(index)
    return torch.tensor(indices)


@pytest.mark.parametrize("dim", [12, 13])  # even chunks, and uneven ones (5, 4, 4)
def test_product_index_is_the_mixed_radix_of_each_chunks_nearest_code(dim):
    torch.manual_seed(0)
    levels = [4, 8, 3]
    pvq = ProductVQ(dim, levels=levels).eval()
    assert pvq.codebook_size == 96 and [len(vq.codebook) for vq in pvq.chunks] == levels
    z = torch.randn(50, dim)
    out = pvq(z)
    expected = brute_force_product_index(z, [vq.codebook for vq in pvq.chunks], levels)
    assert torch.equal(out.indices, expected)
    assert torch.equal(pvq.codes_to_quantized(out.indices), out.quantized)
    assert out.indices.max() < 96


def test_shared_codebook_is_one_codebook_of_base_codes_for_every_chunk():
    torch.manual_seed(0)
    pvq = ProductVQ(12, shared_codebook=True, base=5, num_chunks=3).eval()
    assert len(pvq.chunks) == 1 and pvq.codebook_size == 125
    z = torch.randn(40, 12)
    out = pvq(z)
    codebook = pvq.chunks[0].codebook
    expected = brute_force_product_index(z, [codebook] * 3, [5, 5, 5])
    assert torch.equal(out.indices, expected)
    assert torch.equal(pvq.codes_to_quantized(out.indices), out.quantized)


def test_product_vq_trains_every_chunk_from_data_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    pvq = ProductVQ(8, levels=[16, 16])
    z = (0.01 * torch.randn(256, 8)).requires_grad_()
    out = pvq(z)  # first batch: codes sampled from each chunk's inputs
    assert out.stats["used_codes"] > 100 and {"dead_codes", "chunk_perplexity"} <= set(out.stats)
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    torch.testing.assert_close(grad, torch.ones_like(z))


def test_product_vq_argument_errors_are_sentences():
    with pytest.raises(ValueError, match="needs base >= 2 codes and num_chunks >= 1"):
        ProductVQ(8, shared_codebook=True)
    with pytest.raises(ValueError, match="levels must be a non-empty list"):
        ProductVQ(8, levels=[])
    with pytest.raises(ValueError, match="dim must be divisible by the number of chunks"):
        ProductVQ(10, shared_codebook=True, base=4, num_chunks=3)
