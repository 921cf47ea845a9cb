"""The Task interface's promises: lr-find and the light profiler for every task, a compiled
model's checkpoint loads, and run folders written before task sections still evaluate and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pips.config import load_config, migrate
from pips.tasks import get_task
from pips.tasks.checkpoints import load_weights

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"

TINY = {
    "grids": [str(REPO / "configs" / "tiny.yaml"), "data.max_samples=64"],
    "images": [
        "task=images",
        "model.width=16",
        "model.quantizer.kind=fsq",
        "model.quantizer.levels=[3,3]",
        "images.channels=8",
        "images.res_blocks=0",
        "data.max_samples=128",
        "data.batch_size=16",
    ],
    "sequences": [
        "task=sequences",
        "sequences.length=16",
        "sequences.train_sequences=128",
        "sequences.val_sequences=16",
        "model.width=16",
        "model.heads=2",
        "model.encoder_layers=1",
        "model.decoder_layers=1",
        "model.patch_size=4",
        "model.quantizer.kind=fsq",
        "model.quantizer.levels=[3,3]",
        "data.batch_size=16",
    ],
}


def invoke(*arguments):
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


@pytest.mark.parametrize("task", sorted(TINY))
def test_lr_find_works_for_every_task(task, tmp_path):
    result = invoke("lr-find", *TINY[task], f"run_root={tmp_path}", "name=lr", "--steps", "30")
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert found["steps"] == 30 and len(found["loss"]) > 0


@pytest.mark.parametrize("task", sorted(TINY))
def test_the_light_profiler_works_for_every_task(task, tmp_path):
    result = invoke(
        "train", *TINY[task], f"run_root={tmp_path}", "name=p", "trainer.max_steps=4",
        "trainer.val_every=4", "trainer.profiler=light", "trainer.progress=false",
        "data.max_final_val_samples=16", "trainer.image_every=0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "p" / "profile.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 4 and all(row["cells_per_second"] > 0 for row in rows)


def test_a_compiled_model_keeps_its_weight_names():
    """trainer.compile compiles the model in place, so checkpoints load without a prefix."""
    task = get_task(load_config(str(REPO / "configs" / "tiny.yaml")))
    model = task.build_model({})
    names = set(model.state_dict())
    model.compile()  # what the runner does (compilation itself is lazy: nothing runs here)
    assert set(model.state_dict()) == names
    fresh = task.build_model({})
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    load_weights(fresh, state, Path("compiled.ckpt"))


def test_an_old_layout_config_migrates_to_task_sections():
    old = {
        "data": {"source": "arc2", "batch_size": 8, "mask_ratio": 0.2},
        "images": {"patch_size": 4},
        "task": "images",
        "loss": {"pad_weight": 0.5},
        "model": {"layout": "spatial"},
    }
    new = migrate(old)
    assert new["grids"] == {"source": "arc2", "mask_ratio": 0.2}
    assert new["data"] == {"batch_size": 8}
    assert new["model"]["patch_size"] == 4 and new["model"]["size_from"] == "cells"
    assert migrate(new) == new  # today's layout comes back unchanged
    assert old["data"]["source"] == "arc2"  # the input is not modified
    assert load_config(overrides=["data.source=arc2"]).grids.source == "arc2"


@pytest.mark.parametrize(
    ("run", "arguments", "metric", "value"),
    [
        # measured with the code that wrote these folders (commit 85b1b27), same command
        ("grids_v1", ["--data", "arc1:evaluation"], "cell_accuracy", 0.1386632663789362),
        ("images_v1", [], "psnr", 6.476377487182617),
    ],
)
def test_a_run_folder_from_before_task_sections_evaluates_and_resumes(
    run, arguments, metric, value, tmp_path
):
    copy = tmp_path / run
    shutil.copytree(FIXTURES / run, copy)
    evaluated = invoke("evaluate", copy, "--last", "--json", *arguments)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["metrics"][metric] == pytest.approx(value, rel=1e-6)
    resumed = invoke("resume", copy, "trainer.max_steps=6", "trainer.progress=false")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((copy / "summary.json").read_text())["steps"] == 6
    assert "grids:" in (copy / "config.yaml").read_text()  # rewritten in today's layout
    checkpoint = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6


def test_the_private_lightning_counter_the_run_guard_adjusts_still_exists():
    """RunGuard saves a checkpoint inside a batch and counts the step into Lightning's logging
    step by hand (fit_loop.epoch_loop._batches_that_stepped): pin that name, so a Lightning
    release that renames it fails here, not in a resumed run's metrics."""
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer.fit_loop.epoch_loop._batches_that_stepped, int)


def test_export_round_trips_every_tensor_and_extra_state(tmp_path):
    """A VQ model's extra state (its generator's state tensor inside a dict) survives export."""
    from pips.tasks.export import export_model, read_exported

    config = load_config(str(REPO / "configs" / "tiny.yaml"), ["model.quantizer.kind=vq"])
    task = get_task(config)
    model = task.build_model({})
    path = export_model(model, config, {}, 7, tmp_path / "m")
    checkpoint = read_exported(path)
    assert checkpoint["global_step"] == 7
    assert checkpoint["hyper_parameters"]["config"]["model"]["quantizer"]["kind"] == "vq"
    fresh = task.build_model({})
    load_weights(fresh, checkpoint["state_dict"], path)
    for key, value in model.state_dict().items():
        other = fresh.state_dict()[key]
        if isinstance(value, dict):
            for name, item in value.items():
                assert torch.equal(item, other[name]), key
        else:
            assert torch.equal(value, other), key
