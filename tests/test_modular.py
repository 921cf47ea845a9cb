"""The modular-arithmetic task (grokking): the data is every pair once, split without overlap,
and a run trains through the ordinary runner with ⊥Grad and StableMax."""

from __future__ import annotations

import json

import pytest
import torch

from pips.config import load_config
from pips.tasks import get_task


def invoke(*arguments):
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


SMALL = ["task=modular", "modular.modulus=11", "model.width=32", "model.heads=2"]


@pytest.mark.parametrize("operation", ["add", "subtract", "multiply"])
def test_every_pair_appears_once_with_its_answer(operation):
    config = load_config(
        overrides=[*SMALL, f"modular.operation={operation}", "modular.train_fraction=0.3"]
    )
    data = get_task(config).datamodule()
    (train_pairs, train_answers), (val_pairs, val_answers) = data.train_items, data.val_items
    pairs = torch.cat([train_pairs, val_pairs])
    assert len(pairs) == 121 and len({tuple(p) for p in pairs.tolist()}) == 121
    assert len(train_pairs) == round(0.3 * 121)
    a, b = pairs[:, 0], pairs[:, 1]
    expected = {"add": (a + b) % 11, "subtract": (a - b) % 11, "multiply": (a * b) % 11}[operation]
    assert torch.equal(torch.cat([train_answers, val_answers]), expected)


def test_a_modular_run_trains_with_orthograd_and_stablemax(tmp_path):
    result = invoke(
        "train", *SMALL, f"run_root={tmp_path}", "name=m", "optim.name=orthograd",
        "loss.stablemax=true", "trainer.max_steps=30", "trainer.val_every=15",
        "trainer.progress=false", "data.batch_size=64",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert 0 <= summary["accuracy"] <= 1 and summary["val_pairs"] == 121 - 60
    evaluated = json.loads(invoke("evaluate", tmp_path / "m", "--last", "--json").output)
    assert evaluated["metrics"]["accuracy"] == pytest.approx(summary["accuracy"])
