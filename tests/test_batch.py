"""Grids <-> token sequences <-> batches: round trips, EOS placement, masks, canvas size."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pips.data.batch import batch_to_grids, collate_grids, flatten_grid, unflatten_grid
from pips.data.vocab import MAX_GRID_SIZE, VOCAB

sides = st.integers(1, MAX_GRID_SIZE)
seeds = st.integers(0, 2**32 - 1)


def random_grid(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, VOCAB.num_colours, size=(height, width))


@pytest.mark.parametrize("eos", [True, False])
def test_flatten_unflatten_round_trips_for_every_grid_size(eos):
    rng = np.random.default_rng(0)
    for height in range(1, MAX_GRID_SIZE + 1):
        for width in range(1, MAX_GRID_SIZE + 1):
            grid = random_grid(rng, height, width)
            tokens = flatten_grid(grid, eos=eos)
            assert tokens.shape == (height * (width + eos),)
            np.testing.assert_array_equal(unflatten_grid(tokens, height, width, eos=eos), grid)


@settings(max_examples=60, deadline=None)
@given(height=sides, width=sides, eos=st.booleans(), seed=seeds)
def test_flatten_unflatten_round_trip_property(height, width, eos, seed):
    grid = random_grid(np.random.default_rng(seed), height, width)
    np.testing.assert_array_equal(
        unflatten_grid(flatten_grid(grid, eos=eos), height, width, eos=eos), grid
    )


@settings(max_examples=30, deadline=None)
@given(height=sides, width=sides, seed=seeds)
def test_eos_sits_at_the_end_of_each_row_and_nowhere_else(height, width, seed):
    tokens = flatten_grid(random_grid(np.random.default_rng(seed), height, width), eos=True)
    rows = tokens.reshape(height, width + 1)  # [H, W + 1]
    assert (rows[:, -1] == VOCAB.eos_id).all()
    assert (rows[:, :-1] < VOCAB.num_colours).all()


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(sides, sides), min_size=1, max_size=6), eos=st.booleans(), seed=seeds
)
def test_collate_then_batch_to_grids_round_trips(shapes, eos, seed):
    rng = np.random.default_rng(seed)
    grids = [random_grid(rng, height, width) for height, width in shapes]
    batch = collate_grids(grids, eos=eos)
    recovered = batch_to_grids(batch.tokens, batch.shapes, batch.canvas_width, eos=eos)
    assert len(recovered) == len(grids)
    for original, back in zip(grids, recovered, strict=True):
        np.testing.assert_array_equal(back, original)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(sides, sides), min_size=1, max_size=6), eos=st.booleans())
def test_canvas_is_only_as_large_as_the_largest_grid(shapes, eos):
    grids = [np.zeros(shape, dtype=np.int64) for shape in shapes]
    batch = collate_grids(grids, eos=eos)
    assert batch.canvas_height == max(height for height, _ in shapes)
    assert batch.canvas_width == max(width for _, width in shapes) + eos
    assert batch.tokens.shape == (len(grids), batch.canvas_height * batch.canvas_width)
    assert batch.positions.shape == (len(grids), batch.canvas_height * batch.canvas_width, 2)
    assert batch.shapes.tolist() == [list(shape) for shape in shapes]


def test_masks_and_tokens_match_a_cell_by_cell_reference():
    rng = np.random.default_rng(1)
    grids = [random_grid(rng, 2, 3), random_grid(rng, 4, 1), random_grid(rng, 3, 3)]
    batch = collate_grids(grids, eos=True)
    canvas_height, canvas_width = batch.canvas_height, batch.canvas_width
    assert (canvas_height, canvas_width) == (4, 4)
    for b, grid in enumerate(grids):
        height, width = grid.shape
        for slot in range(canvas_height * canvas_width):
            row, col = divmod(slot, canvas_width)
            assert batch.positions[b, slot].tolist() == [row, col]
            inside = row < height and col < width
            is_eos = row < height and col == width
            expected = grid[row, col] if inside else VOCAB.eos_id if is_eos else VOCAB.pad_id
            assert batch.tokens[b, slot] == expected
            assert bool(batch.grid_mask[b, slot]) == inside
            assert bool(batch.pad_mask[b, slot]) == (not inside and not is_eos)


def test_fixed_canvas_size_pads_to_it_and_rejects_grids_that_do_not_fit():
    grids = [np.ones((2, 3), dtype=np.int64)]
    batch = collate_grids(grids, eos=True, canvas_size=(MAX_GRID_SIZE, MAX_GRID_SIZE))
    assert (batch.canvas_height, batch.canvas_width) == (MAX_GRID_SIZE, MAX_GRID_SIZE + 1)
    assert int(batch.grid_mask.sum()) == 6
    with pytest.raises(ValueError, match="smaller than a grid"):
        collate_grids(grids, canvas_size=(1, 1))


def test_batch_to_moves_every_tensor():
    batch = collate_grids([np.zeros((2, 2), dtype=np.int64)]).to("cpu")
    assert batch.tokens.dtype == torch.long and batch.pad_mask.dtype == torch.bool
    assert len(batch) == 1
