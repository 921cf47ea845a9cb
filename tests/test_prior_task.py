"""Task ``prior`` end to end through the command line: trained over a tokenizer run's codes and
over raw items, evaluated beside the compressors, sampled, and turned into a real bit string
(`pips compress` / `pips decompress`) whose length matches the model's codelength."""

from __future__ import annotations

import json
import lzma
import zlib
from pathlib import Path

import numpy as np
import pytest

from pips.data.compressors import arc_text
from pips.data.gssm import GSSM

PRESET = str(Path(__file__).resolve().parent.parent / "configs" / "arc_prior.yaml")

SMALL = [
    "prior.width=32",
    "prior.depth=1",
    "prior.heads=2",
    "prior.augment_copies=2",
    "data.max_samples=48",
    "data.max_final_val_samples=24",
    "data.max_val_samples=16",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.val_every=3",
    "trainer.log_every=3",
    "trainer.progress=false",
    "trainer.threads=1",
]


def train_prior(cli, root: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    result = cli("train", PRESET, f"run_root={root}", f"name={name}", *SMALL, *overrides)
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = root / name
    return run, json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def raw_prior(cli, tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    return train_prior(cli, root, "raw", "prior.tokenizer=raw", "trainer.max_steps=30")


@pytest.fixture(scope="module")
def code_prior(cli, tiny_run, tmp_path_factory):
    run, _ = tiny_run
    return train_prior(cli, tmp_path_factory.mktemp("prior"), "codes", f"prior.tokenizer={run}")


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    from pips.data.arc import load_grids

    records = load_grids("arc1", "evaluation", distinct=False)
    first = records[0].task_id
    task = {"train": [], "test": []}
    for record in (r for r in records if r.task_id == first):
        pairs = task[record.subset]
        while len(pairs) <= record.pair_index:
            pairs.append({})
        pairs[record.pair_index][record.role] = record.grid.tolist()
    path = tmp_path_factory.mktemp("task") / f"{first}.json"
    path.write_text(json.dumps(task))
    return path


def test_a_raw_prior_reports_its_codelength_beside_the_compressors(raw_prior, cli):
    from pips.data.arc import load_grids, spread_evenly

    run, summary = raw_prior
    assert summary["status"] == "finished" and summary["steps"] == 30
    # the grids are their own tokens: nothing is left for a decoder
    assert summary["decoder_bits"] == 0.0
    assert summary["codelength_bits"] == pytest.approx(summary["prior_bits"])
    assert summary["prior_bits"] < summary["uniform_code_bits"]
    grids = [r.grid for r in load_grids("arc1", "evaluation")]
    grids = spread_evenly(grids, 24)
    texts = [arc_text(g) for g in grids]
    zlib_mean = np.mean([8 * len(zlib.compress(t, 9)) for t in texts])
    xz = 8 * len(lzma.compress(b"\n\n".join(texts), preset=9 | lzma.PRESET_EXTREME)) / 24
    assert summary["val_zlib_bits"] == pytest.approx(zlib_mean)
    assert summary["val_xz_bits"] == pytest.approx(xz)
    result = cli("evaluate", run, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)["metrics"]
    assert metrics["prior_bits"] == pytest.approx(summary["prior_bits"], rel=1e-6)
    assert {"zlib_bits", "xz_bits", "order0_bits", "codelength_bits"} <= set(metrics)


def test_a_prior_over_a_tokenizers_codes_adds_the_decoder_part(code_prior, tiny_run, cli):
    run, summary = code_prior
    tokenizer, _ = tiny_run
    assert summary["decoder_bits"] > 0
    assert summary["codelength_bits"] == pytest.approx(
        summary["prior_bits"] + summary["decoder_bits"]
    )
    # the codes were encoded once and cached beside the tokenizer, keyed by its checkpoint
    caches = list((tokenizer / "prior_cache").glob("tokens-*.npz"))
    assert len(caches) == 1
    config = (run / "config.yaml").read_text()
    assert str(tokenizer) in config
    info = json.loads((run / "run_info.json").read_text())["depends_on"]
    assert Path(info["tokenizer_checkpoint"]).parent.parent == tokenizer.resolve()
    assert len(info["tokenizer_sha256"]) == 64
    stamp = caches[0].stat().st_mtime_ns
    result = cli("evaluate", run, "--json")
    assert result.exit_code == 0, result.output
    assert caches[0].stat().st_mtime_ns == stamp  # read, not written again
    metrics = json.loads(result.output)["metrics"]
    assert metrics["codelength_bits"] == pytest.approx(summary["codelength_bits"], rel=1e-5)


@pytest.mark.parametrize("which", ["raw_prior", "code_prior"])
def test_compress_then_decompress_gives_the_task_back(which, request, cli, task_file, tmp_path):
    run, _ = request.getfixturevalue(which)
    stream = tmp_path / "task.pips"
    result = cli("compress", run, task_file, "--out", stream)
    assert result.exit_code == 0, result.output + repr(result.exception)
    back = tmp_path / "back.json"
    result = cli("decompress", run, stream, "--out", back)
    assert result.exit_code == 0, result.output + repr(result.exception)
    restored = json.loads(back.read_text())
    assert restored == {task_file.stem: json.loads(task_file.read_text())}


@pytest.mark.parametrize("which", ["raw_prior", "code_prior"])
def test_the_stream_is_as_long_as_the_models_codelength(which, request, task_file, tmp_path):
    from pips.evaluation.commands import compress_file

    run, _ = request.getfixturevalue(which)
    result = compress_file(run, task_file, tmp_path / "task.pips")
    payload_bits, model_bits = result["payload_bits"], result["codelength_bits"]
    assert model_bits <= payload_bits <= 1.01 * model_bits + 32  # the coder's last word
    assert result["items"] == 2 * len(json.loads(task_file.read_text())["train"]) + 2


def test_sampled_grids_load_as_arc_json(raw_prior, cli, tmp_path):
    from pips.data.arc import read_task_file

    run, _ = raw_prior
    result = cli("sample", run, "-n", "6", "--seed", "3", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = read_task_file(tmp_path / "s" / "samples.json")
    assert len(records) == 6
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    assert "identical_to_training" in result.output and "size_tv" in result.output
    again = cli("sample", run, "-n", "6", "--seed", "3", "--out", tmp_path / "t")
    assert again.exit_code == 0
    assert (tmp_path / "t" / "samples.json").read_text() == (
        tmp_path / "s" / "samples.json"
    ).read_text()


def test_sampled_codes_decode_through_the_tokenizer(code_prior, cli, tmp_path):
    run, _ = code_prior
    result = cli("sample", run, "-n", "4", "--top-k", "5", "--out", tmp_path)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "well_formed" in result.output
    assert (tmp_path / "samples.json").is_file()


def test_bad_prior_requests_are_sentences(cli, tiny_run, raw_prior, tmp_path):
    tokenizer, _ = tiny_run
    missing = cli("train", PRESET, "prior.tokenizer=/no/such/run", f"run_root={tmp_path}", "name=x")
    assert missing.exit_code == 2
    assert "prior.tokenizer" in missing.output and "Traceback" not in missing.output
    assert not (tmp_path / "x").exists()
    prior_run, _ = raw_prior
    nested = cli("train", PRESET, f"prior.tokenizer={prior_run}", f"run_root={tmp_path}", "name=y")
    assert nested.exit_code == 2 and "is a prior run" in nested.output
    not_a_prior = cli("sample", tokenizer, "--out", tmp_path / "s")
    assert not_a_prior.exit_code == 2 and "prior over codes" in not_a_prior.output
    for verb in ("compress", "decompress"):
        wrong = cli(verb, tokenizer, tmp_path / "none.json", "--out", tmp_path / "o")
        assert wrong.exit_code == 2 and "Traceback" not in wrong.output
    damaged = tmp_path / "bad.pips"
    damaged.write_bytes(b"not a stream")
    result = cli("decompress", prior_run, damaged, "--out", tmp_path / "o.json")
    assert result.exit_code == 2 and "not a stream written by pips compress" in result.output


def test_raw_sequences_are_measured_against_the_exact_entropy(cli, tmp_path):
    result = cli(
        "train",
        PRESET,
        "prior.tokenizer=raw",
        "prior.source=sequences",
        "sequences.length=16",
        "sequences.train_sequences=64",
        "sequences.val_sequences=16",
        f"run_root={tmp_path}",
        "name=seq",
        *SMALL,
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((tmp_path / "seq" / "summary.json").read_text())
    # a prior can't beat the exact -log2 p(x) of the process by much (16 tokens of a few bits)
    assert summary["val_exact_bits"] > 0
    assert summary["prior_bits"] > 0.5 * summary["val_exact_bits"]
    gssm = GSSM("gssm_sparse")
    vocab = gssm.nodes[gssm.spec.observed].states
    assert summary["uniform_code_bits"] == pytest.approx(16 * np.log2(vocab))


def test_the_report_shows_the_codelength_and_fresh_samples(raw_prior, cli):
    run, _ = raw_prior
    result = cli("report", run)
    assert result.exit_code == 0, result.output + repr(result.exception)
    page = (run / "report.html").read_text()
    assert "Codelength" in page and "xz_bits" in page
    assert "identical_to_training" in page and "<img" in page.split("Samples")[-1]


def test_a_report_leaves_the_callers_grad_mode_alone(raw_prior):
    import torch

    from pips.evaluation.report import write_report

    run, _ = raw_prior
    write_report(run)
    assert torch.is_grad_enabled()
