"""Code tokenisation for the prior: index splits along the quantizer's factors, layouts' order."""

import itertools
import math

import numpy as np
import pytest
import torch

from pips.models.code_tokens import IndexSplit, PooledLayout, SpatialLayout
from pips.quantizers.fsq import FSQ
from pips.quantizers.gumbel import GumbelQuantizer
from pips.quantizers.lfq import LFQ
from pips.quantizers.vq import VectorQuantizer


def _check_round_trip(split: IndexSplit, indices: np.ndarray, codebook_size: int):
    parts = split.split(indices)
    assert parts.shape == (*indices.shape, split.num_parts)
    assert (parts >= 0).all() and (parts < np.array(split.part_sizes)).all()
    assert max(split.part_sizes) <= 2**16 or split.part_sizes == [codebook_size]
    assert (split.join(parts) == indices).all()


def test_split_round_trips_every_code_of_small_fsq_levels():
    quantizer = FSQ([8, 5, 5, 5])
    split = IndexSplit.for_quantizer(quantizer, limit=64)  # forces a split: 8*5 | 5*5 ... groups
    assert math.prod(split.part_sizes) == quantizer.codebook_size
    every_code = np.arange(quantizer.codebook_size)
    _check_round_trip(split, every_code, quantizer.codebook_size)
    assert len({tuple(p) for p in split.split(every_code)}) == quantizer.codebook_size


def test_split_parts_are_the_quantizers_own_digits():
    quantizer = FSQ([8] * 8)  # the demo's 8^8 codes: two parts of 8^4 = 4,096
    split = IndexSplit.for_quantizer(quantizer)
    assert split.part_sizes == [4096, 4096]
    indices = np.random.default_rng(0).integers(0, 8**8, size=10_000)
    _check_round_trip(split, indices, 8**8)
    digits = quantizer.indices_to_codes(torch.as_tensor(indices))  # channels, in [-1, 1]
    digits = (digits * 4).round().long().numpy() + 4  # [N, 8] in [0, 8)
    first = (digits[:, :4] * 8 ** np.arange(4)).sum(-1)
    assert (split.split(indices)[:, 0] == first).all()


@pytest.mark.parametrize(
    "quantizer",
    [
        GumbelQuantizer(4, 2**48, factors=3),  # the pooled preset's product codes
        LFQ(20),
        VectorQuantizer(4, 100_000),  # not a product: split into base-2^16 digits
    ],
    ids=["gumbel-2^48", "lfq-20-bits", "vq-100k"],
)
def test_split_round_trips_random_large_codes(quantizer):
    split = IndexSplit.for_quantizer(quantizer)
    indices = np.random.default_rng(1).integers(0, quantizer.codebook_size, size=10_000)
    indices[:2] = [0, quantizer.codebook_size - 1]
    _check_round_trip(split, indices, quantizer.codebook_size)
    assert all(size <= 2**16 for size in split.part_sizes)


def test_split_of_a_small_codebook_is_one_token():
    assert IndexSplit.for_quantizer(FSQ([8, 5, 5, 5])).part_sizes == [1000]


def test_pooled_layout_puts_slots_then_levels_then_parts():
    split = IndexSplit([(4, 1), (4, 4)], limit=4)  # 16 codes as two parts of 4
    layout = PooledLayout(num_slots=2, split=split, levels=2)
    codes = np.array([[1, 14], [7, 0]])  # [N, S]
    # slot 0 level 0: 1 -> (1, 0); level 1: 14 -> (2, 3); slot 1: 7 -> (3, 1), 0 -> (0, 0);
    # part 1's ids are offset by part 0's 4 values
    assert layout.tokens(codes).tolist() == [1, 4, 2, 7, 3, 5, 0, 4]
    assert (layout.codes(layout.tokens(codes)) == codes).all()
    tokens = layout.batch([codes])
    assert layout.capacity_bits(tokens).item() == pytest.approx(2 * 2 * math.log2(16))


def test_spatial_layout_writes_size_then_raster_then_end():
    split = IndexSplit([(5, 1)])
    layout = SpatialLayout(max_rows=3, max_cols=4, split=split)
    codes = np.array([[0, 1, 2], [3, 4, 0]])  # a 2 x 3 code map
    tokens = layout.tokens(codes)
    offset = 3 + 4
    assert tokens.tolist() == [1, 3 + 2] + [offset + c for c in [0, 1, 2, 3, 4, 0]] + [12]
    assert layout.vocab_size == 13 and layout.end_id == 12
    assert (layout.codes(tokens) == codes).all()


def test_sequences_round_trip_through_a_padded_batch():
    rng = np.random.default_rng(2)
    split = IndexSplit.for_quantizer(FSQ([8] * 8))
    layout = SpatialLayout(max_rows=4, max_cols=5, split=split, levels=2)
    items = [rng.integers(0, 8**8, size=(r, c, 2)) for r, c in itertools.product([1, 4], [2, 5])]
    batch = layout.batch(items)  # [B, T] padded with the end id
    assert batch.shape == (len(items), 3 + 4 * 5 * 2 * 2)
    lengths = layout.lengths(batch)
    for row, item in zip(batch.numpy(), items, strict=True):
        assert (layout.codes(row) == item).all()
    assert lengths.tolist() == [3 + item.size * 2 for item in items]
    expected = [math.log2(4) + math.log2(5) + item.size * 24 for item in items]
    assert layout.capacity_bits(batch).tolist() == pytest.approx(expected)


def test_spatial_layout_allows_one_field_per_position():
    layout = SpatialLayout(max_rows=2, max_cols=2, split=IndexSplit([(3, 1)]))
    tokens = layout.batch([np.array([[2]])])  # [1, 0+2, 4+2, end] then padding
    low, high = layout.allowed(tokens, torch.arange(tokens.shape[1]))
    assert low[0].tolist() == [0, 2, 4, 7] + [7] * (tokens.shape[1] - 4)
    assert high[0].tolist() == [2, 4, 7, 8] + [8] * (tokens.shape[1] - 4)


def test_index_factors_are_how_the_quantizers_form_their_indices():
    rng = np.random.default_rng(3)
    fsq = FSQ([8, 5, 3])
    digits = np.stack([rng.integers(0, level, 100) for level in fsq.levels], -1)  # [100, 3]
    index = sum(digits[:, i] * w for i, (_, w) in enumerate(fsq.index_factors))
    codes = fsq.indices_to_codes(torch.as_tensor(index))  # channel values in [-1, 1]
    half = torch.tensor([4.0, 2.0, 1.0])
    assert ((codes * half).round() + half).long().numpy().tolist() == digits.tolist()
    gumbel = GumbelQuantizer(4, 16**3, factors=3)
    digits = torch.as_tensor(rng.integers(0, 16, (100, 3)))
    index = sum(digits[:, i] * w for i, (_, w) in enumerate(gumbel.index_factors))
    assert torch.equal(gumbel._combine(digits), index)
    assert [r for r, _ in LFQ(5).index_factors] == [2] * 5
