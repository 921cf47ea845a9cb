"""Evaluate a grid DVAE on a loader of batches, and rebuild grids the way a user decodes them."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from pips.data.batch import Batch
from pips.evaluation.metrics import ReconstructionMetrics
from pips.models.grid_dvae import GridDVAE, GridDVAEOutput


def predict(model: GridDVAE, output: GridDVAEOutput, batch: Batch, pad_weight: float):
    """Predicted colours and sizes; sizes come from decoded PAD/EOS cells when those were
    trained (spatial layout with pad_weight > 0), else from the size heads."""
    return model.predict(output, batch.canvas_width, sizes_from_cells=pad_weight > 0)


def update_metrics(
    metrics: ReconstructionMetrics,
    model: GridDVAE,
    output: GridDVAEOutput,
    batch: Batch,
    pad_weight: float,
) -> None:
    colours, sizes = predict(model, output, batch, pad_weight)
    metrics.update(
        colours,
        sizes,
        batch.tokens,
        batch.grid_mask,
        batch.shapes,
        output.encoded.quantizer.indices,
        output.encoded.latent_padding,
        slotted=not model.spatial,
    )


@torch.no_grad()
def evaluate(
    model: GridDVAE,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    pad_weight: float = 0.0,
    **schedule_values: float,
) -> dict[str, float]:
    """Validation metrics over every batch of ``loader``, with argmax codes (eval mode).
    ``pad_weight`` is the run's ``loss.pad_weight`` (it decides how sizes are read)."""
    was_training = model.training
    model.eval()
    metrics = ReconstructionMetrics(model.quantizer.codebook_size)
    for batch in loader:
        batch = batch.to(device)
        update_metrics(metrics, model, model(batch, **schedule_values), batch, pad_weight)
    model.train(was_training)
    return metrics.compute()


@torch.no_grad()
def reconstruct(
    model: GridDVAE, batch: Batch, pad_weight: float = 0.0, **schedule_values: float
) -> list[np.ndarray]:
    """Each grid of ``batch`` rebuilt from its codes alone: size first, then cells."""
    output = model(batch, **schedule_values)
    colours, sizes = predict(model, output, batch, pad_weight)
    if not model.spatial:  # decode again on the canvas of the predicted sizes
        encoded = output.encoded
        canvas_height = int(sizes[:, 0].max())
        canvas_width = int(sizes[:, 1].max()) + int(model.eos)
        rows = torch.arange(canvas_height, device=sizes.device).view(1, -1, 1)
        cols = torch.arange(canvas_width, device=sizes.device).view(1, 1, -1)
        inside = (rows < sizes[:, 0, None, None]) & (
            cols < sizes[:, 1, None, None] + int(model.eos)
        )
        cell_logits, _, _ = model.decode(
            encoded.quantizer.quantized,
            encoded.latent_positions,
            encoded.latent_padding,
            canvas_height,
            canvas_width,
            ~inside.view(len(batch), -1),
        )
        colours = cell_logits[..., : model.vocab.num_colours].argmax(-1)
    else:
        canvas_height, canvas_width = batch.canvas_height, batch.canvas_width
    boards = colours.view(len(batch), canvas_height, canvas_width).cpu().numpy()
    grids = []
    for board, (height, width) in zip(boards, sizes.tolist(), strict=True):
        grid = np.zeros((height, width), dtype=np.int64)
        h, w = min(height, board.shape[0]), min(width, board.shape[1])
        grid[:h, :w] = board[:h, :w]
        grids.append(grid)
    return grids
