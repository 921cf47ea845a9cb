"""Runs that survive: bit-exact resume, stopping on a signal, NaN stops, --from lineage, run info."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pips.config import load_config

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def _common(task_folder, tmp_path) -> list[str]:
    return [
        TINY_CONFIG,
        f"run_root={tmp_path}",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
        "data.max_samples=48",
        "data.batch_size=8",
        "trainer.log_every=1",
        "trainer.val_every=5",
        "trainer.image_every=0",
        "trainer.progress=false",
        "trainer.threads=1",
        "trainer.deterministic=true",
    ]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return checkpoint["state_dict"], checkpoint


def test_stop_then_resume_gives_bit_identical_weights(task_folder, tmp_path, cli):
    # pooled Gumbel with noise and input masking: the run draws random numbers every step, the
    # cosine schedules span all 14 steps, and 48 grids in batches of 8 put step 7 mid-epoch
    common = [
        *_common(task_folder, tmp_path),
        "model.layout=pooled",
        "model.slots=regions",
        "model.num_latents=4",
        "model.quantizer.kind=gumbel",
        "model.quantizer.codebook_size=16",
        "grids.mask_ratio=0.3",
        "loss.batch_diversity=0.05",
        "trainer.max_steps=14",
    ]
    straight = cli("train", *common, "name=straight")
    assert straight.exit_code == 0, straight.output
    stopped = cli("train", *common, "name=stopped", "trainer.stop_at_step=7")
    assert stopped.exit_code == 0, stopped.output
    assert "pips resume" in stopped.output
    state, checkpoint = _weights(tmp_path / "stopped")
    assert checkpoint["global_step"] == 7
    assert json.loads((tmp_path / "stopped" / "status.json").read_text())["status"] == (
        "interrupted"
    )
    resumed = cli("resume", tmp_path / "stopped", "trainer.stop_at_step=null")
    assert resumed.exit_code == 0, resumed.output
    expected, _ = _weights(tmp_path / "straight")
    got, checkpoint = _weights(tmp_path / "stopped")
    assert checkpoint["global_step"] == 14
    assert set(got) == set(expected)
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"weights differ after resume: {different[:5]}"
    status = json.loads((tmp_path / "stopped" / "status.json").read_text())
    assert status["status"] == "finished"


def test_sigterm_saves_last_ckpt_exits_cleanly_and_resume_continues(task_folder, tmp_path):
    arguments = [str(a) for a in _common(task_folder, tmp_path)]
    arguments += ["name=signalled", "trainer.max_steps=100000", "trainer.val_every=100000"]
    run_dir = tmp_path / "signalled"
    process = subprocess.Popen(
        [sys.executable, "-m", "pips.cli", "train", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until training has logged a few steps
            metrics = run_dir / "metrics.csv"
            if metrics.is_file() and metrics.read_text().count("\n") > 3:
                break
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, output  # 128 + SIGTERM, as a shell reports it
    assert "SIGTERM" in output and f"pips resume {run_dir}" in output
    state, checkpoint = _weights(run_dir)  # a complete, loadable checkpoint
    step = checkpoint["global_step"]
    assert step >= 1
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    from typer.testing import CliRunner

    from pips.cli import app

    result = CliRunner().invoke(
        app, ["resume", str(run_dir), f"trainer.max_steps={step + 3}", "trainer.val_every=2"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 3


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the training loss NaN on the given calls of compute_losses (1-based)."""
    from pips.tasks.grids import GridDVAEModule

    original = GridDVAEModule.compute_losses
    calls = {"n": 0, "bad": set()}

    def compute_losses(self, output, batch, quantizer_weight):
        losses = original(self, output, batch, quantizer_weight)
        if self.training:
            calls["n"] += 1
            if calls["n"] in calls["bad"]:
                losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(GridDVAEModule, "compute_losses", compute_losses)
    return calls["bad"]


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_good_checkpoint(
    task_folder, tmp_path, cli, nan_at_call
):
    nan_at_call.add(8)  # the 8th training step (step 7)
    result = cli("train", *_common(task_folder, tmp_path), "name=nan", "trainer.max_steps=20")
    assert result.exit_code == 1
    assert "became nan at step 7" in result.output
    assert "the last finite loss was at step 6: cells=" in result.output
    assert "trainer.skip_nonfinite" in result.output
    _, checkpoint = _weights(tmp_path / "nan")
    assert checkpoint["global_step"] == 5  # the validation checkpoint before the NaN
    status = json.loads((tmp_path / "nan" / "status.json").read_text())
    assert status["status"] == "crashed" and "NonFiniteLoss" in status["error"]


def test_nan_batches_can_be_skipped(task_folder, tmp_path, cli, nan_at_call):
    nan_at_call.update({3, 4})
    result = cli(
        "train",
        *_common(task_folder, tmp_path),
        "name=skip",
        "trainer.max_steps=6",
        "trainer.skip_nonfinite=2",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["steps"] == 6  # two batches skipped, six optimizer steps taken
    state, _ = _weights(tmp_path / "skip")
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


def test_from_starts_a_new_run_from_another_runs_weights(tiny_run, tmp_path, cli):
    source, _ = tiny_run
    result = cli(
        "train",
        TINY_CONFIG,
        "--from",
        source,
        f"run_root={tmp_path}",
        "name=child",
        "optim.lr=0",  # no update: the child's weights are the parent's
        "optim.weight_decay=0",
        "trainer.max_steps=2",
        "trainer.val_every=2",
        "trainer.progress=false",
    )
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "child" / "config.yaml")
    assert config.init_from == str((source / "checkpoints" / "last.ckpt").resolve())
    parent, _ = _weights(source)
    child, _ = _weights(tmp_path / "child")
    model_keys = [key for key in parent if key.startswith("model.")]
    assert model_keys and all(torch.equal(parent[k], child[k]) for k in model_keys)


def test_from_a_checkpoint_of_another_shape_is_one_sentence(tiny_run, tmp_path, cli):
    source, _ = tiny_run
    result = cli("train", TINY_CONFIG, "--from", source, f"run_root={tmp_path}", "model.width=64")
    assert result.exit_code == 2
    assert "does not fit the model" in result.output


def test_a_run_records_commit_host_command_and_versions(tiny_run):
    run_dir, _ = tiny_run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert set(info) >= {"git_commit", "host", "command", "python", "packages"}
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["started"] <= status["ended"]


def test_resume_from_a_truncated_last_checkpoint_names_the_file(copy_run, cli):
    last = copy_run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    result = cli("resume", copy_run)
    assert result.exit_code == 2
    assert "last.ckpt" in result.output and "truncated or corrupt" in result.output


def test_an_unknown_stop_signal_is_a_config_error(cli, tmp_path):
    result = cli("train", TINY_CONFIG, "trainer.stop_signals=[SIGTERM, SIGNOPE]")
    assert result.exit_code == 2
    assert "SIGNOPE" in result.output and "SIGUSR1" in result.output


# ----------------------------------------------------------------------------- tuning aids


def test_lr_find_saves_the_plot_and_prints_a_suggestion(task_folder, tmp_path, cli):
    result = cli(
        "lr-find",
        TINY_CONFIG,
        f"run_root={tmp_path}",
        "name=lr",
        f"grids.source={task_folder}",
        "trainer.threads=1",
        "--steps",
        "20",
    )
    assert result.exit_code == 0, result.output
    assert "suggested learning rate:" in result.output and "optim.lr.start=" in result.output
    results = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert 1e-6 <= results["suggestion"] <= 1e-1
    assert len(results["lr"]) == len(results["loss"]) > 5
    assert results["lr"] == sorted(results["lr"])  # the rate grows through the search
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 5000


def test_debug_runs_a_few_steps_on_little_data_and_logs_no_metrics(task_folder, tmp_path, cli):
    result = cli(
        "train",
        TINY_CONFIG,
        f"run_root={tmp_path}",
        "name=dbg",
        f"grids.source={task_folder}",
        "trainer.debug=true",
        "trainer.max_steps=500",
        "trainer.progress=false",
    )
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "dbg" / "config.yaml")
    assert config.trainer.max_steps == 20 and config.data.max_samples == 64
    assert json.loads((tmp_path / "dbg" / "summary.json").read_text())["steps"] == 20
    assert not (tmp_path / "dbg" / "metrics.csv").exists()
    assert not (tmp_path / "dbg" / "tensorboard").exists()


def test_parameter_ema_is_what_validation_and_the_checkpoint_use(task_folder, tmp_path, cli):
    common = [
        *_common(task_folder, tmp_path),
        "trainer.max_steps=6",
        "trainer.val_every=3",
    ]
    assert cli("train", *common, "name=plain").exit_code == 0
    result = cli("train", *common, "name=ema", "trainer.ema_decay=0.5")
    assert result.exit_code == 0, result.output
    plain, _ = _weights(tmp_path / "plain")
    averaged, checkpoint = _weights(tmp_path / "ema")
    key = "model.encoder.0.mlp.up.weight"
    # the same training, but the saved weights are the average, not the last iterate
    assert not torch.equal(plain[key], averaged[key])
    assert any("EMAWeightAveraging" in name for name in checkpoint["callbacks"])


def test_light_profiler_writes_one_line_per_step(task_folder, tmp_path, cli):
    result = cli(
        "train",
        *_common(task_folder, tmp_path),
        "name=prof",
        "trainer.max_steps=4",
        "trainer.profiler=light",
    )
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "prof" / "profile.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        parts = record["forward_seconds"] + record["backward_seconds"]
        assert 0 < parts <= record["step_seconds"] + 1e-6
        assert record["cells_per_second"] > 0 and record["peak_memory_mb"] > 0


def test_global_batch_size_sets_the_accumulation():
    config = load_config(
        TINY_CONFIG, ["data.batch_size=8", "data.global_batch_size=32", "trainer.devices=2"]
    )
    assert config.optim.accumulate == 2
    from pips.config import ConfigError

    with pytest.raises(ConfigError, match=r"multiple of data.batch_size x trainer.devices"):
        load_config(TINY_CONFIG, ["data.batch_size=8", "data.global_batch_size=20"])


# ----------------------------------------------------------------------------- launch


def test_launch_dry_run_writes_a_slurm_job_array_for_a_sweep(tmp_path, cli):
    out = tmp_path / "launch"
    result = cli(
        "launch",
        TINY_CONFIG,
        "trainer.max_steps=50",
        "--sweep",
        "optim.lr.start=1e-4,3e-4",
        "--sweep",
        "model.width=32,64",
        "--slurm",
        "--gpus",
        "4",
        "--nodes",
        "2",
        "--partition",
        "gpu",
        "--time",
        "02:00:00",
        "--name",
        "grid",
        "--out",
        out,
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    script = (out / "job.sbatch").read_text()
    for line in (
        "#SBATCH --array=0-3",
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --time=02:00:00",
        "#SBATCH --signal=USR1@90",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        'srun pips resume "$RUN_DIR"',
        "scontrol requeue",
        "grid-start_1e-4-width_32",
        "grid-start_3e-4-width_64",
    ):
        assert line in script, line
    assert script.count("grid-start_") == 4
    assert "SIGUSR1" in script
    syntax = subprocess.run(["bash", "-n", str(out / "job.sbatch")], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_launch_dry_run_lists_torchrun_commands(tmp_path, cli):
    out = tmp_path / "launch"
    result = cli(
        "launch",
        TINY_CONFIG,
        "--sweep",
        "seed=1,2,3",
        "--torchrun",
        "2",
        "--out",
        out,
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    lines = [
        line for line in (out / "launch.sh").read_text().splitlines() if line.startswith("torchrun")
    ]
    assert len(lines) == 3
    for seed, line in zip((1, 2, 3), lines, strict=True):
        assert "--nproc-per-node=2" in line and f"seed={seed}" in line
        assert f"name=run-seed_{seed}" in line and "trainer.strategy=ddp" in line


def test_launch_checks_every_run_of_a_sweep_first(tmp_path, cli):
    result = cli(
        "launch",
        TINY_CONFIG,
        "--sweep",
        "model.width=32,30",
        "--torchrun",
        "1",
        "--out",
        tmp_path / "l",
        "--dry-run",
    )
    assert result.exit_code == 2 and "model.width" in result.output
    assert not (tmp_path / "l").exists()


# ----------------------------------------------------------------------------- DDP


def test_two_process_ddp_on_cpu_keeps_the_ranks_identical(task_folder, tmp_path):
    command = [
        sys.executable,
        "-m",
        "pips.cli",
        "train",
        str(TINY_CONFIG),
        f"run_root={tmp_path}",
        "name=ddp",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
        "model.quantizer.kind=vq",
        "model.quantizer.codebook_size=32",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.threads=1",
        "trainer.progress=false",
    ]
    run_dir = tmp_path / "ddp"
    environment = {**os.environ, "PIPS_SAVE_RANK_STATES": str(run_dir)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert result.stdout.count("run folder:") == 1  # one summary, from rank zero
    ranks = sorted(run_dir.glob("rank*_weights.pt"))
    assert len(ranks) == 2, "each rank saves its final weights (PIPS_SAVE_RANK_STATES)"
    zero, one = (torch.load(path) for path in ranks)
    assert set(zero) == set(one)
    different = [key for key in zero if not _same(zero[key], one[key])]
    assert not different, f"ranks differ: {different[:5]}"
    assert any("codebook" in key for key in zero)  # the VQ codebook (EMA buffers) included


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_checkpoints_every_n_steps_and_the_best_k_by_a_chosen_metric(task_folder, tmp_path, cli):
    result = cli(
        "train",
        *_common(task_folder, tmp_path),
        "name=ck",
        "trainer.max_steps=9",
        "trainer.val_every=3",
        "trainer.checkpoint_every=2",
        "trainer.best_metric=val/loss_cells",
        "trainer.best_mode=min",
        "trainer.keep_best=2",
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "ck" / "checkpoints"
    assert len(list(folder.glob("best-step*.ckpt"))) == 2
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]
    assert not list(folder.glob(".*.tmp"))  # no temporary files left behind
    from pips.plots import read_metrics
    from pips.tasks.checkpoints import find_checkpoint

    steps, losses = read_metrics(tmp_path / "ck" / "metrics.csv")["val/loss_cells"]
    best_step = int(steps[losses.argmin()]) + 1  # logged at the step before it is counted
    assert find_checkpoint(tmp_path / "ck").name == f"best-step{best_step}.ckpt"


def test_torch_profiler_writes_a_trace(task_folder, tmp_path, cli):
    result = cli(
        "train",
        *_common(task_folder, tmp_path),
        "name=tp",
        "trainer.max_steps=11",
        "trainer.profiler=torch",
    )
    assert result.exit_code == 0, result.output
    traces = list((tmp_path / "tp" / "profile").glob("*.json*"))
    assert traces and traces[0].stat().st_size > 1000


def test_asking_for_wandb_without_it_installed_is_one_sentence(task_folder, tmp_path, cli):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    result = cli("train", *_common(task_folder, tmp_path), "name=wb", "trainer.wandb=true")
    assert result.exit_code == 2
    assert "pip install wandb" in result.output


def test_best_metric_must_be_a_validation_metric(cli):
    result = cli("train", TINY_CONFIG, "trainer.best_metric=train/loss")
    assert result.exit_code == 2 and "val/cell_accuracy" in result.output
