"""Input masking: hide a random share of a batch's colour cells behind the MASK token.

The encoder then sees a partial grid while the decoder is still trained to rebuild the whole one
(the targets stay the original tokens), so codes learn to complete grids, not just copy them
(masked autoencoding, He et al. 2022). PAD and EOS are never masked: they carry the grid's size.
"""

from __future__ import annotations

import torch

from pips.data.batch import Batch
from pips.data.vocab import VOCAB, Vocabulary


def mask_cells(
    batch: Batch,
    max_fraction: float,
    generator: torch.Generator | None = None,
    vocab: Vocabulary = VOCAB,
) -> Batch:
    """A new Batch whose colour cells are each replaced by MASK with probability ``fraction``.

    ``fraction`` is drawn once per batch, uniformly in ``[0, max_fraction]``, so on average a share
    ``max_fraction / 2`` of the cells is masked. PAD and EOS slots are kept. ``max_fraction = 0``
    returns ``batch`` itself and draws nothing, leaving the random stream untouched. Draws use
    ``generator`` (None: torch's global one), which must live on the batch's device.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"mask_cells max_fraction must be in [0, 1]; got {max_fraction}.")
    if max_fraction == 0.0:
        return batch
    tokens = batch.tokens  # [B, L]
    fraction = max_fraction * torch.rand((), generator=generator, device=tokens.device)
    draws = torch.rand(tokens.shape, generator=generator, device=tokens.device)  # [B, L]
    hidden = (draws < fraction) & batch.grid_mask  # [B, L]: colour cells only
    return Batch(
        tokens=tokens.masked_fill(hidden, vocab.mask_id),
        positions=batch.positions,
        pad_mask=batch.pad_mask,
        shapes=batch.shapes,
        canvas_height=batch.canvas_height,
        canvas_width=batch.canvas_width,
    )
