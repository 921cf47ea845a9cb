"""Grids as token sequences: flatten, unflatten, and the :class:`Batch` every model consumes.

A batch is a *canvas*: the grids of a batch are placed top-left on a ``canvas_height x
canvas_width`` board, where the canvas is only as large as the largest grid in the batch (plus one
EOS column when EOS is on), and flattened row-major. Each real row ends with an EOS token when
``eos=True``; every other slot outside a grid is PAD. Positions are the (row, col) canvas
coordinates of every slot, padding included, so a decoder can be queried anywhere on the canvas;
``pad_mask`` says which slots are padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pips.data.vocab import VOCAB, Vocabulary


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] long, L = canvas_height * canvas_width
    positions: torch.Tensor  # [B, L, 2] long, (row, col) canvas coordinates
    pad_mask: torch.Tensor  # [B, L] bool, True at padding
    shapes: torch.Tensor  # [B, 2] long, (height, width) of each grid
    canvas_height: int
    canvas_width: int  # includes the EOS column when EOS is on

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def grid_mask(self) -> torch.Tensor:
        """[B, L] bool, True at the grid's own colour cells (not PAD, not EOS)."""
        rows, cols = self.positions.unbind(-1)
        return (rows < self.shapes[:, None, 0]) & (cols < self.shapes[:, None, 1])

    def pin_memory(self) -> Batch:
        """Page-locked copy, so ``DataLoader(pin_memory=True)`` can speed host-to-GPU copies."""
        return Batch(
            self.tokens.pin_memory(),
            self.positions.pin_memory(),
            self.pad_mask.pin_memory(),
            self.shapes.pin_memory(),
            self.canvas_height,
            self.canvas_width,
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.tokens.to(device),
            self.positions.to(device),
            self.pad_mask.to(device),
            self.shapes.to(device),
            self.canvas_height,
            self.canvas_width,
        )


def flatten_grid(grid: np.ndarray, eos: bool = True, vocab: Vocabulary = VOCAB) -> np.ndarray:
    """[H, W] colours -> [H * (W + eos)] token ids, row-major, EOS closing each row when asked."""
    grid = np.asarray(grid, dtype=np.int64)
    if not eos:
        return grid.reshape(-1).copy()
    height = grid.shape[0]
    return np.concatenate([grid, np.full((height, 1), vocab.eos_id)], axis=1).reshape(-1)


def unflatten_grid(tokens: np.ndarray, height: int, width: int, eos: bool = True) -> np.ndarray:
    """Inverse of :func:`flatten_grid`: [H * (W + eos)] token ids -> [H, W] colours."""
    tokens = np.asarray(tokens, dtype=np.int64)
    row_length = width + int(eos)
    return tokens[: height * row_length].reshape(height, row_length)[:, :width].copy()


def collate_grids(
    grids: list[np.ndarray],
    eos: bool = True,
    vocab: Vocabulary = VOCAB,
    canvas_size: tuple[int, int] | None = None,
) -> Batch:
    """Place grids top-left on the smallest canvas that holds them all and flatten it.

    ``canvas_size=(H, W)`` forces a fixed canvas instead (e.g. (30, 30) to pad every grid to the
    largest ARC size, the baseline that size bucketing is measured against).
    """
    shapes = np.array([g.shape for g in grids], dtype=np.int64)  # [B, 2]
    canvas_height, canvas_width = (
        canvas_size if canvas_size is not None else (shapes[:, 0].max(), shapes[:, 1].max())
    )
    if (shapes[:, 0] > canvas_height).any() or (shapes[:, 1] > canvas_width).any():
        raise ValueError(f"canvas_size {canvas_size} is smaller than a grid in the batch")
    canvas_height, canvas_width = int(canvas_height), int(canvas_width) + int(eos)
    board = np.full((len(grids), canvas_height, canvas_width), vocab.pad_id, dtype=np.int64)
    for i, grid in enumerate(grids):
        height, width = grid.shape
        board[i, :height, :width] = grid
        if eos:
            board[i, :height, width] = vocab.eos_id
    tokens = torch.from_numpy(board.reshape(len(grids), -1))  # [B, L]
    rows, cols = torch.meshgrid(
        torch.arange(canvas_height), torch.arange(canvas_width), indexing="ij"
    )
    positions = torch.stack([rows, cols], dim=-1).reshape(1, -1, 2).expand(len(grids), -1, -1)
    return Batch(
        tokens=tokens,
        positions=positions.contiguous(),
        pad_mask=tokens == vocab.pad_id,
        shapes=torch.from_numpy(shapes),
        canvas_height=canvas_height,
        canvas_width=canvas_width,
    )


def batch_to_grids(
    tokens: torch.Tensor, shapes: torch.Tensor, canvas_width: int, eos: bool = True
) -> list[np.ndarray]:
    """Cut each grid of shape ``shapes[i]`` back out of a batch's flattened canvas tokens."""
    tokens_np = tokens.detach().cpu().numpy()
    out = []
    for row_tokens, (height, width) in zip(tokens_np, shapes.tolist(), strict=True):
        board = row_tokens.reshape(-1, canvas_width)
        out.append(board[:height, :width].copy())
    return out
