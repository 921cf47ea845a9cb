"""Two gloo processes on CPU: codebooks stay identical across ranks, and eval issues no collectives."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pips.quantizers import GroupVQ, ResidualVQ, VectorQuantizer

WORLD_SIZE = 2
STEPS = 3


def make_quantizers() -> dict[str, torch.nn.Module]:
    return {
        "ema": VectorQuantizer(
            8, 16, ema_decay=0.9, codebook_init="gaussian", dead_code_threshold=None
        ),
        "defaults": VectorQuantizer(8, 16),  # sample init and resets from uneven batches
        "rvq_defaults": ResidualVQ(8, 16, num_stages=2),
        "gvq_defaults": GroupVQ(8, 16, groups=2),
        "ema_kmeans_usage_reset": VectorQuantizer(
            8, 16, codebook_init="kmeans", dead_code_threshold=0.5
        ),
        "loss_distance_reset": VectorQuantizer(
            8, 16, ema_decay=None, dead_code_threshold=0.5, reset_strategy="distance"
        ),
        "gvq_distance_reset": GroupVQ(
            8, 16, groups=2, dead_code_threshold=0.8, reset_strategy="distance"
        ),
        "rvq_usage_reset": ResidualVQ(
            8, 16, num_stages=2, dead_code_threshold=0.8, overused_threshold=3.0
        ),
    }


def batch(rank: int, step: int) -> torch.Tensor:
    """Different data on every rank and step (and a different size on each rank, as the last batch
    of an epoch can be), reproducible in the parent process."""
    generator = torch.Generator().manual_seed(10 * rank + step)
    return 0.1 * torch.randn(48 - 8 * rank, 8, generator=generator) + rank


def _forbid_collectives(*args, **kwargs):
    raise AssertionError("a quantizer issued a collective in eval mode")


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        quantizers = make_quantizers()
        for step in range(STEPS):
            for quantizer in quantizers.values():
                quantizer(batch(rank, step))
        states = {name: quantizer.state_dict() for name, quantizer in quantizers.items()}
        for name in ("all_reduce", "all_gather", "broadcast"):
            setattr(dist, name, _forbid_collectives)
        for quantizer in quantizers.values():  # only this rank calls: a collective would hang
            quantizer.eval()(batch(rank, 0))
        torch.save(states, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_codebooks_identical_on_both_ranks_and_ema_equals_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE))
    for name in rank0:
        for key, value in rank0[name].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(
                    value, rank1[name][key], msg=f"{name}.{key} differs across ranks"
                )

    # The reduced EMA update equals one process seeing both ranks' data.
    single = VectorQuantizer(
        8, 16, ema_decay=0.9, codebook_init="gaussian", dead_code_threshold=None
    )
    for step in range(STEPS):
        single(torch.cat([batch(rank, step) for rank in range(WORLD_SIZE)]))
    torch.testing.assert_close(rank0["ema"]["codebooks"], single.codebooks)
    torch.testing.assert_close(rank0["ema"]["ema_count"], single.ema_count)
