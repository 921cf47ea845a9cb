"""`optim.name=orthograd` and `loss.stablemax=true` reach the runner: a tiny run trains with both."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def test_a_tiny_run_trains_with_orthograd_and_stablemax(task_folder, tmp_path, cli):
    result = cli(
        "train",
        TINY_CONFIG,
        f"run_root={tmp_path}",
        "name=grok",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
        "optim.name=orthograd",
        "loss.stablemax=true",
        "trainer.max_steps=3",
        "trainer.val_every=3",
        "trainer.image_every=0",
        "trainer.progress=false",
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((tmp_path / "grok" / "summary.json").read_text())
    assert summary["steps"] == 3 and 0.0 <= summary["cell_accuracy"] <= 1.0
    config = (tmp_path / "grok" / "config.yaml").read_text()
    assert "name: orthograd" in config and "stablemax: true" in config
