"""Validation split across two gloo processes gives the metrics of one process on all the items:
every task's validation metric and the code usage are sums (or concatenations) across ranks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pips.data import collate_grids
from pips.metrics import CodeUsage, code_metrics
from pips.tasks.grids import GridQuality

WORLD_SIZE = 2


def _batches():
    """Six batches of random grids, predictions and codes (uneven sizes, padded latents)."""
    rng = np.random.default_rng(0)
    out = []
    for b in range(6):
        grids = [
            rng.integers(0, 10, size=(rng.integers(1, 6), rng.integers(1, 6))) for _ in range(3 + b)
        ]
        batch = collate_grids(grids)
        colours = torch.where(
            torch.from_numpy(rng.random(batch.tokens.shape) < 0.7),
            batch.tokens,
            torch.zeros_like(batch.tokens),
        )
        sizes = batch.shapes.clone()
        sizes[0, 0] += 1  # one size wrong per batch
        indices = torch.from_numpy(rng.integers(0, 37, size=(len(grids), 5)))
        padding = torch.from_numpy(rng.random((len(grids), 5)) < 0.2)
        out.append((batch, colours, sizes, indices, padding))
    return out


def _metrics(batches, **kwargs) -> dict[str, float]:
    quality = GridQuality(**kwargs)
    usage = CodeUsage(37, slotted=True, **kwargs)
    for batch, colours, sizes, indices, padding in batches:
        quality.update(colours, sizes, batch)
        usage.update(indices, padding)
    return {**quality.compute(), **code_metrics(usage, "grids")}


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    mine = _batches()[rank::WORLD_SIZE]  # as the validation loaders shard: every other batch
    torch.save(_metrics(mine), Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_validation_metrics_equal_one_process_on_the_same_items(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    alone = _metrics(_batches(), sync_on_compute=False)
    for rank in range(WORLD_SIZE):
        split = torch.load(tmp_path / f"rank{rank}.pt")
        assert split.keys() == alone.keys()
        for key, value in alone.items():
            assert split[key] == value or abs(split[key] - value) < 1e-9, key
    assert 0 < alone["cell_accuracy"] < 1 and alone["codebook_perplexity"] > 1
