"""Input masking: only colour cells become MASK, at the requested rate, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pips.data import VOCAB, collate_grids
from pips.data.masking import mask_cells


def _batch(eos: bool = True, seed: int = 0):
    """Grids of mixed sizes on one canvas, so the batch has PAD (and EOS) slots."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5, 5), (2, 7), (6, 3), (1, 1), (7, 7)]
    return collate_grids([rng.integers(0, 10, size=shape) for shape in shapes], eos=eos)


@pytest.mark.parametrize("eos", [True, False])
def test_masking_never_touches_pad_or_eos(eos):
    batch = _batch(eos)
    generator = torch.Generator().manual_seed(0)
    special = ~batch.grid_mask
    assert special.any()
    for _ in range(20):
        masked = mask_cells(batch, 1.0, generator)
        assert torch.equal(masked.tokens[special], batch.tokens[special])
        hidden = masked.tokens != batch.tokens
        assert not (hidden & special).any()
        assert (masked.tokens[hidden] == VOCAB.mask_id).all()
    assert torch.equal(masked.pad_mask, batch.pad_mask)
    assert torch.equal(masked.shapes, batch.shapes)


def test_masked_fraction_is_half_the_maximum_on_average():
    batch = _batch()
    generator = torch.Generator().manual_seed(1)
    cells = batch.grid_mask.sum()
    fractions = torch.stack(
        [
            (mask_cells(batch, 0.6, generator).tokens == VOCAB.mask_id).sum() / cells
            for _ in range(400)
        ]
    )
    # the per-batch rate is uniform in [0, 0.6]: mean 0.3, and no batch exceeds 0.6 by much
    assert fractions.mean().item() == pytest.approx(0.3, abs=0.03)
    assert fractions.max().item() < 0.75
    assert fractions.min().item() < 0.1


def test_masking_returns_a_new_batch_and_leaves_the_original_alone():
    batch = _batch()
    before = batch.tokens.clone()
    masked = mask_cells(batch, 1.0, torch.Generator().manual_seed(2))
    assert masked is not batch
    assert torch.equal(batch.tokens, before)
    assert (masked.tokens == VOCAB.mask_id).any()


def test_zero_ratio_returns_the_batch_and_draws_no_random_numbers():
    batch = _batch()
    state = torch.get_rng_state()
    assert mask_cells(batch, 0.0) is batch
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_masks_the_same_cells():
    batch = _batch()
    first = mask_cells(batch, 0.5, torch.Generator().manual_seed(3))
    second = mask_cells(batch, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(first.tokens, second.tokens)


def test_ratio_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="max_fraction"):
        mask_cells(_batch(), 1.5)
