"""The quantizer shoot-out at several matched bit budgets, as markdown tables for docs/results.md.

Runs ``pips shootout`` (every kind at ``b`` bits per code, same model, data, seed and steps) once
per budget on the ARC demo model (``configs/arc_demo.yaml``) or the digits model
(``configs/digits_vq.yaml``), and prints one table: bits per item, accuracy or PSNR, code
perplexity, codes used, dead codes (grids only), items per second.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shootout_tables.py --task arc --steps 150
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shootout_tables.py --task digits --steps 300

Each run trains for ``--steps`` steps, so a table is minutes per kind and budget on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pips.evaluation.shootout import KINDS, run_shootout

REPO = Path(__file__).resolve().parent.parent
TASKS = {  # task: (config, extra overrides)
    "arc": (REPO / "configs" / "arc_demo.yaml", []),
    "digits": (REPO / "configs" / "digits_vq.yaml", []),
}


def table_row(bits: int, kind: str, summary: dict) -> str:
    grids = "cell_accuracy" in summary
    bits_per_item = summary.get("bits_per_grid" if grids else "bits_per_image")
    quality = (
        f"{summary['cell_accuracy']:.3f} / {summary['grid_accuracy']:.3f}"
        if grids
        else f"{summary.get('psnr', float('nan')):.2f}"
    )
    used = summary.get("codes_used", summary.get("val_codes_used"))
    cells = [
        str(bits),
        kind,
        "-" if bits_per_item is None else f"{bits_per_item:.0f}",
        quality,
        f"{summary.get('codebook_perplexity', float('nan')):.1f}",
        "-" if used is None else f"{used:.0f}",
        "-" if summary.get("val_dead_codes") is None else f"{summary['val_dead_codes']:.0f}",
        f"{summary.get('grids_per_second', summary.get('images_per_second', 0)):.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="arc")
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 10, 12])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--kinds", nargs="*", default=list(KINDS))
    parser.add_argument("--final-items", type=int, default=256, help="items in the final eval")
    parser.add_argument("--out", default="runs/shootout-tables")
    args = parser.parse_args()
    config, extra = TASKS[args.task]
    overrides = [*extra, "trainer.threads=1", f"trainer.val_every={args.steps}"]
    quality = "cell / grid accuracy" if args.task == "arc" else "PSNR dB"
    lines = [
        f"| bits/code | quantizer | bits/item | {quality} | perplexity | codes used | "
        "dead codes | items/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bits in args.bits:
        root = Path(args.out) / f"{args.task}-{bits}"
        _, rows = run_shootout(
            str(config),
            overrides,
            bits=bits,
            steps=args.steps,
            root=root,
            kinds=tuple(args.kinds),
            final_grids=args.final_items,
        )
        for row in rows:
            summary = json.loads((Path(row["path"]) / "summary.json").read_text())
            lines.append(table_row(bits, row["quantizer"], summary))
            print(lines[-1], flush=True)
    print(f"\n{args.task}: {config.name}, {args.steps} steps per run, seed 0\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
