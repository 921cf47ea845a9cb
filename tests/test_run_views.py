"""`pips runs`, `pips compare` and `pips report` on the tiny run, and what training monitors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pips.config import load_config
from pips.plots import read_metrics
from pips.tasks.grids import GRID_REPORT_SECTIONS as SECTIONS


def test_runs_lists_finished_crashed_and_running_runs(tiny_run, tmp_path, cli):
    run_dir, _ = tiny_run
    root = tmp_path / "runs"
    for name in ("done", "crashed", "live", "killed"):
        shutil.copytree(run_dir, root / name)
    status = json.loads((root / "done" / "status.json").read_text())
    assert status["status"] == "finished" and "ended" in status
    (root / "crashed" / "status.json").write_text(
        json.dumps({"status": "crashed", "error": "RuntimeError: boom"})
    )
    import socket

    host = socket.gethostname()
    (root / "live" / "status.json").write_text(
        json.dumps({"status": "running", "pid": os.getpid(), "host": host})
    )
    gone = subprocess.Popen(["true"])
    gone.wait()
    (root / "killed" / "status.json").write_text(
        json.dumps({"status": "running", "pid": gone.pid, "host": host})
    )
    result = cli("runs", root, "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["done"]["status"] == "finished"
    assert rows["crashed"]["status"] == "crashed"
    assert rows["live"]["status"] == "running"
    assert rows["killed"]["status"] == "crashed"  # its process is gone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows["done"]["steps"] == summary["steps"]
    series = read_metrics(run_dir / "metrics.csv")
    assert rows["done"]["best_cell_accuracy"] == pytest.approx(max(series["val/cell_accuracy"][1]))
    table = cli("runs", root)
    assert table.exit_code == 0
    for name in ("done", "crashed", "live", "killed"):
        assert name in table.output


def test_a_run_that_raises_is_recorded_as_crashed(task_folder, tmp_path, cli, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr("pips.tasks.grids.GridsTask.final_metrics", explode)
    result = cli(
        "train",
        Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml",
        f"run_root={tmp_path}",
        "name=boom",
        f"grids.source={task_folder}",
        "trainer.max_steps=2",
        "trainer.val_every=2",
        "trainer.progress=false",
    )
    assert result.exit_code != 0
    status = json.loads((tmp_path / "boom" / "status.json").read_text())
    assert status["status"] == "crashed" and "simulated failure" in status["error"]
    assert json.loads(cli("runs", tmp_path, "--json").output)[0]["status"] == "crashed"


def test_runs_on_an_empty_folder_says_so(tmp_path, cli):
    result = cli("runs", tmp_path)
    assert result.exit_code == 2 and "no run folders" in result.output


def test_compare_puts_runs_side_by_side(tiny_run, cli, tmp_path):
    run_dir, _ = tiny_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    result = cli("compare", run_dir, other)
    assert result.exit_code == 0, result.output
    for header in ("bits/grid", "cell acc", "grid acc", "perplexity", "dead codes", "grids/s"):
        assert header in result.output
    rows = json.loads(cli("compare", run_dir, other, "--json").output)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows[0]["cell_accuracy"] == summary["cell_accuracy"]
    assert rows[0]["dead_codes"] == summary["val_dead_codes"]
    result = cli("compare", run_dir, tmp_path / "nothing")
    assert result.exit_code == 2 and "is not a run folder" in result.output


def test_report_is_one_html_file_with_every_section(tiny_run, tmp_path, cli):
    run_dir, _ = tiny_run
    out = tmp_path / "report.html"
    result = cli("report", run_dir, "--out", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page, section
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # curves, code usage, best and worst reconstructions
    assert all(len(image) > 1000 for image in images)
    assert 'src="http' not in page and 'href="http' not in page  # nothing fetched
    assert "model:" in page  # the config


def test_report_of_a_folder_without_checkpoints_is_one_sentence(tmp_path, cli):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    result = cli("report", run)
    assert result.exit_code == 2 and "has no checkpoints yet" in result.output


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_a_headless_browser(tiny_run, tmp_path, cli):
    run_dir, _ = tiny_run
    out = tmp_path / "report.html"
    assert cli("report", run_dir, "--out", out, "--grids", "32").exit_code == 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1100,2400",
            f"--screenshot={shot}",
            out.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1100)
    assert pixels[..., :3].std() > 0.05  # not a blank page


def test_training_logs_throughput_gradients_and_code_usage(tiny_run):
    run_dir, _ = tiny_run
    series = read_metrics(run_dir / "metrics.csv")
    for key in (
        "perf/grids_per_second",
        "perf/cells_per_second",
        "perf/data_seconds",
        "perf/step_seconds",
        "perf/peak_memory_mb",
        "grad_norm/total",
        "grad_norm/encoder",
        "grad_norm/decoder",
        "codes/usage_perplexity",
        "codes/dead",
        "codes/latent_norm",
        "schedule/lr",
        "val/codes_used",
        "val/dead_codes",
        "val/code_entropy_bits",
        "val/data_bits_per_grid",
    ):
        assert key in series, key
    steps, grads = series["grad_norm/total"]
    assert (grads > 0).all()
    # the total is the root of the sum of squares of the parts
    parts = [k for k in series if k.startswith("grad_norm/") and k != "grad_norm/total"]
    squares = sum(series[k][1] ** 2 for k in parts)
    assert squares == pytest.approx(grads**2, rel=1e-3)
    assert list((run_dir / "images").glob("code_usage_step*.png"))
    # the code string carries no more than its capacity
    entropy = series["val/code_entropy_bits"][1]
    capacity = series["val/bits_per_grid"][1]
    assert (entropy <= capacity + 1e-6).all()


def test_shootout_trains_each_quantizer_at_matched_bits_and_prints_one_table(
    task_folder, tmp_path, cli
):
    from pips.cli import KIND_NAMES
    from pips.evaluation.shootout import KINDS

    assert KIND_NAMES == KINDS
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    result = cli(
        "shootout",
        tiny,
        f"grids.source={task_folder}",
        "model.width=32",
        "--bits",
        "8",
        "--steps",
        "2",
        "--kinds",
        "fsq,lfq,rvq,none",
        "--final-grids",
        "16",
        "--out",
        tmp_path / "shoot",
    )
    assert result.exit_code == 0, result.output
    for header in ("bits/grid", "cell acc", "grid acc", "perplexity", "dead codes", "grids/s"):
        assert header in result.output
    table = json.loads((tmp_path / "shoot" / "shootout.json").read_text())
    rows = {row["quantizer"]: row for row in table["runs"]}
    assert set(rows) == {"fsq", "lfq", "rvq", "none"}
    assert rows["none"]["name"] == "continuous"
    # matched bits: every discrete quantizer spends 8 bits (fsq 8*6*5 = 240 codes, 7.9 bits)
    per_code = {}
    for name in ("fsq", "lfq", "rvq"):
        config = load_config(tmp_path / "shoot" / name / "config.yaml")
        per_code[name] = rows[name]["bits_per_grid"]
        assert rows[name]["steps"] == 2 and rows[name]["status"] == "finished"
    assert per_code["lfq"] == pytest.approx(per_code["rvq"])
    assert per_code["fsq"] == pytest.approx(per_code["lfq"] * math.log2(240) / 8)
    assert config.model.quantizer.num_stages == 2 and config.model.quantizer.codebook_size == 16
    assert rows["none"]["bits_per_grid"] == 0


def test_shootout_checks_every_config_before_training(tmp_path, cli):
    result = cli("shootout", "--bits", "9", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "--bits must be one of 8, 10, 12, 14, 16" in result.output
    result = cli("shootout", "--kinds", "fsq,pq", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "unknown ['pq']" in result.output
    assert not (tmp_path / "s").exists()
