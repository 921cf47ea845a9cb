"""`pips shootout`: the same grid model trained with each quantizer at matched bits per code, on
the same data and budget, in one table.

Bits per code ``b`` are matched this way: gumbel, vq and simvq with ``2**b`` codes; fsq with the
levels Mentzer et al. (2023, Table 1) recommend for ``2**b`` codes; lfq with ``b`` bits; radial with
``b / 2`` channels of 4 levels; rvq and gvq with two stages / groups of ``2**(b/2)`` codes each;
product_vq with two chunks of ``2**(b/2)`` codes; residual_fsq with two stages of about ``2**(b/2)``
codes; none (continuous) as the unquantized reference.
Every run gets the same seed, data, model, optimizer and step budget.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from pips.config import QUANTIZER_KINDS, ConfigError, load_config
from pips.evaluation.runs import run_row
from pips.training.run import train

KINDS = QUANTIZER_KINDS  # every quantizer, the continuous reference ("none") last
RUN_NAMES = {"none": "continuous"}  # a run named "none" would read as no name
FSQ_LEVELS = {
    8: [8, 6, 5],
    10: [8, 5, 5, 5],
    12: [7, 5, 5, 5, 5],
    14: [8, 8, 8, 6, 5],
    16: [8, 8, 8, 5, 5, 5],
}
HALF_LEVELS = {4: [5, 3], 5: [8, 4], 6: [8, 8], 7: [8, 4, 4], 8: [8, 6, 5]}  # residual_fsq stages


def quantizer_overrides(kind: str, bits: int) -> list[str]:
    """Config overrides that give quantizer ``kind`` ``bits`` bits per code."""
    if bits not in FSQ_LEVELS:
        raise ConfigError(
            f"shootout --bits must be one of {', '.join(map(str, FSQ_LEVELS))} (the FSQ level "
            f"sets that match them); got {bits}"
        )
    prefix = "model.quantizer"
    overrides = [f"{prefix}.kind={kind}"]
    half = 2 ** (bits // 2)
    if kind in ("gumbel", "vq", "lfq", "simvq"):
        overrides.append(f"{prefix}.codebook_size={2**bits}")
    elif kind == "fsq":
        overrides.append(f"{prefix}.levels={FSQ_LEVELS[bits]}")
    elif kind == "radial":
        overrides += [f"{prefix}.base=4", f"{prefix}.codebook_size={2**bits}"]
    elif kind == "product_vq":
        overrides += [f"{prefix}.shared_codebook=false", f"{prefix}.levels=[{half},{half}]"]
    elif kind == "residual_fsq":
        overrides += [f"{prefix}.num_stages=2", f"{prefix}.levels={HALF_LEVELS[bits // 2]}"]
    elif kind == "rvq":
        overrides += [f"{prefix}.num_stages=2", f"{prefix}.codebook_size={half}"]
    elif kind == "gvq":
        overrides += [f"{prefix}.groups=2", f"{prefix}.codebook_size={half}"]
    return overrides


def run_shootout(
    config_path: str | None,
    overrides: list[str],
    bits: int = 10,
    steps: int = 150,
    minutes: float | None = None,
    root: str | Path | None = None,
    kinds: tuple[str, ...] = KINDS,
    final_grids: int | None = 512,
    on_start=None,
) -> tuple[Path, list[dict]]:
    """Train one run per quantizer in ``root`` (default ``runs/shootout-<time>``); returns the
    folder and one row per run (see :func:`pips.evaluation.runs.run_row`)."""

    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ConfigError(f"shootout --kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    root = Path(root or Path("runs") / datetime.now().strftime("shootout-%Y%m%d-%H%M%S"))
    budget = [f"trainer.max_steps={steps}", f"trainer.max_minutes={minutes or 'null'}"]
    budget.append(f"data.max_final_val_samples={final_grids or 'null'}")
    plans = []
    for kind in kinds:
        run_overrides = [
            *overrides,
            *quantizer_overrides(kind, bits),
            *budget,
            f"run_root={root}",
            f"name={RUN_NAMES.get(kind, kind)}",
            "trainer.progress=false",
        ]
        load_config(config_path, run_overrides)  # every config checked before any training
        plans.append((kind, run_overrides))
    rows = []
    for kind, run_overrides in plans:
        if on_start is not None:
            on_start(kind)
        run_dir, _ = train(config_path, run_overrides)
        rows.append(run_row(run_dir))
    (root / "shootout.json").write_text(json.dumps({"bits_per_code": bits, "runs": rows}, indent=2))
    return root, rows
