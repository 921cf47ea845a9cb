"""Reconstruction and codebook metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pips.data import VOCAB, collate_grids
from pips.metrics import CodeUsage, code_metrics, perplexity
from pips.models.grid_dvae import predict_grids
from pips.tasks.grids import GridQuality

# ----------------------------------------------------------------------------- perplexity


def test_perplexity_of_uniform_usage_is_the_number_of_codes():
    assert float(perplexity(torch.ones(8))) == pytest.approx(8.0)
    assert float(perplexity(torch.full((8,), 5.0))) == pytest.approx(8.0)


def test_perplexity_of_one_used_code_is_one():
    assert float(perplexity(torch.tensor([0.0, 0.0, 7.0, 0.0]))) == pytest.approx(1.0)


def test_perplexity_of_three_to_one_usage_by_hand():
    entropy_bits = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # 0.8112781...
    assert float(perplexity(torch.tensor([3.0, 1.0]))) == pytest.approx(2**entropy_bits)
    assert float(perplexity(torch.tensor([3.0, 1.0]))) == pytest.approx(1.7547654, rel=1e-6)


def test_perplexity_is_per_row_over_the_last_dimension():
    counts = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(perplexity(counts), torch.tensor([4.0, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- reconstruction


@pytest.fixture
def batch():
    """A 2x2 grid and a 1x3 grid on a 2 x 4 canvas (3 columns + EOS)."""
    grids = [np.array([[1, 2], [3, 4]]), np.array([[5, 6, 7]])]
    return collate_grids(grids, eos=True)


class ReconstructionMetrics:
    """The grid task's validation metrics as the runner keeps them: cells and sizes
    (GridQuality) beside the code usage (CodeUsage)."""

    def __init__(self, codebook_size: int):
        self.quality = GridQuality()
        self.codebook_size = codebook_size
        self.codes = None

    def update(self, batch, colours, sizes, indices, latent_padding, slotted):
        self.codes = self.codes or CodeUsage(self.codebook_size, slotted)
        self.quality.update(colours, sizes, batch)
        self.codes.update(indices, latent_padding)

    def compute(self) -> dict:
        grids = {"grids": float(self.quality.grids)}
        return {**self.quality.compute(), **code_metrics(self.codes, "grids"), **grids}


def _update(metrics, batch, colours, sizes=None, indices=None, latent_padding=None, slotted=True):
    sizes = batch.shapes.clone() if sizes is None else sizes
    metrics.update(batch, colours, sizes, indices, latent_padding, slotted)
    return metrics.compute()


def test_perfect_prediction_scores_one(batch):
    result = _update(ReconstructionMetrics(16), batch, batch.tokens.clone())
    assert result["cell_accuracy"] == 1.0
    assert result["grid_accuracy"] == 1.0
    assert result["size_accuracy"] == 1.0
    assert result["grids"] == 2


def test_cell_accuracy_ignores_pad_and_eos_slots(batch):
    colours = batch.tokens.clone()
    outside = ~batch.grid_mask  # EOS and PAD slots: 16 canvas slots - 7 cells
    assert int(outside.sum()) == 9
    colours[outside] = 0  # a colour can never equal PAD or EOS; must not count as wrong
    colours[1, 2] = 9  # one of the 7 real cells wrong (grid 2's last cell)
    result = _update(ReconstructionMetrics(16), batch, colours)
    assert result["cell_accuracy"] == pytest.approx(6 / 7)
    assert result["grid_accuracy"] == pytest.approx(1 / 2)


def test_grid_with_every_cell_right_but_wrong_size_is_not_exact(batch):
    sizes = batch.shapes.clone()
    sizes[0] = torch.tensor([2, 3])  # grid 1 is 2x2; every one of its cells is still right
    result = _update(ReconstructionMetrics(16), batch, batch.tokens.clone(), sizes=sizes)
    assert result["cell_accuracy"] == 1.0
    assert result["size_accuracy"] == pytest.approx(1 / 2)
    assert result["grid_accuracy"] == pytest.approx(1 / 2)


def test_accuracies_accumulate_over_batches(batch):
    metrics = ReconstructionMetrics(16)
    _update(metrics, batch, batch.tokens.clone())
    wrong = batch.tokens.clone()
    wrong[0, 0] = 9
    result = _update(metrics, batch, wrong)
    assert result["cell_accuracy"] == pytest.approx(13 / 14)
    assert result["grid_accuracy"] == pytest.approx(3 / 4)
    assert result["grids"] == 4


def test_bits_per_grid_pooled_is_latents_times_log2_codebook(batch):
    indices = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])  # [B=2, N=4]
    result = _update(ReconstructionMetrics(16), batch, batch.tokens.clone(), indices=indices)
    assert result["bits_per_grid"] == pytest.approx(4 * 4)


def test_bits_per_grid_spatial_counts_only_latents_that_cover_the_grid(batch):
    indices = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    latent_padding = torch.tensor([[False] * 4, [False, False, True, True]])
    result = _update(
        ReconstructionMetrics(8),
        batch,
        batch.tokens.clone(),
        indices=indices,
        latent_padding=latent_padding,
        slotted=False,
    )
    # (4 + 2) codes of log2(8) = 3 bits over 2 grids
    assert result["bits_per_grid"] == pytest.approx(6 * 3 / 2)


def test_bits_per_grid_counts_every_level_of_a_residual_code(batch):
    indices = torch.zeros(2, 4, 3, dtype=torch.long)  # [B, N, S=3 stages]
    result = _update(ReconstructionMetrics(8), batch, batch.tokens.clone(), indices=indices)
    assert result["bits_per_grid"] == pytest.approx(4 * 3 * 3)


def test_pooled_perplexity_is_per_slot_then_averaged(batch):
    # slot 0 always code 0 (perplexity 1), slot 1 codes 0 and 1 (perplexity 2)
    indices = torch.tensor([[0, 0], [0, 1]])
    result = _update(ReconstructionMetrics(4), batch, batch.tokens.clone(), indices=indices)
    assert result["codebook_perplexity"] == pytest.approx(1.5)
    # over all slots: code 0 three times, code 1 once
    assert result["codebook_perplexity_all"] == pytest.approx(1.7547654, rel=1e-6)
    assert result["codes_used"] == 2


def test_code_entropy_and_dead_codes_by_hand(batch):
    # slot 0 always code 0 (0 bits), slot 1 codes 0 and 1 once each (1 bit): a grid's two
    # codes carry 0 + 1 = 1 bit; of 4 codes, 2 are never used
    indices = torch.tensor([[0, 0], [0, 1]])
    result = _update(ReconstructionMetrics(4), batch, batch.tokens.clone(), indices=indices)
    assert result["code_entropy_bits"] == pytest.approx(1.0)
    assert result["dead_codes"] == 2
    assert result["bits_per_grid"] == pytest.approx(4.0)  # 2 codes x log2(4)


def test_data_bits_are_the_grids_zlib_sizes(batch):
    import zlib

    result = _update(ReconstructionMetrics(4), batch, batch.tokens.clone())
    sizes = [
        len(zlib.compress(bytes([1, 2, 3, 4]), 9)),
        len(zlib.compress(bytes([5, 6, 7]), 9)),
    ]
    assert result["data_bits_per_grid"] == pytest.approx(8 * sum(sizes) / 2)


def test_spatial_perplexity_pools_positions_and_skips_padded_latents(batch):
    indices = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 3]])
    latent_padding = torch.tensor([[False] * 4, [False, False, True, True]])
    result = _update(
        ReconstructionMetrics(8),
        batch,
        batch.tokens.clone(),
        indices=indices,
        latent_padding=latent_padding,
        slotted=False,
    )
    # kept codes: 0, 1, 2, 3, 0, 1 -> usage [2, 2, 1, 1] (padded 3s not counted)
    probs = np.array([2, 2, 1, 1]) / 6
    expected = 2 ** -(probs * np.log2(probs)).sum()
    assert result["codebook_perplexity"] == pytest.approx(expected)
    assert result["codes_used"] == 4


def test_no_codes_gives_nan_perplexity_and_zero_bits(batch):
    result = _update(ReconstructionMetrics(0), batch, batch.tokens.clone(), indices=None)
    assert math.isnan(result["codebook_perplexity"])
    assert result["bits_per_grid"] == 0.0


def test_predict_grids_argmax_over_colours_only_and_sizes_are_one_based():
    cell_logits = torch.zeros(1, 2, VOCAB.size)
    cell_logits[0, 0, VOCAB.pad_id] = 10.0  # PAD wins overall, colour 3 wins among colours
    cell_logits[0, 0, 3] = 5.0
    cell_logits[0, 1, 7] = 1.0
    height_logits = torch.zeros(1, 30)
    height_logits[0, 0] = 1.0  # class 0 -> height 1
    width_logits = torch.zeros(1, 30)
    width_logits[0, 29] = 1.0  # class 29 -> width 30
    colours, sizes = predict_grids(cell_logits, height_logits, width_logits, VOCAB.num_colours)
    assert colours.tolist() == [[3, 7]]
    assert sizes.tolist() == [[1, 30]]
