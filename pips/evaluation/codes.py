"""Grids to code strings and back: what `pips encode` and `pips decode` do.

A grid's codes are an integer array: ``[N]`` (pooled layout; ``[N, S]`` for residual / grouped
quantizers with S indices per latent) or ``[rows, cols]`` of patches (spatial layout; ``[rows,
cols, S]``). Decoding needs nothing else: the pooled model predicts the grid's size from its codes,
the spatial one reads it off the decoded PAD/EOS cells (or its size heads).

A codes file (``.npz``) holds every grid's codes flattened one after the other (``codes``,
``[total, S]``), each grid's code array shape (``code_shapes``, ``[G, 3]``: rows, cols, S, with
rows = 1 for pooled codes) and where each grid came from (``task_ids``, ``subsets``,
``pair_indices``, ``roles``), plus ``codebook_size`` and ``layout``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pips.data.arc import GridRecord
from pips.data.batch import collate_grids
from pips.data.vocab import MAX_GRID_SIZE
from pips.evaluation.evaluate import decode_patches, decode_slots
from pips.models.grid_dvae import GridDVAE


class CodesError(ValueError):
    """A codes file that cannot be decoded by this model; the message says why."""


def _batches(grids: Sequence[np.ndarray], batch_size: int):
    """Indices of ``grids`` in batches of similar size (less padding), every grid once."""
    order = sorted(range(len(grids)), key=lambda i: (grids[i].shape, i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _require_codes(model: GridDVAE) -> None:
    if model.config.quantizer.kind == "none":
        raise CodesError(
            "this model has no quantizer (model.quantizer.kind=none), so its latents are not "
            "codes; encode with a model trained with a discrete quantizer"
        )


@torch.no_grad()
def encode_grids(
    model: GridDVAE, grids: Sequence[np.ndarray], batch_size: int = 128
) -> list[np.ndarray]:
    """Each grid's code indices (argmax codes, eval mode), in the order of ``grids``."""
    _require_codes(model)
    model.eval()
    out: list[np.ndarray | None] = [None] * len(grids)
    device = next(model.parameters()).device
    for chosen in _batches(grids, batch_size):
        batch = collate_grids([grids[i] for i in chosen], eos=model.eos).to(device)
        encoded = model.encode(batch)
        indices = encoded.quantizer.indices  # [B, N] or [B, N, S]
        if indices.dim() == 2:
            indices = indices.unsqueeze(-1)
        indices = indices.cpu().numpy()
        if model.spatial:
            p = model.output_patch
            wq = -(-batch.canvas_width // p)
            for row, i in enumerate(chosen):
                height, width = grids[i].shape
                rows = -(-height // p)
                cols = -(-(width + int(model.eos)) // p)
                board = indices[row].reshape(-1, wq, indices.shape[-1])
                out[i] = board[:rows, :cols]  # [rows, cols, S]
        else:
            for row, i in enumerate(chosen):
                out[i] = indices[row]  # [N, S]
    return [codes if codes.shape[-1] > 1 else codes[..., 0] for codes in out]


def _check_codes(model: GridDVAE, codes: np.ndarray, where: str) -> np.ndarray:
    codes = np.asarray(codes)
    levels = _levels(model)
    array = codes if codes.ndim == (3 if model.spatial else 2) else codes[..., None]
    expected = "[rows, cols]" if model.spatial else f"[{model.config.num_latents}]"
    if array.ndim != (3 if model.spatial else 2) or array.shape[-1] != levels:
        raise CodesError(
            f"{where}: codes of shape {codes.shape} do not fit this model, which takes "
            f"{expected} codes{'' if levels == 1 else f' with {levels} indices each'}"
        )
    if not model.spatial and array.shape[0] != model.config.num_latents:
        raise CodesError(
            f"{where}: {array.shape[0]} codes, but this model has "
            f"{model.config.num_latents} latent slots per grid"
        )
    if model.spatial:
        limit = -(-MAX_GRID_SIZE // model.output_patch)
        limit_cols = -(-(MAX_GRID_SIZE + int(model.eos)) // model.output_patch)
        if array.shape[0] > limit or array.shape[1] > limit_cols or 0 in array.shape:
            raise CodesError(
                f"{where}: a {array.shape[0]} x {array.shape[1]} board of patch codes does not "
                f"describe a grid of at most {MAX_GRID_SIZE} x {MAX_GRID_SIZE} cells"
            )
    size = model.quantizer.codebook_size
    if not np.issubdtype(array.dtype, np.integer):
        raise CodesError(f"{where}: codes must be integers; got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= size):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise CodesError(
            f"{where}: code index {bad} is out of range; this model's codebook has {size} "
            f"codes (0 to {size - 1})"
        )
    return array


def _levels(model: GridDVAE) -> int:
    quantizer = model.config.quantizer
    if quantizer.kind == "rvq":
        return quantizer.num_stages
    if quantizer.kind == "gvq":
        return quantizer.groups
    return 1


@torch.no_grad()
def decode_codes(
    model: GridDVAE,
    codes: Sequence[np.ndarray],
    pad_weight: float,
    batch_size: int = 128,
) -> list[np.ndarray]:
    """Grids rebuilt from code arrays alone (see the module docstring for their shapes).

    ``pad_weight`` is the run's ``loss.pad_weight``: it decides whether a spatial model's grid
    sizes are read off the decoded PAD/EOS cells or come from its size heads.
    """
    _require_codes(model)
    model.eval()
    arrays = [_check_codes(model, c, f"grid {i}") for i, c in enumerate(codes)]
    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(arrays)
    for chosen in _batches(arrays, batch_size):
        chunk = [arrays[i] for i in chosen]
        grids = (
            _decode_spatial(model, chunk, pad_weight, device)
            if model.spatial
            else _decode_pooled(model, chunk, device)
        )
        for i, grid in zip(chosen, grids, strict=True):
            out[i] = grid
    return out


def _squeeze(indices: torch.Tensor) -> torch.Tensor:
    return indices[..., 0] if indices.shape[-1] == 1 else indices


def _decode_pooled(model: GridDVAE, chunk: list[np.ndarray], device) -> list[np.ndarray]:
    indices = _squeeze(torch.as_tensor(np.stack(chunk), device=device).long())  # [B, N(, S)]
    quantized = model.quantizer.codes_to_quantized(indices)  # [B, N, D]
    batch, slots = quantized.shape[:2]
    positions = torch.zeros(batch, slots, 2, dtype=torch.long, device=device)
    padding = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    return decode_slots(model, quantized, positions, padding)


def _decode_spatial(model, chunk: list[np.ndarray], pad_weight: float, device):
    """Spatial layout: the patch codes on one board (top-left aligned), padding elsewhere."""
    rows = max(a.shape[0] for a in chunk)
    cols = max(a.shape[1] for a in chunk)
    levels = chunk[0].shape[-1]
    board = torch.zeros(len(chunk), rows, cols, levels, dtype=torch.long)
    padding = torch.ones(len(chunk), rows, cols, dtype=torch.bool)
    for b, array in enumerate(chunk):
        board[b, : array.shape[0], : array.shape[1]] = torch.as_tensor(array)
        padding[b, : array.shape[0], : array.shape[1]] = False
    indices = _squeeze(board.view(len(chunk), rows * cols, levels).to(device))
    quantized = model.quantizer.codes_to_quantized(indices)  # [B, rows * cols, D]
    padding = padding.view(len(chunk), -1).to(device)
    return decode_patches(model, quantized, padding, rows, cols, pad_weight > 0)


# ------------------------------------------------------------------------------------ files


def save_codes(
    path: str | Path,
    codes: Sequence[np.ndarray],
    records: Sequence[GridRecord],
    model: GridDVAE,
    checkpoint: str,
) -> Path:
    """Write a codes file; returns its path (``.npz`` added, or ``codes.npz`` in a folder)."""
    shapes = []
    flat = []
    for array in codes:
        array = array if array.ndim == (3 if model.spatial else 2) else array[..., None]
        if not model.spatial:
            array = array[None]  # [1, N, S]
        shapes.append(array.shape)
        flat.append(array.reshape(-1, array.shape[-1]))
    path = output_file(path, "codes.npz", ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        codes=np.concatenate(flat) if flat else np.zeros((0, 1), dtype=np.int64),
        code_shapes=np.asarray(shapes, dtype=np.int64).reshape(-1, 3),
        task_ids=np.asarray([r.task_id for r in records], dtype=str),
        subsets=np.asarray([r.subset for r in records], dtype=str),
        pair_indices=np.asarray([r.pair_index for r in records], dtype=np.int64),
        roles=np.asarray([r.role for r in records], dtype=str),
        codebook_size=np.int64(model.quantizer.codebook_size),
        layout=np.asarray(model.config.layout),
        checkpoint=np.asarray(checkpoint),
    )
    return path


def load_codes(path: str | Path) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """A codes file -> (each grid's code array, the per-grid metadata arrays)."""
    path = Path(path)
    if not path.is_file():
        raise CodesError(f"codes file {path} does not exist; write one with pips encode")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise CodesError(f"{path} is not a codes file written by pips encode ({error})") from None
    validate_codes_file(files, path)
    flat, shapes = files["codes"], files["code_shapes"]
    counts = shapes[:, 0] * shapes[:, 1]
    starts = np.concatenate([[0], np.cumsum(counts)])
    arrays = []
    layout = str(files.get("layout", "spatial"))
    for (rows, cols, levels), start, end in zip(shapes, starts[:-1], starts[1:], strict=True):
        array = flat[start:end].reshape(rows, cols, levels)
        if layout == "pooled":
            array = array[0]
        arrays.append(array if levels > 1 else array[..., 0])
    return arrays, files


MAX_BOARD_SIDE = 1024  # rows or columns of one grid's codes; a real grid has at most 31
SUBSETS = ("train", "test")
ROLES = ("input", "output")


def validate_codes_file(files: dict[str, np.ndarray], path: str | Path) -> None:
    """Every array of a codes file checked (dtype, shape, range, agreement) before any is used, so
    a damaged or crafted file is one :class:`CodesError` sentence, never a crash or an unbounded
    allocation."""

    def fail(problem: str) -> CodesError:
        return CodesError(
            f"{path} is not a valid codes file: {problem}; write it again with pips encode"
        )

    missing = {"codes", "code_shapes", "task_ids"} - set(files)
    if missing:
        raise CodesError(
            f"{path} is not a codes file written by pips encode (it lacks "
            f"{', '.join(sorted(missing))})"
        )
    flat, shapes = files["codes"], files["code_shapes"]
    for name, array in (("codes", flat), ("code_shapes", shapes)):
        if not np.issubdtype(array.dtype, np.integer):
            raise fail(f"{name} must hold integers; it holds {array.dtype}")
    if flat.ndim != 2 or flat.shape[1] < 1:
        raise fail(f"codes must be a [total, S] array; it has shape {flat.shape}")
    if shapes.ndim != 2 or shapes.shape[1] != 3:
        raise fail(
            f"code_shapes must be a [grids, 3] array (rows, cols, S); it has shape {shapes.shape}"
        )
    if shapes.size and (shapes.min() < 1 or shapes[:, :2].max() > MAX_BOARD_SIDE):
        raise fail(f"code_shapes must hold rows and columns from 1 to {MAX_BOARD_SIDE} and S >= 1")
    if shapes.size and (shapes[:, 2] != flat.shape[1]).any():
        raise fail(f"code_shapes give S other than the {flat.shape[1]} indices per code of codes")
    total = int(shapes[:, 0].astype(np.int64) @ shapes[:, 1].astype(np.int64)) if shapes.size else 0
    if total != len(flat):
        raise fail(f"code_shapes describe {total} codes but the file holds {len(flat)}")
    grids = len(shapes)
    layout = files.get("layout")
    if layout is not None and (layout.ndim != 0 or str(layout) not in ("pooled", "spatial")):
        raise fail(f"layout must be pooled or spatial; got {layout!r}")
    if layout is not None and str(layout) == "pooled" and shapes.size and (shapes[:, 0] != 1).any():
        raise fail("pooled codes have rows = 1 in code_shapes")
    for name in ("task_ids", "subsets", "roles", "pair_indices"):
        if name not in files:
            continue
        array = files[name]
        if array.ndim != 1 or len(array) != grids:
            raise fail(f"{name} must have one entry per grid ({grids}); it has shape {array.shape}")
    for name, allowed in (("subsets", SUBSETS), ("roles", ROLES)):
        if name in files:
            unknown = sorted(set(map(str, files[name])) - set(allowed))
            if unknown:
                raise fail(f"{name} must be {' or '.join(allowed)}; got {unknown[0]!r}")
    if "pair_indices" in files:
        pairs = files["pair_indices"]
        if not np.issubdtype(pairs.dtype, np.integer):
            raise fail(f"pair_indices must hold integers; it holds {pairs.dtype}")
        if pairs.size and (pairs.min() < 0 or pairs.max() >= max(grids, 1)):
            bad = int(pairs.min()) if pairs.min() < 0 else int(pairs.max())
            raise fail(f"pair index {bad} is outside 0 to {grids - 1} (the file has {grids} grids)")
    if files["task_ids"].dtype.kind not in "US":
        raise fail(f"task_ids must be strings; they are {files['task_ids'].dtype}")


def output_file(out: str | Path, default_name: str, suffix: str) -> Path:
    """Where a verb writes: ``out`` itself, ``out/default_name`` when ``out`` is a folder, with
    ``suffix`` added when ``out`` lacks it (so the printed path is the file written)."""
    out = Path(out)
    if out.is_dir():
        return out / default_name
    return out if out.suffix == suffix else out.with_name(out.name + suffix)


def grids_to_arc_json(
    grids: Sequence[np.ndarray], metadata: dict[str, np.ndarray], path: str | Path
) -> int:
    """Write grids as ARC task JSON (``{task: {"train": [{"input", "output"}], "test": [...]}}``)
    in the places the metadata names; returns the number of tasks."""
    tasks: dict[str, dict[str, list[dict]]] = {}
    names = metadata.get("task_ids")
    for i, grid in enumerate(grids):
        task_id = str(names[i]) if names is not None else f"grid{i:05d}"
        subset = str(metadata["subsets"][i]) if "subsets" in metadata else "train"
        pair = int(metadata["pair_indices"][i]) if "pair_indices" in metadata else i
        role = str(metadata["roles"][i]) if "roles" in metadata else "input"
        pairs = tasks.setdefault(task_id, {"train": [], "test": []})[subset]
        while len(pairs) <= pair:
            pairs.append({})
        pairs[pair][role] = grid.tolist()
    path = output_file(path, "grids.json", ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tasks))
    return len(tasks)
