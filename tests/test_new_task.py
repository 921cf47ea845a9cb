"""The measure of the Task interface: a task defined here, in the test file alone (autoencoding
random bit strings), registered, then trained, resumed exactly, evaluated, encoded, decoded,
reported, listed and compared through the ordinary entry points. No file of the package knows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

import pips
from pips.config import EXTRA_SECTIONS, TASK_NAMES, option
from pips.models.build import build_quantizer, quantizer_dim
from pips.models.grid_dvae import Encoded
from pips.tasks import TASKS, Headline, register_task
from pips.tasks.tensors import TensorDataModule, TensorTask


def invoke(*arguments):
    """``pips ARGUMENTS`` in-process, so the task registered here is the CLI's too."""
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


@dataclass
class BitsConfig:
    length: int = option(16, "bits per string", min=2)
    train_strings: int = option(256, "training strings", min=1)
    val_strings: int = option(64, "validation strings", min=1)
    chunk: int = option(4, "bits per code", min=1)


@dataclass
class BitsBatch:
    tokens: torch.Tensor  # [B, L] of 0/1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def elements(self) -> int:
        return self.tokens.numel()


class BitsOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, 2]
    encoded: Encoded


class BitsAutoencoder(nn.Module):
    """Each chunk of bits -> an MLP -> one code -> an MLP -> the chunk's bit logits."""

    def __init__(self, model_config, length: int, chunk: int):
        super().__init__()
        self.length, self.chunk, width = length, chunk, model_config.width
        dim = quantizer_dim(model_config.quantizer, width)
        self.encoder = nn.Sequential(nn.Linear(chunk, width), nn.GELU(), nn.Linear(width, dim))
        self.decoder = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, 2 * chunk))
        self.quantizer = build_quantizer(model_config.quantizer, dim, None)

    def encode(self, bits: torch.Tensor, **values) -> Encoded:
        chunks = bits.float().view(bits.shape[0], -1, self.chunk)  # [B, N, chunk]
        latents = self.encoder(chunks)
        quantized = self.quantizer(latents, **values)
        batch, count = latents.shape[:2]
        positions = torch.zeros(batch, count, 2, dtype=torch.long, device=bits.device)
        padding = torch.zeros(batch, count, dtype=torch.bool, device=bits.device)
        return Encoded(latents, quantized, positions, padding)

    def logits(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized).view(quantized.shape[0], self.length, 2)

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.logits(self.quantizer.codes_to_quantized(indices)).argmax(-1)

    def forward(self, bits: torch.Tensor, **values) -> BitsOutput:
        encoded = self.encode(bits, **values)
        return BitsOutput(self.logits(encoded.quantizer.quantized), encoded)


class BitsData(TensorDataModule):
    def collate(self, items) -> BitsBatch:
        return BitsBatch(torch.stack([item[0] for item in items]))

    def load(self):
        bits = self.config.bits
        generator = torch.Generator().manual_seed(self.config.seed)
        total = bits.train_strings + bits.val_strings
        strings = torch.randint(0, 2, (total, bits.length), generator=generator)
        return (strings[: bits.train_strings],), (strings[bits.train_strings :],)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.config.bits.length, self.config.bits.chunk)


class BitAccuracy(Metric):
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("right", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, output, batch, loss) -> None:
        self.right += (output.logits.argmax(-1) == batch.tokens).sum()
        self.total += batch.tokens.numel()

    def compute(self) -> dict[str, float]:
        return {"bit_accuracy": float(self.right) / max(float(self.total), 1.0)}


class BitsTask(TensorTask):
    name = "bits"
    unit = "strings"
    section = BitsConfig
    headline = Headline("bit_accuracy", "bit acc", 3, "max")
    summary_keys = ("bit_accuracy", "codebook_perplexity", "bits_per_string")
    progress_metrics = ("bit_accuracy", "codebook_perplexity")
    reconstruction_loss = "bits"
    curve_panels = [("accuracy", ["val/bit_accuracy"])]
    data_class = BitsData
    slotted_layouts = ()

    def new_model(self, shape) -> BitsAutoencoder:
        length, chunk = shape
        return BitsAutoencoder(self.config.model, int(length), int(chunk))

    def inputs(self, batch: BitsBatch) -> torch.Tensor:
        return batch.tokens

    def loss(self, output, batch: BitsBatch) -> torch.Tensor:
        return F.cross_entropy(output.logits.reshape(-1, 2), batch.tokens.reshape(-1))

    def metric(self, **kwargs) -> BitAccuracy:
        return BitAccuracy(**kwargs)


@pytest.fixture(scope="module")
def bits_task():
    """Register the task for this module's tests only."""
    register_task(BitsTask)
    yield BitsTask
    TASKS.pop("bits")
    EXTRA_SECTIONS.pop("bits")
    TASK_NAMES.remove("bits")


COMMON = [
    "task=bits",
    "model.width=32",
    "model.quantizer.kind=fsq",
    "model.quantizer.levels=[4,4]",
    "data.batch_size=32",
    "trainer.max_steps=40",
    "trainer.val_every=10",
    "trainer.log_every=5",
    "trainer.progress=false",
    "trainer.threads=1",
    "optim.lr.start=5e-3",
]


def test_a_task_defined_in_a_test_file_trains_resumes_and_serves_every_verb(bits_task, tmp_path):
    root = f"run_root={tmp_path}"
    straight = invoke("train", *COMMON, root, "name=straight")
    assert straight.exit_code == 0, straight.output
    assert "strings" in straight.output or "bit_accuracy" in straight.output
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["bit_accuracy"] > 0.6  # chance is 0.5; 16 codes per 4-bit chunk can be exact
    assert summary["val_strings"] == 64 and summary["train_strings"] == 256

    # stopped mid-run and resumed: the same weights as the run that never stopped
    stopped = invoke("train", *COMMON, root, "name=stopped", "trainer.stop_at_step=17")
    assert stopped.exit_code == 0 and "pips resume" in stopped.output
    resumed = invoke("resume", tmp_path / "stopped", "trainer.stop_at_step=null")
    assert resumed.exit_code == 0, resumed.output

    def weights(name):
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        return checkpoint["state_dict"], checkpoint["global_step"]

    (a, step_a), (b, step_b) = weights("straight"), weights("stopped")
    assert step_a == step_b == 40
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    run = tmp_path / "straight"
    evaluated = invoke("evaluate", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.output)["metrics"]
    assert metrics["bit_accuracy"] == pytest.approx(summary["bit_accuracy"])
    assert "strings_per_second" in metrics

    codes_file = tmp_path / "codes.npz"
    encoded = invoke("encode", run, "--out", codes_file)
    assert encoded.exit_code == 0, encoded.output
    decoded = invoke("decode", run, codes_file, "--out", tmp_path / "strings.npz")
    assert decoded.exit_code == 0, decoded.output
    with np.load(tmp_path / "strings.npz") as data:
        strings = data["items"]
    assert strings.shape == (64, 16)

    # decode(encode(x)) through the Python API equals what the CLI wrote
    tok = pips.load(run)
    assert tok.codebook_size == 16 and tok.bits_per_item == pytest.approx(4 * 4.0)
    data = BitsData(BitsTask(tok.config))
    data.setup()
    val = data.val_items[0]
    np.testing.assert_array_equal(np.stack(tok.decode(tok.encode(val))), strings)
    assert (strings == val.numpy()).mean() == pytest.approx(summary["bit_accuracy"])

    reported = invoke("report", run)
    assert reported.exit_code == 0, reported.output
    page = (run / "report.html").read_text()
    assert "bit_accuracy" in page and "Curves" in page

    listed = invoke("runs", tmp_path)
    assert listed.exit_code == 0 and "bit acc" in listed.output
    compared = invoke("compare", run, tmp_path / "stopped")
    assert compared.exit_code == 0 and "bit acc" in compared.output


def test_lr_find_and_the_light_profiler_work_for_a_new_task(bits_task, tmp_path):
    found = invoke("lr-find", *COMMON, f"run_root={tmp_path}", "name=lr", "--steps", "30")
    assert found.exit_code == 0, found.output
    assert json.loads((tmp_path / "lr" / "lr_find.json").read_text())["steps"] == 30
    profiled = invoke(
        "train", *COMMON, f"run_root={tmp_path}", "name=p", "trainer.max_steps=6",
        "trainer.profiler=light",
    )  # fmt: skip
    assert profiled.exit_code == 0, profiled.output
    rows = [
        json.loads(line)
        for line in (tmp_path / "p" / "profile.jsonl").read_text().split("\n")
        if line
    ]
    assert len(rows) == 6 and all(row["cells_per_second"] > 0 for row in rows)


def test_a_registered_tasks_section_stays_out_of_other_tasks_configs(bits_task):
    """A grid run's config.yaml must read where the bits task is not registered."""
    from pips.config import load_config, to_dict

    assert "bits" not in to_dict(load_config())
    assert to_dict(load_config(overrides=["task=bits"]))["bits"]["length"] == 16
    assert load_config(overrides=["task=bits", "bits.length=8"]).bits.length == 8
