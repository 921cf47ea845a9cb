"""Training throughput with size-bucketed batches against every grid padded to 30x30, in one run.

The same model (``model`` of ``configs/arc_demo.yaml`` by default), the same ARC-AGI-1 training
grids, the same batch size, augmentation and loss; one optimizer step = fetch a batch, forward,
backward, AdamW step. After warm-up the two loaders are timed alternately, in chunks, on the same
model, so drift of the machine affects both alike; the ratio is bucketed / padded grids per second
(target: >= 4x).

    .venv/bin/python benchmarks/bucketing.py                       # CPU, 1 thread, <= ~2 min
    .venv/bin/python benchmarks/bucketing.py --steps 200 --budget 600 --threads 2
    .venv/bin/python benchmarks/bucketing.py --device cuda --config configs/arc_demo.yaml
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pips.config import load_config
from pips.data import GridAugmenter, load_grids, make_dataloader
from pips.tasks.grids import GridDVAEModule

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "arc_demo.yaml"


def endless(loader) -> Iterator:
    """Batches of ``loader`` forever, a new epoch (order and augmentation) each pass."""
    for epoch in itertools.count():
        loader.batch_sampler.set_epoch(epoch)
        yield from loader


class Mode:
    """One way of batching: its loader, and the time, grids and canvas cells of its timed steps."""

    def __init__(self, name: str, loader) -> None:
        self.name = name
        self.batches = endless(loader)
        self.seconds = 0.0
        self.steps = 0
        self.grids = 0
        self.canvas_cells = 0
        self.grid_cells = 0

    def row(self) -> tuple:
        return (
            self.name,
            self.steps,
            self.grids,
            self.seconds,
            self.grids / self.seconds,
            1000 * self.seconds / self.steps,
            self.canvas_cells / self.steps,
            self.grid_cells / self.canvas_cells,
        )


def train_step(module: GridDVAEModule, optimizer, batch, device) -> None:
    batch = batch.to(device)
    values = module.schedule_values(0)
    output = module(batch, **values)
    loss = module.compute_losses(output, batch, values["quantizer_weight"])["total"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed_steps(mode: Mode, count: int, module, optimizer, device, record: bool) -> None:
    for _ in range(count):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = next(mode.batches)
        train_step(module, optimizer, batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if record:
            mode.seconds += time.perf_counter() - start
            mode.steps += 1
            mode.grids += len(batch)
            mode.canvas_cells += batch.canvas_height * batch.canvas_width * len(batch)
            mode.grid_cells += int(batch.grid_mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a preset from configs/")
    parser.add_argument(
        "--steps", type=int, default=64, help="at most this many timed optimizer steps per mode"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="stop alternating after a round that ends past this many seconds "
        "of timed steps (both modes always get the same number of steps)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--chunk", type=int, default=4, help="steps per mode before switching")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config(args.config, args.overrides)
    data = config.grids
    batch_size = args.batch_size or config.data.batch_size
    torch.manual_seed(config.seed)
    records = load_grids("arc1", "training")
    augmenter = GridAugmenter(data.colour_permutation, data.keep_black, data.dihedral)

    def loader(bucket: bool, pad_to_max: bool):
        return make_dataloader(
            records,
            batch_size,
            shuffle=True,
            seed=config.seed,
            eos=data.eos,
            augmenter=augmenter,
            bucket=bucket,
            pad_to_max=pad_to_max,
        )

    modes = [
        Mode("bucketed", loader(bucket=True, pad_to_max=False)),
        Mode("padded 30x30", loader(bucket=False, pad_to_max=True)),
    ]
    module = GridDVAEModule.from_config(config).to(device).train()
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=1e-4, weight_decay=config.optim.weight_decay
    )
    parameters = sum(p.numel() for p in module.parameters())
    print(
        f"config {args.config}: layout {config.model.layout}, width {config.model.width}, "
        f"layers {config.model.encoder_layers}+{config.model.decoder_layers}, quantizer "
        f"{config.model.quantizer.kind}, {parameters:,} parameters"
    )
    print(
        f"{len(records)} ARC-AGI-1 training grids, batch {batch_size}, device {device}, "
        f"{torch.get_num_threads()} thread(s); up to {args.steps} timed steps per mode "
        f"(budget {args.budget:.0f} s) after {args.warmup} warm-up, alternating every "
        f"{args.chunk}"
    )

    for mode in modes:
        timed_steps(mode, args.warmup, module, optimizer, device, record=False)
    rounds = -(-args.steps // args.chunk)
    for number in range(rounds):
        order = modes if number % 2 == 0 else modes[::-1]  # who goes first alternates too
        for mode in order:
            count = min(args.chunk, args.steps - mode.steps)
            timed_steps(mode, count, module, optimizer, device, record=True)
        if sum(mode.seconds for mode in modes) > args.budget:
            break

    header = (
        "batching",
        "steps",
        "grids",
        "seconds",
        "grids/s",
        "ms/step",
        "cells/batch",
        "real cells",
    )
    print()
    print(
        f"{header[0]:<14}{header[1]:>7}{header[2]:>8}{header[3]:>9}{header[4]:>10}"
        f"{header[5]:>10}{header[6]:>13}{header[7]:>12}"
    )
    for mode in modes:
        name, steps, grids, seconds, rate, ms, cells, share = mode.row()
        print(
            f"{name:<14}{steps:>7}{grids:>8}{seconds:>9.2f}{rate:>10.1f}{ms:>10.1f}"
            f"{cells:>13.0f}{share:>11.1%}"
        )
    bucketed, padded = (mode.row()[4] for mode in modes)
    ratio = bucketed / padded
    verdict = "meets" if ratio >= 4 else "misses"
    print(f"\nbucketed / padded throughput: {ratio:.2f}x ({verdict} the >= 4x target)")
    assert np.isfinite(ratio)


if __name__ == "__main__":
    main()
