"""Codes files: what `pips encode` writes and `pips decode` reads, for every task.

A codes file (``.npz``, read with ``allow_pickle=False``) holds every item's code array flattened
one after the other (``codes``, int64 ``[total]``), each item's code array shape (``code_shapes``,
``[G, D]``), the task's per-item metadata arrays (grids: ``task_ids``, ``subsets``,
``pair_indices``, ``roles``; other tasks: ``item_index``), and ``task``, ``codebook_size`` and
``checkpoint``. Files written before the task interface (grids only: ``codes [total, S]`` and
``code_shapes [G, 3]`` with a ``layout``) are read too. Every array is checked before use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pips.tasks.base import output_file

SCALARS = ("task", "codebook_size", "checkpoint", "layout")
MAX_CODES = 2**31  # more codes than any real file holds: a crafted shape, not data
MAX_SIDE = 65536  # any one dimension of an item's code array


class CodesError(ValueError):
    """A codes file that cannot be read or decoded; the message says why."""


def save_codes(
    path: str | Path,
    codes: Sequence[np.ndarray],
    metadata: dict[str, np.ndarray],
    task: str,
    codebook_size: int,
    checkpoint: str,
) -> Path:
    """Write ``codes`` (one integer array per item, all of one rank) and their metadata; returns
    the path written (``.npz`` added when missing)."""
    path = output_file(path, "codes.npz", ".npz")
    arrays = [np.asarray(array, dtype=np.int64) for array in codes]
    rank = arrays[0].ndim if arrays else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        codes=np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.int64),
        code_shapes=np.asarray([a.shape for a in arrays], dtype=np.int64).reshape(-1, rank),
        task=np.asarray(task),
        codebook_size=np.int64(codebook_size),
        checkpoint=np.asarray(checkpoint),
        **metadata,
    )
    return path


def load_codes(path: str | Path) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """A codes file -> (each item's code array, the per-item metadata arrays and scalars).

    Every array is checked (dtype, shape, range, agreement) before any is used, so a damaged or
    crafted file is one :class:`CodesError` sentence, never a crash or an unbounded allocation.
    """
    path = Path(path)
    if not path.is_file():
        raise CodesError(f"codes file {path} does not exist; write one with pips encode")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise CodesError(f"{path} is not a codes file written by pips encode ({error})") from None
    return _split(files, path), files


def _split(files: dict[str, np.ndarray], path: Path) -> list[np.ndarray]:
    def fail(problem: str) -> CodesError:
        return CodesError(
            f"{path} is not a valid codes file: {problem}; write it again with pips encode"
        )

    missing = {"codes", "code_shapes"} - set(files)
    if missing:
        raise CodesError(
            f"{path} is not a codes file written by pips encode (it lacks "
            f"{', '.join(sorted(missing))})"
        )
    flat, shapes = files["codes"], files["code_shapes"]
    for name, array in (("codes", flat), ("code_shapes", shapes)):
        if not np.issubdtype(array.dtype, np.integer):
            raise fail(f"{name} must hold integers; it holds {array.dtype}")
    if shapes.ndim != 2 or shapes.shape[1] < 1:
        raise fail(
            f"code_shapes must be an [items, rank] array (each item's code array shape); it has "
            f"shape {shapes.shape}"
        )
    old = flat.ndim == 2  # grids before the task interface: codes [total, S], shapes [G, 3]
    if old and (shapes.shape[1] != 3 or flat.shape[1] < 1):
        raise fail(f"codes of shape {flat.shape} need code_shapes [items, 3]")
    if not old and flat.ndim != 1:
        raise fail(f"codes must be a flat array of every item's codes; it has shape {flat.shape}")
    if shapes.size and (shapes.min() < 1 or shapes.max() > MAX_SIDE):
        raise fail(f"code_shapes must hold sizes from 1 to {MAX_SIDE}")
    if old and shapes.size and (shapes[:, 2] != flat.shape[1]).any():
        raise fail(f"code_shapes give S other than the {flat.shape[1]} indices per code of codes")
    sizes = shapes[:, :2] if old else shapes
    counts = np.prod(sizes.astype(np.float64), axis=1)
    total = float(counts.sum())
    if total > MAX_CODES or total != len(flat):
        raise fail(f"code_shapes describe {int(total)} codes but the file holds {len(flat)}")
    items = len(shapes)
    layout = files.get("layout")
    if layout is not None and (layout.ndim != 0 or str(layout) not in ("pooled", "spatial")):
        raise fail(f"layout must be pooled or spatial; got {layout!r}")
    for key, values in files.items():
        if key in ("codes", "code_shapes") or key in SCALARS:
            continue
        if values.ndim != 1 or len(values) != items:
            raise fail(f"{key} must have one entry per item ({items}); it has shape {values.shape}")
    starts = np.concatenate([[0], np.cumsum(counts).astype(np.int64)])
    arrays = []
    for shape, start, end in zip(shapes, starts[:-1], starts[1:], strict=True):
        if old:
            rows, cols, levels = (int(v) for v in shape)
            array = flat[start:end].reshape(rows, cols, levels)
            array = array[0] if str(layout) == "pooled" else array
            arrays.append(array if levels > 1 else array[..., 0])
        else:
            arrays.append(flat[start:end].reshape(tuple(int(v) for v in shape)))
    return arrays
