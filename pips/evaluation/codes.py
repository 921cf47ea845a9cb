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

SCALARS = ("task", "codebook_size", "checkpoint", "layout")
MAX_CODES = 2**31  # more codes than any real file holds: a crafted shape, not data


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
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
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
    """A codes file -> (each item's code array, the per-item metadata arrays and scalars)."""
    path = Path(path)
    if not path.is_file():
        raise CodesError(f"codes file {path} does not exist; write one with pips encode")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise CodesError(f"{path} is not a codes file written by pips encode ({error})") from None
    missing = {"codes", "code_shapes"} - set(files)
    if missing:
        raise CodesError(
            f"{path} is not a codes file written by pips encode (it lacks "
            f"{', '.join(sorted(missing))})"
        )
    flat, shapes = files["codes"], files["code_shapes"]
    if not np.issubdtype(shapes.dtype, np.integer) or shapes.ndim != 2:
        raise CodesError(
            f"{path}: code_shapes must be a 2-D integer array (one row per item); got "
            f"{shapes.dtype} of shape {shapes.shape}; encode again"
        )
    if not np.issubdtype(flat.dtype, np.integer):
        raise CodesError(f"{path}: codes must be integers; got {flat.dtype}; encode again")
    if shapes.size and shapes.min() < 0:
        raise CodesError(f"{path}: code_shapes holds a negative size; the file is damaged")
    counts = np.prod(shapes.astype(np.float64), axis=1)
    old_format = flat.ndim == 2  # grids before the task interface: [total, S], shapes [G, 3]
    if old_format:
        if shapes.shape[1] != 3 or flat.shape[1] < 1:
            raise CodesError(f"{path}: codes [total, S] need code_shapes [G, 3]; encode again")
        counts = shapes[:, 0].astype(np.float64) * shapes[:, 1]
        total = flat.shape[0]
    elif flat.ndim == 1:
        total = flat.shape[0]
    else:
        raise CodesError(f"{path}: codes must be a flat array; got shape {flat.shape}")
    if counts.sum() > MAX_CODES or counts.sum() != total:
        raise CodesError(
            f"{path}: code_shapes describe {int(counts.sum())} codes but the file holds "
            f"{total}; the file is damaged, encode again"
        )
    items = len(shapes)
    for key, values in files.items():
        if key in ("codes", "code_shapes") or key in SCALARS:
            continue
        if values.ndim != 1 or len(values) != items:
            raise CodesError(
                f"{path}: metadata {key!r} has {values.shape} entries for {items} items; the "
                f"file is damaged, encode again"
            )
    starts = np.concatenate([[0], np.cumsum(counts).astype(np.int64)])
    arrays = []
    layout = str(files.get("layout", "spatial"))
    for shape, start, end in zip(shapes, starts[:-1], starts[1:], strict=True):
        if old_format:
            rows, cols, levels = (int(v) for v in shape)
            if levels != flat.shape[1]:
                raise CodesError(f"{path}: an item has {levels} levels, the codes {flat.shape[1]}")
            array = flat[start:end].reshape(rows, cols, levels)
            array = array[0] if layout == "pooled" else array
            arrays.append(array if levels > 1 else array[..., 0])
        else:
            arrays.append(flat[start:end].reshape(tuple(int(v) for v in shape)))
    return arrays, files
