"""The synthetic hidden-state generator: kernels, modes, exact entropy, seeding, invalid graphs."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest

from pips.data.gssm import GSSM, PRESETS, GSSMError, load_sequences, save_sequences


def small_spec(**observed):
    return {
        "nodes": [
            {"name": "h", "states": 2, "alpha": 0.7},
            {"name": "x", "states": 3, "alpha": 0.7, "parents": ["h"], **observed},
        ],
        "observed": "x",
    }


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_kernel_row_is_a_distribution(preset):
    model = GSSM(preset, seed=3)
    for tables in model.kernels.values():
        for table in tables.values():
            assert (table >= 0).all()
            np.testing.assert_allclose(table.sum(-1), 1.0, atol=1e-12)
    transition = model.transition_matrix(model.kernels)
    np.testing.assert_allclose(transition.sum(-1), 1.0, atol=1e-9)


def test_dead_and_slow_nodes_have_their_argmax_structure():
    spec = {
        "nodes": [
            {"name": "slow", "states": 4, "alpha": 1.0, "mode": "slow"},
            {"name": "dead", "states": 3, "alpha": 1.0, "mode": "dead", "parents": ["slow"]},
            {"name": "x", "states": 3, "alpha": 1.0, "parents": ["dead"]},
        ],
        "observed": "x",
    }
    model = GSSM(spec, seed=1)
    for previous in range(4):  # slow: the most likely next state is the current one
        assert model.next_distribution(model.kernels, "slow", previous, {}).argmax() == previous
    for previous, parent in product(range(3), range(4)):  # dead: always 0 most likely
        probs = model.next_distribution(model.kernels, "dead", previous, {"slow": parent})
        assert probs.argmax() == 0


def test_forward_entropy_equals_brute_force_enumeration():
    model = GSSM(small_spec(), seed=5)
    length = 4
    tokens = np.array([0, 2, 1, 1])
    joint = model.joint_states()
    transition = model.transition_matrix(model.kernels)
    observed = model.order.index("x")
    total = 0.0
    for path in product(range(len(joint)), repeat=length):  # every hidden path
        if any(joint[z][observed] != token for z, token in zip(path, tokens, strict=True)):
            continue
        probability = 1.0 / len(joint)
        for a, b in zip(path[:-1], path[1:], strict=True):
            probability *= transition[a, b]
        total += probability
    assert model.log_likelihood(tokens) == pytest.approx(math.log(total), rel=1e-10)
    # and the probabilities of every possible sequence sum to one
    every = sum(
        math.exp(model.log_likelihood(np.array(seq))) for seq in product(range(3), repeat=3)
    )
    assert every == pytest.approx(1.0, rel=1e-9)


def test_entropy_rate_is_below_the_uniform_bound_and_low_entropy_is_low():
    low = GSSM("gssm_low_entropy", seed=0).entropy_rate(sequences=8, length=64)
    dense = GSSM("gssm_dense", seed=0).entropy_rate(sequences=4, length=32)
    assert 0 <= low["bits_per_token"] < 0.5 * low["uniform_bits_per_token"]
    assert low["bits_per_token"] < dense["bits_per_token"] <= dense["uniform_bits_per_token"]
    assert low["zlib_bits_per_token"] > 0


def test_generation_is_seeded_and_records_every_hidden_node(tmp_path):
    a = GSSM("gssm_sparse", seed=7).sample(4, 50, seed=1)
    b = GSSM("gssm_sparse", seed=7).sample(4, 50, seed=1)
    c = GSSM("gssm_sparse", seed=8).sample(4, 50, seed=1)
    assert np.array_equal(a["observations"], b["observations"])
    assert not np.array_equal(a["observations"], c["observations"])
    assert {k for k in a if k.startswith("hidden/")} == {
        "hidden/regime",
        "hidden/phase",
        "hidden/noise",
        "hidden/token",
    }
    assert np.array_equal(a["hidden/token"], a["observations"])
    save_sequences(tmp_path / "seq.npz", a)
    loaded = load_sequences(tmp_path / "seq.npz")
    assert np.array_equal(loaded["hidden/phase"], a["hidden/phase"])


def test_context_nodes_get_new_kernels_for_every_sequence():
    spec = small_spec()
    spec["nodes"][0]["mode"] = "context"
    data = GSSM(spec, seed=0).sample(3, 10)
    first, second = data["kernels"][0]["h"]["self"], data["kernels"][1]["h"]["self"]
    assert not np.allclose(first, second)
    assert np.allclose(data["kernels"][0]["x"]["self"], data["kernels"][1]["x"]["self"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["nodes"][0].update(parents=["x"]), "cycle: h -> x -> h"),
        (lambda s: s["nodes"][1].update(parents=["nope"]), "unknown parents ['nope']"),
        (lambda s: s["nodes"][1].update(mode="slow"), "is slow but has parents"),
        (lambda s: s["nodes"][1].update(parents=[], mode="dead"), "cannot be dead"),
        (lambda s: s.update(observed="y"), "observed node 'y' is not one of the nodes"),
        (lambda s: s["nodes"][0].update(states=1), "at least 2 states"),
    ],
)
def test_invalid_graphs_are_refused_with_a_sentence(change, message):
    spec = small_spec()
    change(spec)
    with pytest.raises(GSSMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GSSM(spec)


def test_sampled_transitions_follow_the_kernels():
    """The batch-vectorised sampler draws each node from its kernels: the empirical transition
    frequencies of a parentless node match its own table, and of a node with a parent the
    normalised product of its tables."""
    from pips.data.gssm import GSSM

    gssm = GSSM("gssm_sparse", seed=3)
    data = gssm.sample(3000, 40, seed=4)
    regime = data["hidden/regime"]
    table = gssm.kernels["regime"]["self"]
    counts = np.zeros_like(table)
    np.add.at(counts, (regime[:, :-1].ravel(), regime[:, 1:].ravel()), 1)
    empirical = counts / counts.sum(1, keepdims=True)
    assert np.abs(empirical - table / table.sum(1, keepdims=True)).max() < 0.02
    phase = data["hidden/phase"]
    expected = gssm.next_distribution(gssm.kernels, "phase", 1, {"regime": 2})
    where = (phase[:, :-1] == 1) & (regime[:, 1:] == 2)
    following = phase[:, 1:][where]
    assert len(following) > 1000
    empirical = np.bincount(following, minlength=len(expected)) / len(following)
    assert np.abs(empirical - expected).max() < 0.04
