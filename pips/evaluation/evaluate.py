"""Evaluate a grid DVAE on a loader of batches, and rebuild grids the way a user decodes them."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from pips.data.batch import Batch
from pips.evaluation.metrics import ReconstructionMetrics
from pips.models.grid_dvae import GridDVAE, GridDVAEOutput, grid_positions


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
    encoded = model.encode(batch, **schedule_values)
    quantized = encoded.quantizer.quantized
    if model.spatial:  # every patch of the grid's own codes, whatever the batch's canvas
        p = model.output_patch
        rows, cols = -(-batch.canvas_height // p), -(-batch.canvas_width // p)
        return decode_patches(model, quantized, encoded.latent_padding, rows, cols, pad_weight > 0)
    return decode_slots(model, quantized, encoded.latent_positions, encoded.latent_padding)


def decode_patches(
    model: GridDVAE,
    quantized: torch.Tensor,  # [B, rows * cols, D] patch codes on a rows x cols board
    padding: torch.Tensor,  # [B, rows * cols] True at patches outside a grid
    rows: int,
    cols: int,
    sizes_from_cells: bool,
) -> list[np.ndarray]:
    """Spatial layout: decode each grid's patch codes, read its size (off the decoded PAD/EOS
    cells, or from the size heads), and crop. Cells of the predicted size that no patch of the
    grid covers are 0."""
    batch, p = quantized.shape[0], model.output_patch
    positions = grid_positions(rows, cols, quantized.device).expand(batch, -1, -1)
    cell_padding = padding.view(batch, rows, 1, cols, 1).expand(-1, -1, p, -1, p)
    cell_padding = cell_padding.reshape(batch, -1)
    canvas_height, canvas_width = rows * p, cols * p
    cell_logits, height_logits, width_logits = model.decode(
        quantized, positions, padding, canvas_height, canvas_width, cell_padding
    )
    output = GridDVAEOutput(cell_logits, height_logits, width_logits, None, ~cell_padding)
    colours, sizes = model.predict(output, canvas_width, sizes_from_cells=sizes_from_cells)
    colours = colours.masked_fill(cell_padding, 0)
    return crop_grids(colours.view(batch, canvas_height, canvas_width), sizes)


def decode_slots(
    model: GridDVAE,
    quantized: torch.Tensor,  # [B, N, D]
    positions: torch.Tensor,  # [B, N, 2]
    padding: torch.Tensor,  # [B, N]
) -> list[np.ndarray]:
    """Pooled layout: the size heads read each grid's size off its codes; decode on a canvas
    of those sizes, then crop each grid."""
    height_logits, width_logits = model.predict_shape(model.code_projection(quantized), padding)
    sizes = torch.stack([height_logits.argmax(-1), width_logits.argmax(-1)], dim=-1) + 1
    batch = sizes.shape[0]
    eos = int(model.eos)
    canvas_height, canvas_width = int(sizes[:, 0].max()), int(sizes[:, 1].max()) + eos
    rows = torch.arange(canvas_height, device=sizes.device).view(1, -1, 1)
    cols = torch.arange(canvas_width, device=sizes.device).view(1, 1, -1)
    inside = (rows < sizes[:, 0, None, None]) & (cols < sizes[:, 1, None, None] + eos)
    cell_logits, _, _ = model.decode(
        quantized, positions, padding, canvas_height, canvas_width, ~inside.view(batch, -1)
    )
    colours = cell_logits[..., : model.vocab.num_colours].argmax(-1)
    return crop_grids(colours.view(batch, canvas_height, canvas_width), sizes)


def crop_grids(boards: torch.Tensor, sizes: torch.Tensor) -> list[np.ndarray]:
    """Boards [B, H, W] of colours -> each grid at its size [B, 2] (zeros past the board)."""
    grids = []
    for board, (height, width) in zip(boards.cpu().numpy(), sizes.tolist(), strict=True):
        grid = np.zeros((height, width), dtype=np.int64)
        h, w = min(height, board.shape[0]), min(width, board.shape[1])
        grid[:h, :w] = board[:h, :w]
        grids.append(grid)
    return grids
