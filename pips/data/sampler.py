"""Size-bucketed, seeded, resumable batching of grids.

A batch's canvas is as large as its largest grid, so a batch that mixes a 3x3 grid with a 30x30
grid spends 99% of the small grid's slots on padding. Sorting grids by size before cutting batches
groups similar shapes: on ARC-AGI-1 training grids (3341 distinct grids) at batch size 32, the
share of canvas cells that are real grid cells (EOS column not counted) is

    bucketed (this sampler)      0.85
    random batches               0.20   (4.3x less efficient)
    every grid padded to 30x30   0.15

measured by ``padding_efficiency`` (``tests/test_data.py`` pins bucketed >= 2x random). With
``GridAugmenter``, whose orientation is drawn per batch, the bucketed figure stays 0.85.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class BatchIndices(list):
    """The dataset indices of one batch (a plain ``list[int]``) that also knows its place:
    ``(seed, epoch, batch_number)``, which seeds the batch's augmentation wherever it is built."""

    def __init__(self, indices: Sequence[int], seed: int, epoch: int, batch_number: int) -> None:
        super().__init__(indices)
        self.seed = seed
        self.epoch = epoch
        self.batch_number = batch_number

    @property
    def rng_key(self) -> tuple[int, int, int]:
        return (self.seed, self.epoch, self.batch_number)

    def __reduce__(self):  # keep the attributes when sent to a DataLoader worker
        return (BatchIndices, (list(self), self.seed, self.epoch, self.batch_number))


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches of indices, grouped by grid size, reproducible given ``(seed, epoch)``.

    With ``bucket=True``: sort indices by (max side, min side) with a seeded random tie-break, cut
    consecutive runs of ``batch_size``, then shuffle the order of the batches (when ``shuffle``).
    With ``bucket=False``: plain random (or, without ``shuffle``, sequential) batches.

    Epochs: call ``set_epoch(epoch)`` before each epoch (Lightning does) to get a new order.
    Resume: ``state_dict()`` holds the epoch and how many batches of it were yielded; after
    ``load_state_dict`` iteration continues with the next batch. Batches are counted when handed
    to the DataLoader, which runs ahead of training by its prefetch when ``num_workers > 0``; the
    training loop should then save ``{"epoch": e, "batches_yielded": batches it consumed}``.

    ``num_replicas``/``rank`` split each epoch's batches between data-parallel processes (batch
    ``rank``, ``rank + num_replicas``, ...), repeating a few batches so every rank gets as many.

    ``max_cells`` (bucketed only) cuts batches by a cell budget instead of a grid count: a batch
    of ``n`` grids whose largest side is ``s`` holds ``n * s * s <= max_cells`` cells, and at
    most ``batch_size`` grids. Large grids then come in smaller batches, and so in more of them:
    with a fixed count, the 4% of ARC-AGI-1 training grids with 500 cells or more get 4% of the
    optimizer steps though they hold a fifth of the cells (and 40% of the evaluation split's).
    A single grid larger than the budget is a batch of its own.
    """

    def __init__(
        self,
        shapes: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        bucket: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        max_cells: int | None = None,
    ) -> None:
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)  # [N, 2] (height, width)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size}")
        if max_cells is not None and (max_cells < 1 or not bucket):
            raise ValueError(
                f"max_cells (a batch's cell budget) needs bucketed batches and a positive count; "
                f"got max_cells={max_cells} with bucket={bucket}"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..num_replicas-1 = {num_replicas - 1}; got {rank}")
        if len(shapes) == 0:
            raise ValueError("cannot batch an empty dataset; check the data source and split")
        self.shapes = shapes
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.bucket = bucket
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.max_cells = max_cells
        # a budget's batch sizes depend only on the sorted sides, not on the seeded tie-break
        self._budget_sizes = self._cut_by_budget() if max_cells is not None else None
        self.epoch = 0
        self.batches_yielded = 0
        self._resume_from = 0  # where the next pass starts: set by load_state_dict, used once

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; the resume position is kept if it is the current epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_yielded = 0
            self._resume_from = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches_yielded = int(state["epoch"]), int(state["batches_yielded"])
        if not 0 <= batches_yielded <= len(self):
            raise ValueError(
                f"sampler state says {batches_yielded} batches of epoch {epoch} were yielded, but "
                f"an epoch has {len(self)}; the checkpoint was saved with other data or batch size"
            )
        self.epoch, self.batches_yielded = epoch, batches_yielded
        self._resume_from = batches_yielded

    def _cut_by_budget(self) -> list[int]:
        """The grid count of each batch, in size order, under ``max_cells`` and ``batch_size``."""
        sides = np.sort(self.shapes.max(axis=1))
        sizes, count = [], 0
        for side in sides.tolist():  # ascending: the grid joining a batch is its largest
            if count and (count >= self.batch_size or (count + 1) * side * side > self.max_cells):
                sizes.append(count)
                count = 0
            count += 1
        sizes.append(count)
        return sizes

    def _num_global_batches(self) -> int:
        if self._budget_sizes is not None:
            return len(self._budget_sizes)
        count = len(self.shapes)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __len__(self) -> int:
        return -(-self._num_global_batches() // self.num_replicas)

    def epoch_batches(self, epoch: int) -> list[BatchIndices]:
        """All batches of an epoch for this rank, in order; a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.shapes)
        if self.bucket:
            heights, widths = self.shapes[:, 0], self.shapes[:, 1]
            tie_break = rng.permutation(count) if self.shuffle else np.arange(count)
            # np.lexsort sorts by its last key first
            order = np.lexsort(
                (tie_break, np.minimum(heights, widths), np.maximum(heights, widths))
            )
        else:
            order = rng.permutation(count) if self.shuffle else np.arange(count)
        num_batches = self._num_global_batches()
        if self._budget_sizes is not None:
            chunks = np.split(order, np.cumsum(self._budget_sizes)[:-1])
        else:
            chunks = [
                order[start : start + self.batch_size]
                for start in range(0, num_batches * self.batch_size, self.batch_size)
            ]
        if self.shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        chunks += chunks[: len(self) * self.num_replicas - len(chunks)]  # equal share per rank
        return [
            BatchIndices(chunks[number].tolist(), self.seed, epoch, number)
            for number in range(self.rank, len(chunks), self.num_replicas)
        ]

    def __iter__(self) -> Iterator[BatchIndices]:
        """One pass over the epoch's batches. Every pass starts at the beginning, except the first
        pass after ``load_state_dict``, which starts where the saved state stopped. A pass that is
        abandoned early (a loop that stops after ``len(self)`` batches without exhausting the
        iterator) does not affect the next one."""
        batches = self.epoch_batches(self.epoch)
        start, self._resume_from = self._resume_from, 0
        for position in range(start, len(batches)):
            self.batches_yielded = position + 1
            yield batches[position]


def padding_efficiency(
    shapes: np.ndarray, batches: Sequence[Sequence[int]], canvas_size: tuple[int, int] | None = None
) -> float:
    """Real grid cells / canvas cells over all batches (1.0 = no padding; EOS column ignored)."""
    shapes = np.asarray(shapes, dtype=np.int64)  # [N, 2]
    real_cells = canvas_cells = 0
    for batch in batches:
        batch_shapes = shapes[np.asarray(batch)]  # [B, 2]
        height, width = canvas_size or batch_shapes.max(axis=0)
        real_cells += int(batch_shapes.prod(axis=1).sum())
        canvas_cells += len(batch) * int(height) * int(width)
    return real_cells / canvas_cells
