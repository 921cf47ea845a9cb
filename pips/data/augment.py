"""Grid augmentation: the 8 symmetries of the square (dihedral group D4) and colour permutations.

Both leave what a grid *is* unchanged for the purpose of learning codes of it, and together they
multiply ~7k distinct ARC grids by up to 8 * 9! views. Every random choice comes from a NumPy
``Generator`` passed in, so the caller decides the seeding (see ``pips.data.loader``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pips.data.vocab import NUM_COLOURS


def _anti_transpose(grid: np.ndarray) -> np.ndarray:
    return grid[::-1, ::-1].T


DIHEDRAL_TRANSFORMS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    # k = 0..3 keep the orientation: an HxW grid stays HxW
    lambda grid: grid,  # identity
    lambda grid: grid[::-1, ::-1],  # rotate 180
    lambda grid: grid[::-1, :],  # flip up-down
    lambda grid: grid[:, ::-1],  # flip left-right
    # k = 4..7 transpose it: an HxW grid becomes WxH
    lambda grid: grid.T,  # transpose (main diagonal)
    lambda grid: np.rot90(grid, 1),  # rotate 90 counter-clockwise
    lambda grid: np.rot90(grid, 3),  # rotate 270 counter-clockwise (90 clockwise)
    _anti_transpose,  # reflect across the anti-diagonal
)
"""The 8 elements of D4 on [H, W] arrays, indexed by k; ``k >= 4`` swaps height and width."""

DIHEDRAL_NAMES = (
    "identity",
    "rot180",
    "flip_ud",
    "flip_lr",
    "transpose",
    "rot90",
    "rot270",
    "anti_transpose",
)

_INVERSE = (0, 1, 2, 3, 4, 6, 5, 7)  # every element is its own inverse but the two quarter turns


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """Apply dihedral element ``k`` in 0..7 to a [H, W] grid (a view; copy before writing)."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral element k must be in 0..7; got {k}")
    return DIHEDRAL_TRANSFORMS[k](grid)


def inverse_dihedral(k: int) -> int:
    """The element that undoes ``k``: ``dihedral(dihedral(g, k), inverse_dihedral(k)) == g``."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral element k must be in 0..7; got {k}")
    return _INVERSE[k]


def is_transposing(k: int) -> bool:
    """Whether element ``k`` swaps a grid's height and width."""
    return k >= 4


def random_colour_permutations(
    rng: np.random.Generator, num_permutations: int, keep_black: bool = True
) -> np.ndarray:
    """Independent random permutations of the colours, [N, 10] int64, ``row[old] = new``.

    ``keep_black`` fixes colour 0: in ARC black is almost always the background, so permuting it
    would teach the model a background that never occurs in real tasks.
    """
    first = int(keep_black)
    colours = np.tile(np.arange(first, NUM_COLOURS), (num_permutations, 1))  # [N, 10 - first]
    shuffled = rng.permuted(colours, axis=1)
    return np.concatenate([np.zeros((num_permutations, first), dtype=np.int64), shuffled], axis=1)


def random_colour_permutation(rng: np.random.Generator, keep_black: bool = True) -> np.ndarray:
    """One random permutation of the colours, [10] int64 (see ``random_colour_permutations``)."""
    return random_colour_permutations(rng, 1, keep_black)[0]


def apply_colour_permutation(grid: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Recolour a grid: [H, W] -> [H, W], every cell c becomes ``permutation[c]``."""
    return permutation[grid]


class GridAugmenter:
    """Augments one batch of grids: dihedral elements and colour permutations, each switchable.

    One orientation bit is drawn per batch (transpose or not); each grid then draws its own
    element among the 4 of that orientation, and its own colour permutation. A size-bucketed batch
    of similar shapes therefore stays similarly shaped (its canvas stays small), while every grid's
    marginal distribution over the 8 elements is still uniform.
    """

    def __init__(
        self, colour_permutation: bool = True, keep_black: bool = True, dihedral: bool = True
    ) -> None:
        self.colour_permutation = colour_permutation
        self.keep_black = keep_black
        self.dihedral = dihedral

    def __repr__(self) -> str:
        return (
            f"GridAugmenter(colour_permutation={self.colour_permutation}, "
            f"keep_black={self.keep_black}, dihedral={self.dihedral})"
        )

    def sample(self, num_grids: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw a batch's transforms: dihedral elements [B] and colour permutations [B, 10]."""
        if self.dihedral:
            transposed = int(rng.integers(2))
            elements = 4 * transposed + rng.integers(4, size=num_grids)  # [B]
        else:
            elements = np.zeros(num_grids, dtype=np.int64)
        if self.colour_permutation:
            permutations = random_colour_permutations(rng, num_grids, self.keep_black)  # [B, 10]
        else:
            permutations = np.tile(np.arange(NUM_COLOURS), (num_grids, 1))  # [B, 10]
        return elements.astype(np.int64), permutations

    def apply(
        self, grids: list[np.ndarray], elements: np.ndarray, permutations: np.ndarray
    ) -> list[np.ndarray]:
        """Apply drawn transforms: grid i gets ``dihedral(·, elements[i])`` then its recolouring."""
        return [
            np.ascontiguousarray(apply_colour_permutation(dihedral(grid, int(k)), permutation))
            for grid, k, permutation in zip(grids, elements, permutations, strict=True)
        ]

    def __call__(self, grids: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """Augment one batch; the result depends only on ``grids`` and the state of ``rng``."""
        return self.apply(grids, *self.sample(len(grids), rng))
