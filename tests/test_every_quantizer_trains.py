"""Every quantizer in the registry trains end to end through `pips train`, in both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pips.quantizers import QUANTIZERS

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@pytest.mark.parametrize("layout", ["spatial", "pooled"])
@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_every_quantizer_trains_with_pips_train(kind, layout, task_folder, tmp_path, cli):
    result = cli(
        "train",
        TINY_CONFIG,
        f"run_root={tmp_path}",
        f"name={kind}-{layout}",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
        f"model.layout={layout}",
        "model.num_latents=4",
        f"model.quantizer.kind={kind}",
        "model.quantizer.codebook_size=16",
        "model.quantizer.levels=[4,4]",
        "model.quantizer.dim=4" if kind == "lfq" else "model.quantizer.dim=null",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.image_every=0",
        "trainer.progress=false",
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((tmp_path / f"{kind}-{layout}" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert 0.0 <= summary["cell_accuracy"] <= 1.0
    if kind == "none":
        assert summary["bits_per_grid"] == 0.0
    else:
        assert summary["bits_per_grid"] > 0
        assert summary["codebook_perplexity"] >= 1.0


def test_a_run_with_latent_terms_plots_their_trajectories(task_folder, tmp_path, cli):
    result = cli(
        "train",
        TINY_CONFIG,
        f"run_root={tmp_path}",
        "name=terms",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
        "model.layout=pooled",
        "model.slots=regions",
        "model.num_latents=4",
        "model.quantizer.kind=gumbel",
        "model.quantizer.codebook_size=16",
        "loss.tc={kind: linear, start: 0, end: 0.1}",
        "loss.mi=0.01",
        "loss.batch_diversity=0.1",
        "trainer.max_steps=6",
        "trainer.val_every=3",
        "trainer.image_every=3",
        "trainer.log_every=1",
        "trainer.progress=false",
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_dir = tmp_path / "terms"
    from pips.plots import read_metrics

    series = read_metrics(run_dir / "metrics.csv")
    for key in ("loss/tc", "loss/mi", "loss/dwkl", "loss/batch_diversity", "weight/tc"):
        assert len(series[key][0]) == 6, key  # every step (log_every=1)
    steps, weights = series["weight/tc"]
    assert weights[0] == 0 and weights[-1] > weights[0]  # the linear ramp
    picture = run_dir / "images" / "loss_terms.png"
    assert picture.is_file()
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(picture).shape
    assert height > 400 and width > 400  # four panels drawn
