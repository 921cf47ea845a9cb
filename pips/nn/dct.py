"""The orthonormal 2D DCT-II of p x p blocks, and the JPEG zigzag order of its coefficients.

The DCT-II matrix ``D [p, p]`` (Ahmed, Natarajan and Rao 1974; the transform of JPEG) is::

    D[k, i] = a_k cos(pi (2 i + 1) k / (2 p)),   a_0 = sqrt(1 / p),  a_k = sqrt(2 / p) for k > 0

It is orthonormal (``D D^T = I``), so the block transform ``Y = D X D^T`` is inverted by
``X = D^T Y D`` and keeps the sum of squares (Parseval). ``Y[0, 0] = p * mean(X)`` is the DC
coefficient; ``Y[u, v]`` grows in vertical frequency with ``u`` and horizontal with ``v``.

The zigzag order reads a block's coefficients from low to high frequency, along the
anti-diagonals ``u + v = s``, alternating direction (JPEG, ITU T.81 figure 5): for 4 x 4 the flat
indices ``u * p + v`` come as ``0, 1, 4, 8, 5, 2, 3, 6, 9, 12, 13, 10, 7, 11, 14, 15``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _dct_matrix_float64(size: int) -> torch.Tensor:
    k = torch.arange(size, dtype=torch.float64).unsqueeze(1)  # frequency, rows
    i = torch.arange(size, dtype=torch.float64).unsqueeze(0)  # sample, columns
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * size))
    matrix[0] *= math.sqrt(1.0 / size)
    matrix[1:] *= math.sqrt(2.0 / size)
    return matrix


def dct_matrix(
    size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D [size, size]``: ``D[k, i] = a_k cos(pi (2i+1) k / 2n)``.

    Computed in float64 and cast, so ``D @ D.T`` is the identity to the precision of ``dtype``.
    """
    if size < 1:
        raise ValueError(f"the DCT size must be at least 1; got {size}")
    return _dct_matrix_float64(size).to(dtype=dtype, device=device)


def block_dct(blocks: torch.Tensor) -> torch.Tensor:
    """2D DCT-II of each block: ``[..., p, p] -> [..., p, p]``, ``Y = D X D^T``.

    Every leading dimension (batch, patch, channel) is a separate block, so a ``[B, P, C, p, p]``
    tensor of patches is transformed per channel.
    """
    if blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError(f"block_dct needs square blocks [..., p, p]; got {tuple(blocks.shape)}")
    matrix = dct_matrix(blocks.shape[-1], blocks.dtype, blocks.device)
    return matrix @ blocks @ matrix.transpose(0, 1)


def block_idct(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`block_dct`: ``[..., p, p] -> [..., p, p]``, ``X = D^T Y D``."""
    if coefficients.shape[-1] != coefficients.shape[-2]:
        raise ValueError(
            f"block_idct needs square blocks [..., p, p]; got {tuple(coefficients.shape)}"
        )
    matrix = dct_matrix(coefficients.shape[-1], coefficients.dtype, coefficients.device)
    return matrix.transpose(0, 1) @ coefficients @ matrix


@lru_cache(maxsize=32)
def _zigzag(size: int) -> tuple[int, ...]:
    order = []
    for diagonal in range(2 * size - 1):
        rows = range(max(0, diagonal - size + 1), min(diagonal, size - 1) + 1)
        # even anti-diagonals run up (row falling), odd ones down (row rising)
        for row in reversed(rows) if diagonal % 2 == 0 else rows:
            order.append(row * size + (diagonal - row))
    return tuple(order)


def zigzag_order(size: int) -> torch.Tensor:
    """JPEG zigzag order of a ``size x size`` block: LongTensor ``[size * size]`` whose entry ``k``
    is the flat index ``u * size + v`` of the ``k``-th coefficient read.

    ``flat[..., zigzag_order(p)]`` reorders flattened blocks ``[..., p * p]`` into zigzag order.
    """
    if size < 1:
        raise ValueError(f"the zigzag block size must be at least 1; got {size}")
    return torch.tensor(_zigzag(size), dtype=torch.long)


def inverse_zigzag_order(size: int) -> torch.Tensor:
    """The inverse permutation of :func:`zigzag_order`: ``zigzagged[..., inverse_zigzag_order(p)]``
    restores the row-major flat block ``[..., p * p]``."""
    return torch.argsort(zigzag_order(size))


def blocks_to_zigzag(blocks: torch.Tensor) -> torch.Tensor:
    """``[..., p, p] -> [..., p * p]``: flatten each block in zigzag order."""
    size = blocks.shape[-1]
    return blocks.flatten(-2)[..., zigzag_order(size).to(blocks.device)]


def zigzag_to_blocks(zigzagged: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., p * p] -> [..., p, p]``: the inverse of :func:`blocks_to_zigzag`."""
    if zigzagged.shape[-1] != size * size:
        raise ValueError(
            f"zigzag_to_blocks needs [..., {size * size}] for {size} x {size} blocks; "
            f"got {tuple(zigzagged.shape)}"
        )
    flat = zigzagged[..., inverse_zigzag_order(size).to(zigzagged.device)]
    return flat.unflatten(-1, (size, size))
