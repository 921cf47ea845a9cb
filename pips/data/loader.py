"""From grid records to a DataLoader of :class:`Batch` objects: bucketed, augmented, resumable.

Augmentation seeding: the sampler yields :class:`BatchIndices`, a list of indices that carries
``(seed, epoch, batch_number)``; the dataset's ``__getitems__`` augments the batch with
``np.random.default_rng([seed, epoch, batch_number])``. A batch's content is thus a pure function
of the seed, the epoch and its position in the epoch: the same with 0 or 8 workers, and the same
after resuming mid-epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from pips.data.arc import GridRecord
from pips.data.augment import GridAugmenter
from pips.data.batch import collate_grids
from pips.data.sampler import BucketBatchSampler
from pips.data.vocab import MAX_GRID_SIZE, VOCAB, Vocabulary


class GridBatches(torch.utils.data.Dataset):
    """Map-style dataset of grids; ``__getitems__`` builds (and augments) a whole batch at once."""

    def __init__(
        self,
        grids: Sequence[GridRecord] | Sequence[np.ndarray],
        augmenter: GridAugmenter | None = None,
    ) -> None:
        self.grids = [np.asarray(getattr(item, "grid", item), dtype=np.int64) for item in grids]
        self.shapes = np.array([grid.shape for grid in self.grids], dtype=np.int64).reshape(-1, 2)
        self.augmenter = augmenter

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, index: int) -> np.ndarray:
        """One grid as stored, [H, W] (never augmented: augmentation is a per-batch draw)."""
        return self.grids[index]

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The grids of one batch, augmented with the batch's own seed when there is an augmenter."""
        grids = [self.grids[index] for index in indices]
        if self.augmenter is None:
            return grids
        rng_key = getattr(indices, "rng_key", None)
        if rng_key is None:
            raise TypeError(
                "GridBatches with an augmenter needs BatchIndices (from BucketBatchSampler) to "
                f"seed each batch's augmentation; got a plain {type(indices).__name__}"
            )
        return self.augmenter(grids, np.random.default_rng(list(rng_key)))


class GridDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose position in the epoch is saved and restored with a checkpoint.

    Lightning stores ``state_dict()`` of a stateful train loader in the checkpoint and calls
    ``load_state_dict`` on resume, so a run stopped mid-epoch continues with the very next batch.
    The position counts batches handed out by the sampler, which equals the batches trained on
    when ``num_workers=0``; worker prefetching can make it run a few batches ahead.
    """

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


def make_dataloader(
    records: Sequence[GridRecord] | Sequence[np.ndarray],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    eos: bool = True,
    augmenter: GridAugmenter | None = None,
    bucket: bool = True,
    pad_to_max: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    vocab: Vocabulary = VOCAB,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    max_cells: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding :class:`Batch` objects; its ``batch_sampler`` holds the resume state.

    Training: ``shuffle=True`` and an augmenter. Validation: ``shuffle=False``, no augmenter.
    ``pad_to_max`` puts every grid on a 30x30 canvas (the unbucketed baseline for benchmarks).
    ``max_cells``: batches cut by a cell budget (see :class:`BucketBatchSampler`).
    """
    dataset = GridBatches(records, augmenter)
    batch_sampler = BucketBatchSampler(
        dataset.shapes,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        bucket=bucket,
        drop_last=drop_last,
        num_replicas=num_replicas,
        rank=rank,
        max_cells=max_cells,
    )
    canvas_size = (MAX_GRID_SIZE, MAX_GRID_SIZE) if pad_to_max else None
    return GridDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=partial(collate_grids, eos=eos, vocab=vocab, canvas_size=canvas_size),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        # its own generator: starting an epoch's iterator draws a seed from it, not from torch's
        # global stream, which a resumed run would then draw from at a different moment
        generator=torch.Generator().manual_seed(seed),
    )
