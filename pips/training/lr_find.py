"""`pips lr-find`: Lightning's learning-rate range test on the real model and data.

The learning rate grows exponentially from ``min_lr`` to ``max_lr`` over ``steps`` training
steps while the loss is recorded; the suggestion is the rate at the steepest fall of the
(smoothed) loss. Lightning restores the initial weights afterwards; the run folder keeps the plot
(``lr_find.png``), the curve and the suggestion (``lr_find.json``) and the config.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner

from pips.config import load_config, save_config
from pips.tasks import TaskError, get_task
from pips.training.run import RunError, _quiet_lightning, _setup_torch, new_run_dir


def find_learning_rate(
    config_path: str | None,
    overrides: list[str],
    min_lr: float = 1e-6,
    max_lr: float = 1e-1,
    steps: int = 100,
) -> tuple[Path, float]:
    if not 0 < min_lr < max_lr:
        raise RunError(f"lr-find needs 0 < --min < --max; got --min {min_lr} --max {max_lr}")
    config = load_config(config_path, overrides)
    config.name = config.name or datetime.now().strftime("lr-find-%Y%m%d-%H%M%S")
    run_dir = new_run_dir(config)
    save_config(config, run_dir / "config.yaml")
    _quiet_lightning()
    _setup_torch(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    try:
        task = get_task(config)  # any task: its own data and module
        datamodule = task.datamodule()
        module = task.module(datamodule)
    except (TaskError, ValueError) as error:  # models say what does not fit in a ValueError
        raise RunError(str(error)) from None
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_steps=steps,
        accelerator=config.trainer.accelerator,
        devices=1,
        precision=config.trainer.precision,
        gradient_clip_val=config.optim.grad_clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=steps,
        update_attr=False,
        early_stop_threshold=None,
    )
    if finder is None:
        raise RunError("the learning-rate finder did not run (no training steps were taken)")
    suggestion = finder.suggestion()
    if suggestion is None or not math.isfinite(suggestion):
        raise RunError(
            "the loss never fell steadily over the range tried; widen it (--min, --max) or "
            "take more --steps"
        )
    figure = finder.plot(suggest=True)
    figure.axes[0].set_title(f"{config.name}: suggested {suggestion:.3g}")
    figure.savefig(run_dir / "lr_find.png", dpi=100)
    results = {
        "suggestion": suggestion,
        "min_lr": min_lr,
        "max_lr": max_lr,
        "steps": steps,
        "lr": [float(x) for x in finder.results["lr"]],
        "loss": [float(x) for x in finder.results["loss"]],
    }
    (run_dir / "lr_find.json").write_text(json.dumps(results, indent=2))
    return run_dir, float(suggestion)
