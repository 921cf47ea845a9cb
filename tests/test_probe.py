"""Probes: a property that is a function of the codes is recovered; random codes stay at chance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pips.tasks.probe import GRID_PROPERTIES, ProbeError, fit_probe, split


def test_a_target_that_is_a_function_of_one_slot_is_recovered_by_a_linear_probe():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(600, 4))  # 4 slots x 16 codes
    targets = codes[:, 2] % 5  # a function of slot 2 only
    train, test = split(len(codes))
    scores = fit_probe(codes, targets, train, test, codebook=16)
    assert scores["accuracy"] > 0.97
    assert scores["chance"] == pytest.approx(0.2)


def test_random_codes_stay_at_chance():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(1500, 4))
    targets = rng.integers(0, 4, size=1500)  # independent of the codes
    train, test = split(len(codes))
    scores = fit_probe(codes, targets, train, test, codebook=16, weight_decay=1e-2)
    assert abs(scores["accuracy"] - 0.25) < 0.06
    assert scores["train_accuracy"] > scores["accuracy"]  # it fits noise, it cannot predict it


def test_float_features_with_a_nonlinear_target_need_the_mlp():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1200, 2)).astype(np.float32)
    targets = (x[:, 0] * x[:, 1] > 0).astype(int)  # XOR of signs: not linearly separable
    train, test = split(len(x))
    linear = fit_probe(x, targets, train, test)
    mlp = fit_probe(x, targets, train, test, hidden=32)
    assert linear["accuracy"] < 0.7 < 0.9 < mlp["accuracy"]


def test_grid_properties_by_hand():
    grid = np.array([[0, 0, 3], [5, 0, 3]])
    assert {name: f(grid) for name, f in GRID_PROPERTIES.items()} == {
        "height": 2,
        "width": 3,
        "colours": 3,
        "dominant": 0,
    }


def test_a_constant_target_is_refused():
    with pytest.raises(ProbeError, match="single value"):
        fit_probe(np.zeros((10, 2), dtype=np.float32), np.ones(10), np.arange(7), np.arange(7, 10))


def test_pips_probe_on_the_tiny_run(tiny_run, cli):
    run_dir, _ = tiny_run
    result = cli("probe", run_dir, "--target", "height", "--grids", "300", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["test_size"] == 90 and scores["classes"] > 5
    assert 0 <= scores["accuracy"] <= 1 and scores["majority"] < 1
    result = cli(
        "probe", run_dir, "--target", "height", "--features", "activations", "--grids", "100"
    )
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output and "chance" in result.output
    result = cli("probe", run_dir, "--target", "area")
    assert result.exit_code == 2 and "height, width, colours, dominant" in result.output
