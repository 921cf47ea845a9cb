"""Pictures of grids in the ARC palette: input, reconstruction and the cells that differ."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

# the ARC colours 0-9, then a light grey for cells outside a grid
ARC_PALETTE = [
    "#000000",
    "#0074D9",
    "#FF4136",
    "#2ECC40",
    "#FFDC00",
    "#AAAAAA",
    "#F012BE",
    "#FF851B",
    "#7FDBFF",
    "#870C25",
    "#EEEEEE",
]
ARC_COLOURMAP = ListedColormap(ARC_PALETTE)


def _show(axis, grid: np.ndarray, title: str) -> None:
    axis.imshow(grid, cmap=ARC_COLOURMAP, vmin=0, vmax=10, interpolation="nearest")
    axis.set_title(title, fontsize=7)
    axis.set_xticks([])
    axis.set_yticks([])


def save_reconstructions(
    originals: list[np.ndarray],
    reconstructions: list[np.ndarray],
    path: str | Path,
    title: str = "",
) -> None:
    """One row per grid: the input, the reconstruction, and a map of the differing cells."""
    rows = len(originals)
    figure, axes = plt.subplots(rows, 3, figsize=(4.5, 1.5 * rows + 0.4), squeeze=False)
    for row, (original, reconstruction) in enumerate(zip(originals, reconstructions, strict=True)):
        _show(axes[row, 0], original, f"input {original.shape[0]}x{original.shape[1]}")
        size_ok = reconstruction.shape == original.shape
        _show(
            axes[row, 1],
            reconstruction,
            f"reconstruction {reconstruction.shape[0]}x{reconstruction.shape[1]}"
            + ("" if size_ok else " (size wrong)"),
        )
        if size_ok:
            wrong = reconstruction != original
            axes[row, 2].imshow(wrong, cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
            axes[row, 2].set_title(f"{int(wrong.sum())} cells differ", fontsize=7)
        else:
            axes[row, 2].text(0.5, 0.5, "size differs", ha="center", va="center", fontsize=7)
        axes[row, 2].set_xticks([])
        axes[row, 2].set_yticks([])
    if title:
        figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
