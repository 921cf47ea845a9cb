"""`pips train` on images and on GSSM sequences, end to end through the command line, and the verbs
that read such runs (evaluate, probe) or refuse them (encode, decode, report)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pips.config import load_config

REPO = Path(__file__).resolve().parent.parent

IMAGE_RUN = [
    "images.channels=16",
    "images.res_blocks=1",
    "model.width=32",
    "data.batch_size=32",
    "data.max_val_samples=64",
    "data.max_final_val_samples=96",
    "trainer.max_steps=24",
    "trainer.val_every=12",
    "trainer.image_every=12",
    "trainer.log_every=4",
    "trainer.progress=false",
]
SEQUENCE_RUN = [
    "sequences.length=16",
    "sequences.train_sequences=256",
    "sequences.val_sequences=96",
    "model.width=32",
    "data.batch_size=32",
    "trainer.max_steps=24",
    "trainer.val_every=12",
    "trainer.log_every=4",
    "trainer.progress=false",
]


def invoke(*arguments: str):
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


def _train(tmp_path: Path, config: str, name: str, *overrides: str) -> tuple[Path, dict]:
    result = invoke(
        "train", str(REPO / "configs" / config), f"run_root={tmp_path}", f"name={name}", *overrides
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / name
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> tuple[Path, dict]:
    return _train(tmp_path_factory.mktemp("images"), "digits_vq.yaml", "digits", *IMAGE_RUN)


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory) -> tuple[Path, dict]:
    return _train(tmp_path_factory.mktemp("sequences"), "gssm_vq.yaml", "gssm", *SEQUENCE_RUN)


def test_images_run_writes_psnr_images_and_checkpoints(image_run):
    run_dir, summary = image_run
    assert summary["status"] == "finished" and summary["steps"] == 24
    assert summary["val_images"] == 96 and summary["train_images"] == 1438
    # 16 codes of 7 bits (128 codes) per 8x8 digit; PSNR of a few steps beats the blank image
    assert summary["bits_per_image"] == 16 * 7
    assert 10 < summary["psnr"] < 60 and 0 < summary["mse"] < 0.1
    assert summary["codebook_perplexity"] >= 2
    assert list((run_dir / "images").glob("reconstructions_step*.png"))
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))  # picked by val/psnr
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert any(row.get("val/psnr") for row in rows) and any(row.get("train/psnr") for row in rows)
    assert any(row.get("perf/cells_per_second") for row in rows)


def test_pips_evaluate_reproduces_the_final_validation_of_an_images_run(image_run):
    run_dir, summary = image_run
    result = invoke("evaluate", str(run_dir), "--last", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)["metrics"]
    assert metrics["psnr"] == pytest.approx(summary["psnr"], rel=1e-5)
    assert metrics["mse"] == pytest.approx(summary["mse"], rel=1e-5)


def test_an_images_run_encodes_and_decodes_its_validation_images(image_run, tmp_path):
    """encode then decode gives exactly the model's reconstructions from codes; the sheet too."""
    import numpy as np

    import pips

    run_dir, _ = image_run
    codes = tmp_path / "codes.npz"
    encoded = invoke("encode", str(run_dir), "--out", str(codes))
    assert encoded.exit_code == 0 and "images" in encoded.output, encoded.output
    decoded = invoke("decode", str(run_dir), str(codes), "--out", str(tmp_path / "images.npz"))
    assert decoded.exit_code == 0, decoded.output
    assert (tmp_path / "images.png").is_file()
    with np.load(tmp_path / "images.npz") as data:
        images = data["items"]
    tok = pips.load(run_dir)
    with np.load(codes) as data:
        count = len(data["code_shapes"])
    validation = tok.task.datamodule().val_items[0][:count]
    with torch.no_grad():
        expected = tok.model(validation).reconstruction.clamp(0, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)
    refused = invoke("encode", str(run_dir), "--out", str(codes), "--data", "arc1")
    assert refused.exit_code == 2 and "--data picks ARC grids" in refused.output


def test_pips_report_and_runs_show_images_and_sequences_runs(image_run, sequence_run, tmp_path):
    for (run_dir, _), shown in ((image_run, "Reconstructions"), (sequence_run, "token_accuracy")):
        out = tmp_path / f"{run_dir.name}.html"
        result = invoke("report", str(run_dir), "--out", str(out))
        assert result.exit_code == 0, result.output
        page = out.read_text()
        assert "Curves" in page and "Code usage" in page and shown in page
    rows = json.loads(invoke("compare", str(image_run[0]), str(sequence_run[0]), "--json").output)
    assert [row["task"] for row in rows] == ["images", "sequences"]
    assert rows[0]["result"].startswith("PSNR dB") and rows[1]["result"].startswith("token acc")


def test_vit_dct_images_with_gumbel_codes_and_latent_terms_train_finite(tmp_path):
    _, summary = _train(
        tmp_path,
        "digits_vq.yaml",
        "vit",
        *IMAGE_RUN,
        "images.backbone=vit",
        "images.dct=true",
        "images.reconstruction=logit_laplace",
        "model.heads=2",
        "model.quantizer.kind=gumbel",
        "model.quantizer.codebook_size=32",
        "loss.batch_diversity=0.1",
        "loss.kl=0.01",
        "trainer.max_steps=12",
    )
    assert summary["status"] == "finished"
    assert all(value == value for value in summary.values() if isinstance(value, float))  # no NaN


def test_sequences_run_reports_token_accuracy(sequence_run):
    run_dir, summary = sequence_run
    assert summary["status"] == "finished" and summary["val_sequences"] == 96
    assert 0.1 < summary["token_accuracy"] <= 1.0
    assert summary["bits_per_sequence"] == 4 * 8  # 16 tokens / 4 per code, 256 codes
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))  # picked by val/token_accuracy


def test_pips_probe_reads_a_hidden_node_against_the_bayes_optimal_accuracy(sequence_run):
    run_dir, _ = sequence_run
    result = invoke("probe", str(run_dir), "--target", "phase", "--features", "activations")
    assert result.exit_code == 0, result.output
    assert "Bayes-optimal" in result.output and "recover" in result.output
    result = invoke("probe", str(run_dir), "--target", "phase", "--json")
    scores = json.loads(result.output)
    assert scores["majority"] <= scores["bayes_optimal"] <= 1.0
    assert 0.0 <= scores["accuracy"] <= 1.0
    bad = invoke("probe", str(run_dir), "--target", "clock")
    assert bad.exit_code == 2 and "unknown hidden node 'clock'" in bad.output
    layer = invoke(
        "probe",
        str(run_dir),
        "--target",
        "phase",
        "--features",
        "activations",
        "--layer",
        "0",
        "--json",
    )
    assert layer.exit_code == 0, layer.output
    assert json.loads(layer.output)["features"] == "activations after layer 0"
    refused = invoke("probe", str(run_dir), "--target", "phase", "--layer", "1")
    assert refused.exit_code == 2 and "--layer picks encoder activations" in refused.output


def test_each_task_picks_its_best_checkpoints_by_its_own_metric():
    from pips.tasks import get_task
    from pips.training.run import best_metric

    def chosen(*overrides):
        return best_metric(get_task(load_config(overrides=list(overrides))))

    assert chosen("task=images") == ("val/psnr", "max")
    assert chosen("task=sequences") == ("val/token_accuracy", "max")
    assert chosen("task=grids") == ("val/cell_accuracy", "max")
    assert chosen("task=images", "trainer.best_metric=val/mse") == ("val/mse", "max")
    assert chosen("task=images", "trainer.best_metric=val/mse", "trainer.best_mode=min") == (
        "val/mse",
        "min",
    )


def test_a_sequences_run_stopped_mid_epoch_resumes_bit_identically(tmp_path):
    """The sequence and image loaders share the grids' stateful sampler: a run stopped at step 6
    (mid-epoch: 64 sequences in batches of 8; not a validation step) and resumed ends with the weights of a run that
    never stopped. Gumbel codes with noise draw random numbers every step."""
    import torch

    common = [
        str(REPO / "configs" / "gssm_vq.yaml"),
        f"run_root={tmp_path}",
        "sequences.length=8",
        "sequences.train_sequences=64",
        "sequences.val_sequences=16",
        "model.width=16",
        "model.heads=2",
        "model.encoder_layers=1",
        "model.decoder_layers=1",
        "model.quantizer.kind=gumbel",
        "model.quantizer.codebook_size=16",
        "data.batch_size=8",
        "trainer.max_steps=10",
        "trainer.val_every=5",
        "trainer.progress=false",
        "trainer.threads=1",
        "trainer.deterministic=true",
    ]
    assert invoke("train", *common, "name=straight").exit_code == 0
    stopped = invoke("train", *common, "name=stopped", "trainer.stop_at_step=6")
    assert stopped.exit_code == 0 and "pips resume" in stopped.output
    resumed = invoke("resume", str(tmp_path / "stopped"), "trainer.stop_at_step=null")
    assert resumed.exit_code == 0, resumed.output

    def weights(name):
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
        return checkpoint["state_dict"], checkpoint["global_step"]

    expected, _ = weights("straight")
    got, step = weights("stopped")
    assert step == 10
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"weights differ after resume: {different[:5]}"
