"""`pips train` / `pips resume` end to end on the tiny preset, and their failures.

The tiny run is trained once per session (conftest ``tiny_run``); resume works on a copy.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pips.config import load_config

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
SUMMARY_KEYS = (
    "cell_accuracy",
    "grid_accuracy",
    "codebook_perplexity",
    "bits_per_grid",
    "steps",
    "wall_seconds",
    "grids_per_second",
)


def _metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _logged_steps(rows: list[dict[str, str]], column: str) -> list[int]:
    return sorted(int(row["step"]) for row in rows if row.get(column))


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fail the test if anything loads ARC data (config errors must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the config was checked")

    monkeypatch.setattr("pips.tasks.grids.load_grids", refuse)


# ----------------------------------------------------------------------------- train


def test_train_writes_a_complete_run_folder(tiny_run):
    run_dir, _ = tiny_run
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert list((run_dir / "images").glob("*.png")), "no reconstruction images"


def test_train_logs_train_and_validation_metrics_to_csv(tiny_run):
    run_dir, _ = tiny_run
    rows = _metrics_rows(run_dir)
    assert {"step", "train/loss", "val/cell_accuracy"} <= set(rows[0])
    train_steps = _logged_steps(rows, "train/loss")
    assert train_steps and max(train_steps) >= 25  # log_every 5 over 30 steps
    val_steps = _logged_steps(rows, "val/cell_accuracy")
    assert len(val_steps) == 2  # val_every 15 over 30 steps
    assert all(0.0 <= float(r["val/cell_accuracy"]) <= 1.0 for r in rows if r["val/cell_accuracy"])


def test_train_writes_a_summary_with_the_final_metrics(tiny_run):
    run_dir, _ = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["steps"] == 30
    assert 0.0 <= summary["cell_accuracy"] <= 1.0
    assert 0.0 <= summary["grid_accuracy"] <= 1.0
    assert summary["codebook_perplexity"] >= 1.0
    assert summary["bits_per_grid"] > 0
    assert summary["wall_seconds"] > 0 and summary["grids_per_second"] > 0


def test_train_saves_the_resolved_config(tiny_run):
    run_dir, _ = tiny_run
    saved = load_config(run_dir / "config.yaml")
    expected = load_config(
        TINY_CONFIG,
        ["trainer.threads=1", "trainer.progress=false", "name=t", f"run_root={run_dir.parent}"],
    )
    assert saved == expected


def test_train_prints_the_run_folder_and_the_final_metrics(tiny_run):
    run_dir, result = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"run folder: {run_dir}" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("final validation: "))
    printed = json.loads(line.removeprefix("final validation: "))
    assert set(printed) == set(SUMMARY_KEYS)
    assert printed["cell_accuracy"] == pytest.approx(summary["cell_accuracy"])
    assert printed["steps"] == 30


def test_training_the_same_name_twice_exits_2_with_a_sentence(copy_run, cli, no_data_loading):
    before = sorted(p.name for p in copy_run.rglob("*"))
    result = cli("train", TINY_CONFIG, f"run_root={copy_run.parent}", f"name={copy_run.name}")
    assert result.exit_code == 2
    assert "already holds a run" in result.output
    assert "pips resume" in result.output
    assert sorted(p.name for p in copy_run.rglob("*")) == before


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.quantizer.kindd=vq", ["model.quantizer.kindd", "model.quantizer.kind"]),
        ("trainer.max_steps=many", ["trainer.max_steps", "integer"]),
        ("model.quantizer.kind=vqq", ["model.quantizer.kind", "fsq"]),
        ("grids.val_fraction=3", ["grids.val_fraction", "<= 1"]),
    ],
)
def test_config_error_exits_2_naming_the_key_before_any_work(
    tmp_path, cli, no_data_loading, override, words
):
    run_root = tmp_path / "runs"
    result = cli("train", TINY_CONFIG, f"run_root={run_root}", "name=bad", override)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output
    assert not run_root.exists(), "a run folder was created for a config that cannot run"


def test_missing_config_file_exits_2(tmp_path, cli, no_data_loading):
    result = cli("train", tmp_path / "nope.yaml", f"run_root={tmp_path / 'runs'}")
    assert result.exit_code == 2
    assert "nope.yaml" in result.output
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resumed(tiny_run, tmp_path_factory, cli):
    """A copy of the tiny run resumed from step 30 to 40: (run folder, result, rows before,
    summary before). Resumed once for the tests below."""
    source, _ = tiny_run
    run_dir = tmp_path_factory.mktemp("resumed") / source.name
    shutil.copytree(source, run_dir)
    rows_before = _metrics_rows(run_dir)
    summary_before = json.loads((run_dir / "summary.json").read_text())
    result = cli("resume", run_dir, "trainer.max_steps=40")
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run_dir, result, rows_before, summary_before


def test_resume_continues_to_the_larger_step_count(resumed):
    run_dir, result, _, summary_before = resumed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["wall_seconds"] > summary_before["wall_seconds"]  # time adds up over sessions
    assert load_config(run_dir / "config.yaml").trainer.max_steps == 40
    assert f"run folder: {run_dir}" in result.output
    assert max(_logged_steps(_metrics_rows(run_dir), "train/loss")) >= 35
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))


def test_resume_keeps_the_earlier_metrics_csv_rows(resumed):
    run_dir, _, rows_before, _ = resumed
    earlier = {(row["step"], row["train/loss"]) for row in rows_before if row.get("train/loss")}
    rows = _metrics_rows(run_dir)
    kept = {(row["step"], row.get("train/loss")) for row in rows if row.get("train/loss")}
    assert earlier <= kept, (
        f"resume dropped metrics.csv rows of steps {sorted(int(s) for s, _ in earlier - kept)}"
    )
    assert len(_logged_steps(rows, "val/cell_accuracy")) == 2  # periodic: steps 15 and 30
    assert len(_logged_steps(rows, "final/cell_accuracy")) == 2  # full split: steps 30 and 40


def test_resume_with_a_bad_override_exits_2_and_leaves_the_run_alone(
    copy_run, cli, no_data_loading
):
    config_before = (copy_run / "config.yaml").read_text()
    result = cli("resume", copy_run, "optim.lr.kindd=cosine")
    assert result.exit_code == 2
    assert "optim.lr.kindd" in result.output
    assert (copy_run / "config.yaml").read_text() == config_before


def test_resume_of_a_folder_without_checkpoints_exits_2_with_a_sentence(
    tmp_path, cli, no_data_loading
):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": 5}}))
    result = cli("resume", run_dir)
    assert result.exit_code == 2
    assert "no checkpoints/last.ckpt" in result.output
    assert "pips train" in result.output


def test_resume_of_a_folder_that_is_not_a_run_exits_2(tmp_path, cli, no_data_loading):
    result = cli("resume", tmp_path)
    assert result.exit_code == 2
    assert "not a run folder" in result.output


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = _metrics_rows(run_dir)
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


def test_resumed_run_continues_exactly_as_an_uninterrupted_one(task_folder, tmp_path, cli):
    # 48 grids in batches of 8: 6 batches an epoch, so step 4 is mid-epoch. A constant learning
    # rate: a schedule resolved against max_steps would differ between 4 and 8 steps.
    common = [
        TINY_CONFIG,
        f"run_root={tmp_path}",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
        "data.max_samples=48",
        "data.batch_size=8",
        "optim.lr=0.001",
        "trainer.log_every=1",
        "trainer.val_every=4",
        "trainer.image_every=0",
        "trainer.progress=false",
        "trainer.threads=1",
    ]
    straight = cli("train", *common, "name=straight", "trainer.max_steps=8")
    assert straight.exit_code == 0, straight.output
    first = cli("train", *common, "name=stopped", "trainer.max_steps=4")
    assert first.exit_code == 0, first.output
    before = _train_losses(tmp_path / "stopped")
    expected = _train_losses(tmp_path / "straight")
    assert before == pytest.approx({step: expected[step] for step in range(4)})  # deterministic
    resumed = cli("resume", tmp_path / "stopped", "trainer.max_steps=8")
    assert resumed.exit_code == 0, resumed.output
    after = {step: loss for step, loss in _train_losses(tmp_path / "stopped").items() if step >= 4}
    assert after == pytest.approx({step: expected[step] for step in range(4, 8)}, rel=1e-6)


# ----------------------------------------------------------------------------- help


def test_help_lists_the_verbs(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert "train" in result.output and "resume" in result.output


@pytest.mark.parametrize("verb", ["train", "resume"])
def test_verb_help_lists_the_config_keys(cli, verb):
    result = cli(verb, "--help")
    assert result.exit_code == 0, result.output
    for key in ("model.quantizer.kind", "trainer.max_steps", "optim.lr", "data.batch_size"):
        assert key in result.output


def test_last_checkpoint_holds_the_final_step_when_a_validation_falls_on_it(tiny_run):
    """tiny.yaml validates at steps 15 and 30 of 30: last.ckpt must be the step-30 state (it was
    the step-15 one, so `pips resume` with more steps re-trained from step 15)."""
    import torch

    run_dir, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 30
