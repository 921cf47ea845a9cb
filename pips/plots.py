"""Pictures: grids in the ARC palette (input, reconstruction, the cells that differ) and metric
curves read from a run's metrics.csv."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
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
    _save(figure, path)


def save_grid_sheet(grids: list[np.ndarray], path: str | Path, title: str = "", columns=8) -> None:
    """Grids in a sheet of ``columns`` per row, in the ARC palette, each titled with its size."""
    rows = max(-(-len(grids) // columns), 1)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.3 * rows + 0.4))
    for index, axis in enumerate(np.asarray(axes).reshape(-1)):
        if index < len(grids):
            grid = np.asarray(grids[index])
            _show(axis, grid, f"{grid.shape[0]}x{grid.shape[1]}")
        else:
            axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=8)
    _save(figure, path)


def _save(figure, path) -> None:
    """Save to a file path (creating its folder) or a binary file object, then close."""
    figure.tight_layout()
    if isinstance(path, (str, Path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A run's metrics.csv -> ``{column: (steps, values)}`` for every column with a value.

    Lightning's CSV logger writes one row per logging call with blanks in the other columns; a
    resumed run appends, so a step can repeat (the later row wins when plotted in order).
    """
    path = Path(path)
    if not path.is_file():
        return {}
    columns: dict[str, tuple[list[float], list[float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                steps, values = columns.setdefault(key, ([], []))
                steps.append(float(step))
                values.append(number)
    return {key: (np.asarray(s), np.asarray(v)) for key, (s, v) in columns.items()}


def plot_curves(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    panels: list[tuple[str, list[str]]],
    path: str | Path,
    title: str = "",
) -> bool:
    """One panel per ``(title, keys)``, each key a line against the step; panels with no data
    are left out. Returns False (and writes nothing) when no panel has data."""
    panels = [(name, [k for k in keys if k in series]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return False
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(6.4, 2.3 * len(panels) + 0.4), squeeze=False, sharex=True
    )
    for axis, (name, keys) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            steps, values = series[key]
            finite = np.isfinite(values)
            marker = "o" if finite.sum() < 20 else None
            axis.plot(steps[finite], values[finite], label=key, marker=marker, markersize=3)
        axis.set_title(name, fontsize=9)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=6, loc="best", ncol=2 if len(keys) > 4 else 1)
    axes[-1, 0].set_xlabel("step", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    _save(figure, path)
    return True


def plot_code_usage(
    counts: np.ndarray, path, title: str = "", codebook_size: int | None = None
) -> None:
    """Code usage of a validation set: codes ranked by use (log-log; a flat line is even use),
    and for slotted codes (``counts [N, K]``, K <= 4096) a slot-by-code heatmap. For huge
    codebooks pass only the used codes' counts (1-D) and ``codebook_size``."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 1:
        counts = counts[None]
    num_codes = codebook_size or counts.shape[1]
    heatmap = counts.shape[0] > 1 and counts.shape[1] <= 4096 and codebook_size is None
    figure, axes = plt.subplots(
        1, 2 if heatmap else 1, figsize=(10 if heatmap else 5.5, 3.4), squeeze=False
    )
    total = counts.sum(0)
    ranked = np.sort(total[total > 0])[::-1]
    axis = axes[0, 0]
    if len(ranked):
        axis.loglog(np.arange(1, len(ranked) + 1), ranked / ranked.sum(), lw=1.2)
        axis.axhline(1 / num_codes, color="grey", ls="--", lw=0.8, label="uniform")
        axis.legend(fontsize=7)
    axis.set_xlabel("code rank", fontsize=8)
    axis.set_ylabel("share of uses", fontsize=8)
    axis.set_title(f"{len(ranked)} of {num_codes} codes used", fontsize=9)
    axis.tick_params(labelsize=7)
    if heatmap:
        axis = axes[0, 1]
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = axis.imshow(shares, aspect="auto", cmap="magma", interpolation="nearest")
        axis.set_xlabel("code", fontsize=8)
        axis.set_ylabel("slot", fontsize=8)
        axis.set_title("share of each slot's uses per code", fontsize=9)
        axis.tick_params(labelsize=7)
        figure.colorbar(image, ax=axis)
    if title:
        figure.suptitle(title, fontsize=9)
    _save(figure, path)


def save_image_rows(rows: list[torch.Tensor], path: Path, title: str = "") -> None:
    """One matplotlib row per tensor of images ``[N, C, H, W]`` in [0, 1]."""
    count = rows[0].shape[0]
    figure, axes = plt.subplots(
        len(rows), count, figsize=(1.2 * count, 1.3 * len(rows) + 0.4), squeeze=False
    )
    for r, images in enumerate(rows):
        for c in range(count):
            image = images[c].permute(1, 2, 0).numpy()
            axis = axes[r, c]
            if image.shape[-1] == 1:
                axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def html_image(draw) -> str:
    """``draw(file)`` writes a PNG into a buffer; returns an <img> tag with it embedded."""
    buffer = io.BytesIO()
    draw(buffer)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="">'
