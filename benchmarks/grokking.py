"""Steps to 99% validation accuracy on modular addition, with and without ⊥Grad (and StableMax).

Trains ``configs/grokking.yaml`` once per variant, in the same process and on the same data and
seed, and prints for each the first step whose validation accuracy on the unseen pairs reaches
``--target`` (and the first step the training accuracy logged reached it), read back from each
run's metrics.csv::

    python benchmarks/grokking.py --steps 3000            # adamw vs orthograd vs orthograd+stablemax
    python benchmarks/grokking.py --steps 3000 optim.weight_decay=0.1
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from pips.plots import read_metrics
from pips.training.run import train

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "adamw": [],
    "orthograd": ["optim.name=orthograd"],
    "orthograd + stablemax": ["optim.name=orthograd", "loss.stablemax=true"],
}


def first_step(series: dict, key: str, target: float) -> int | None:
    if key not in series:
        return None
    steps, values = series[key]
    for step, value in zip(steps, values, strict=True):
        if math.isfinite(value) and value >= target:
            return int(step)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="grokking-"))
    rows = []
    for name in args.variants.split(","):
        overrides = [
            *args.overrides,
            *VARIANTS[name],
            f"trainer.max_steps={args.steps}",
            f"run_root={root}",
            f"name={name.replace(' + ', '-')}",
            "trainer.progress=false",
        ]
        run_dir, summary = train(str(REPO / "configs" / "grokking.yaml"), overrides)
        series = read_metrics(run_dir / "metrics.csv")
        rows.append(
            (
                name,
                first_step(series, "train/accuracy", args.target),
                first_step(series, "val/accuracy", args.target),
                summary.get("accuracy"),
                summary.get("wall_seconds"),
            )
        )
    print(f"\nsteps to {args.target:.0%} accuracy, (a + b) mod 97, runs in {root}")
    print(f"{'variant':<24} {'train':>7} {'validation':>11} {'final val acc':>14} {'seconds':>8}")
    for name, train_step, val_step, final, seconds in rows:
        print(
            f"{name:<24} {train_step or '-':>7} {val_step or f'> {args.steps}':>11} "
            f"{final:>14.4f} {seconds:>8.0f}"
        )


if __name__ == "__main__":
    main()
