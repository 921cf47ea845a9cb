"""Lightning DataModule over ARC grids: loading, the train/validation split, size-bucketed loaders."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from pips.config import DataConfig
from pips.data.arc import GridRecord, load_grids, spread_evenly
from pips.data.augment import GridAugmenter
from pips.data.loader import make_dataloader


class GridDataModule(L.LightningDataModule):
    def __init__(self, config: DataConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.seed = seed
        self.train_records: list[GridRecord] = []
        self.val_records: list[GridRecord] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        config = self.config
        self.train_records = load_grids(
            config.source, config.train_split, config.val_fraction, config.max_samples
        )
        # validation never repeats a grid the model trains on
        self.val_records = load_grids(
            config.source, config.val_split, config.val_fraction, exclude=self.train_records
        )

    @property
    def periodic_val_records(self) -> list[GridRecord]:
        """The validation grids seen during training."""
        return spread_evenly(self.val_records, self.config.max_val_samples)

    @property
    def final_val_records(self) -> list[GridRecord]:
        """The grids of the evaluation after training (all, unless max_final_val_samples)."""
        return spread_evenly(self.val_records, self.config.max_final_val_samples)

    def train_dataloader(self) -> DataLoader:
        config = self.config
        augmenter = GridAugmenter(config.colour_permutation, config.keep_black, config.dihedral)
        return make_dataloader(
            self.train_records,
            config.batch_size,
            shuffle=True,
            seed=self.seed,
            eos=config.eos,
            augmenter=augmenter,
            bucket=config.bucket,
            num_workers=config.num_workers,
            max_cells=config.batch_cells,
            **self._shard(),
        )

    def _shard(self) -> dict[str, int]:
        """This process's share of the batches under DDP (every rank sees different grids)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return {}
        return {"num_replicas": trainer.world_size, "rank": trainer.global_rank}

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.periodic_val_records)

    def eval_dataloader(self, records: list[GridRecord]) -> DataLoader:
        return make_dataloader(
            records,
            self.config.val_batch_size,
            shuffle=False,
            seed=self.seed,
            eos=self.config.eos,
            augmenter=None,
            bucket=True,
            num_workers=0,
        )
