"""`pips evaluate`, `pips encode` and `pips decode` end to end on the tiny run, and their failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pips.data import collate_grids, load_grids
from pips.evaluation.codes import load_codes
from pips.tasks.checkpoints import CheckpointError, load_model

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def test_evaluate_reproduces_the_runs_final_validation(tiny_run, cli):
    run_dir, _ = tiny_run
    result = cli("evaluate", run_dir, "--json", "--last")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    summary = json.loads((run_dir / "summary.json").read_text())
    # the same grids (the run's validation split less its training grids), the same weights
    assert report["metrics"]["grids"] == summary["val_grids"]
    assert report["metrics"]["cell_accuracy"] == pytest.approx(summary["cell_accuracy"], abs=1e-9)
    assert report["metrics"]["grid_accuracy"] == pytest.approx(summary["grid_accuracy"], abs=1e-9)
    assert report["step"] == summary["steps"]


def test_evaluate_prints_a_table_on_a_folder_of_tasks(tiny_run, task_folder, cli):
    run_dir, _ = tiny_run
    result = cli("evaluate", run_dir, "--data", f"{task_folder}:all")
    assert result.exit_code == 0, result.output
    assert "cell_accuracy" in result.output and "codebook_perplexity" in result.output
    assert "grids of" in result.output


def test_encode_then_decode_rebuilds_what_the_model_reconstructs(
    tiny_run, task_folder, tmp_path, cli
):
    _assert_encode_decode_round_trip(tiny_run[0], task_folder, tmp_path, cli)


def test_product_codes_of_local_slots_with_region_offsets_round_trip(task_folder, tmp_path, cli):
    """A pooled run with the arc_pooled.yaml layout (local region slots, in-region offsets, a
    product Gumbel codebook of 8 ** 2 codes): its codes are single indices < 64 per slot, and
    decoding them rebuilds what the model reconstructs."""
    result = cli(
        "train",
        TINY_CONFIG,
        f"run_root={tmp_path}",
        "name=pq",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
        "model.layout=pooled",
        "model.slots=local",
        "model.region_offsets=true",
        "model.num_latents=4",
        "model.quantizer.kind=gumbel",
        "model.quantizer.estimator=hard",
        "model.quantizer.factors=2",
        "model.quantizer.codebook_size=64",
        "loss.batch_diversity=0.1",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.image_every=0",
        "trainer.progress=false",
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    codes = np.stack(_assert_encode_decode_round_trip(tmp_path / "pq", task_folder, tmp_path, cli))
    assert codes.shape[1:] == (4,) and codes.max() < 64 and len(np.unique(codes)) > 4


def _assert_encode_decode_round_trip(run_dir, task_folder, tmp_path, cli) -> list[np.ndarray]:
    """Encode the task folder, decode the codes, compare with reconstruct(); the codes."""
    codes_path, grids_path = tmp_path / "codes.npz", tmp_path / "grids.json"
    result = cli("encode", run_dir, "--data", str(task_folder), "--out", codes_path)
    assert result.exit_code == 0, result.output
    result = cli("decode", run_dir, codes_path, "--out", grids_path)
    assert result.exit_code == 0, result.output

    records = load_grids(str(task_folder), "all", distinct=False)
    codes, metadata = load_codes(codes_path)
    assert len(codes) == len(records)
    assert [str(t) for t in metadata["task_ids"]] == [r.task_id for r in records]
    decoded = json.loads(grids_path.read_text())
    loaded = load_model(run_dir)
    for record in records[:: max(len(records) // 12, 1)]:
        grid = np.array(decoded[record.task_id][record.subset][record.pair_index][record.role])
        with torch.no_grad():
            expected = loaded.model.reconstruct(collate_grids([record.grid]))[0]
        assert grid.shape == expected.shape and (grid == expected).all(), record.task_id
    # every task, pair and role comes back in its place
    assert set(decoded) == {r.task_id for r in records}
    return codes


def test_codes_have_the_documented_shapes(tiny_run, task_folder, tmp_path, cli):
    run_dir, _ = tiny_run
    codes_path = tmp_path / "codes.npz"
    assert cli("encode", run_dir, "--data", task_folder, "--out", codes_path).exit_code == 0
    codes, _ = load_codes(codes_path)
    records = load_grids(str(task_folder), "all", distinct=False)
    patch = 2  # tiny.yaml: spatial layout, 2x2 patches, EOS column
    for array, record in zip(codes, records, strict=True):
        height, width = record.grid.shape
        assert array.shape == (-(-height // patch), -(-(width + 1) // patch))
        assert array.min() >= 0 and array.max() < 125  # FSQ 5x5x5


# ----------------------------------------------------------------------------- bad input


def test_a_run_folder_without_checkpoints_is_one_sentence(tmp_path, cli):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    result = cli("evaluate", tmp_path / "run")
    assert result.exit_code == 2
    assert "has no checkpoints yet" in result.output


def test_a_missing_path_is_one_sentence(tmp_path, cli):
    result = cli("encode", tmp_path / "nowhere", "--out", tmp_path / "codes.npz")
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert not (tmp_path / "codes.npz").exists()


def test_a_data_path_that_does_not_exist_writes_nothing(tiny_run, tmp_path, cli):
    run_dir, _ = tiny_run
    result = cli("encode", run_dir, "--data", tmp_path / "no-tasks", "--out", tmp_path / "c.npz")
    assert result.exit_code == 2
    assert "nor an existing folder" in result.output
    assert not (tmp_path / "c.npz").exists()
    result = cli("evaluate", run_dir, "--data", "arc1:validation")
    assert result.exit_code == 2 and "training, evaluation, all" in result.output


def test_a_truncated_checkpoint_names_the_file(tiny_run, tmp_path, cli):
    run_dir, _ = tiny_run
    data = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 2])
    result = cli("evaluate", broken)
    assert result.exit_code == 2
    assert "broken.ckpt" in result.output and "truncated or corrupt" in result.output


def test_a_checkpoint_from_another_model_shape_names_the_mismatch(tiny_run, tmp_path, cli):
    run_dir, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["config"]["model"]["width"] = 64
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    result = cli("evaluate", other)
    assert result.exit_code == 2
    assert "does not fit the model" in result.output and "in the file vs" in result.output
    with pytest.raises(CheckpointError, match="different shapes"):
        load_model(other)


def test_codes_out_of_range_are_refused_and_nothing_is_written(
    tiny_run, task_folder, tmp_path, cli
):
    run_dir, _ = tiny_run
    codes_path = tmp_path / "codes.npz"
    assert cli("encode", run_dir, "--data", task_folder, "--out", codes_path).exit_code == 0
    with np.load(codes_path) as data:
        files = {key: data[key] for key in data.files}
    files["codes"][3] = 999
    np.savez(codes_path, **files)
    result = cli("decode", run_dir, codes_path, "--out", tmp_path / "grids.json")
    assert result.exit_code == 2
    assert "999 is out of range" in result.output and "125 codes" in result.output
    assert not (tmp_path / "grids.json").exists()
    result = cli("decode", run_dir, tmp_path / "missing.npz", "--out", tmp_path / "grids.json")
    assert result.exit_code == 2 and "does not exist" in result.output
