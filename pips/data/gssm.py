"""Synthetic hidden-state sequences: a generative state-space model (GSSM) with known ground truth.

A GSSM is a small directed acyclic graph of discrete hidden nodes and one observed node. At each
time step every node draws its next state, in topological order, from the normalised product of
its kernels: one on its own previous state (``[S, S]``) and one on each parent's *new* state
(``[S_parent, S]``), each row drawn from a symmetric Dirichlet(``alpha``) (small ``alpha``:
near-deterministic rows, low entropy). ``kernel="joint"`` uses one full table over the joint
input (own previous state and every parent) instead. The observed node's state is the token.

Node modes:

- ``normal``: kernels drawn once (per generator seed);
- ``dead``: every row's most likely next state is 0 (each kernel's row maximum is moved to state
  0; a product of rows that all peak at 0 peaks at 0 too);
- ``slow``: the most likely next state is the current one (the row maximum moves to the
  diagonal; a slow node has no parents, so nothing else moves it);
- ``context``: the node's kernels are drawn again for every sequence, so the process must be
  inferred in context.

Ground truth: every node's hidden states are recorded beside the observations, and
:meth:`GSSM.entropy_rate` computes the exact per-token entropy of the observed process (given the
kernels) with the forward algorithm on the product-state HMM in log space, beside a zlib baseline.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

MODES = ("normal", "dead", "slow", "context")
KERNELS = ("product", "joint")


class GSSMError(ValueError):
    """An invalid GSSM graph; the message names the node and the problem."""


@dataclass
class NodeSpec:
    name: str
    states: int
    alpha: float = 1.0
    parents: list[str] = field(default_factory=list)
    mode: str = "normal"
    kernel: str = "product"


@dataclass
class GSSMSpec:
    nodes: list[NodeSpec]
    observed: str

    @classmethod
    def from_dict(cls, values: dict) -> GSSMSpec:
        try:
            nodes = [NodeSpec(**node) for node in values["nodes"]]
            return cls(nodes, values["observed"])
        except (KeyError, TypeError) as error:
            raise GSSMError(
                f"a GSSM spec is {{nodes: [{{name, states, alpha, parents, mode, kernel}}, ...], "
                f"observed: name}}; {error}"
            ) from None


PRESETS: dict[str, dict] = {
    # a chain of slow and normal nodes feeding the observation: few, sparse influences
    "gssm_sparse": {
        "nodes": [
            {"name": "regime", "states": 3, "alpha": 0.3, "mode": "slow"},
            {"name": "phase", "states": 4, "alpha": 0.5, "parents": ["regime"]},
            {"name": "noise", "states": 2, "alpha": 1.0, "mode": "dead"},
            {"name": "token", "states": 8, "alpha": 0.3, "parents": ["phase", "noise"]},
        ],
        "observed": "token",
    },
    # every hidden node drives the observation through one joint table
    "gssm_dense": {
        "nodes": [
            {"name": "a", "states": 3, "alpha": 1.0},
            {"name": "b", "states": 3, "alpha": 1.0, "parents": ["a"]},
            {"name": "c", "states": 2, "alpha": 1.0, "parents": ["a", "b"]},
            {
                "name": "token",
                "states": 8,
                "alpha": 0.5,
                "parents": ["a", "b", "c"],
                "kernel": "joint",
            },
        ],
        "observed": "token",
    },
    # near-deterministic kernels: a predictable sequence
    "gssm_low_entropy": {
        "nodes": [
            {"name": "clock", "states": 4, "alpha": 0.05},
            {"name": "token", "states": 6, "alpha": 0.05, "parents": ["clock"]},
        ],
        "observed": "token",
    },
}


def validate(spec: GSSMSpec) -> list[str]:
    """Topological order of the nodes; raises :class:`GSSMError` naming what is wrong."""
    names = [node.name for node in spec.nodes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise GSSMError(f"GSSM node names must be unique; {duplicates} appear more than once")
    nodes = {node.name: node for node in spec.nodes}
    if spec.observed not in nodes:
        raise GSSMError(f"the observed node {spec.observed!r} is not one of the nodes {names}")
    for node in spec.nodes:
        if node.states < 2:
            raise GSSMError(f"node {node.name!r} needs at least 2 states; got {node.states}")
        if not node.alpha > 0:
            raise GSSMError(f"node {node.name!r}: alpha must be > 0; got {node.alpha}")
        if node.mode not in MODES:
            raise GSSMError(f"node {node.name!r}: mode must be one of {MODES}; got {node.mode!r}")
        if node.kernel not in KERNELS:
            raise GSSMError(
                f"node {node.name!r}: kernel must be one of {KERNELS}; got {node.kernel!r}"
            )
        unknown = [parent for parent in node.parents if parent not in nodes]
        if unknown:
            raise GSSMError(f"node {node.name!r} has unknown parents {unknown}; nodes are {names}")
        if node.name in node.parents:
            raise GSSMError(f"node {node.name!r} lists itself as a parent (a cycle)")
        if node.mode == "slow" and node.parents:
            raise GSSMError(
                f"node {node.name!r} is slow but has parents {node.parents}: a slow node keeps "
                f"its state most likely, which parents would override; drop its parents"
            )
    observed = nodes[spec.observed]
    if observed.mode in ("slow", "dead"):
        raise GSSMError(
            f"the observed node {observed.name!r} cannot be {observed.mode}: its tokens would be "
            f"mostly constant; make a hidden node {observed.mode} instead"
        )
    order: list[str] = []
    state = {name: 0 for name in names}  # 0 new, 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state[name] == 2:
            return
        if state[name] == 1:
            cycle = path[path.index(name) :] + [name]
            raise GSSMError(f"the GSSM graph has a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for parent in nodes[name].parents:
            visit(parent, [*path, name])
        state[name] = 2
        order.append(name)

    for name in names:
        visit(name, [])
    return order


def _dirichlet_rows(rng: np.random.Generator, rows: int, states: int, alpha: float) -> np.ndarray:
    table = rng.dirichlet(np.full(states, alpha), size=rows)
    return np.clip(table, 1e-300, None) / np.clip(table, 1e-300, None).sum(-1, keepdims=True)


def _move_max(table: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Swap each row's largest entry with the entry at column ``target[row]``."""
    table = table.copy()
    rows = np.arange(table.shape[0])
    top = table.argmax(-1)
    high, low = table[rows, top].copy(), table[rows, target].copy()
    table[rows, target], table[rows, top] = high, low
    return table


class GSSM:
    """A seeded generator of sequences with their hidden states; see the module docstring."""

    def __init__(self, spec: GSSMSpec | dict | str, seed: int = 0):
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise GSSMError(f"unknown GSSM preset {spec!r}; presets: {', '.join(PRESETS)}")
            spec = PRESETS[spec]
        if isinstance(spec, dict):
            spec = GSSMSpec.from_dict(spec)
        self.spec = spec
        self.order = validate(spec)
        self.nodes = {node.name: node for node in spec.nodes}
        self.seed = seed
        self.kernels = self.draw_kernels(np.random.default_rng(seed))

    # ------------------------------------------------------------------------------ kernels
    def draw_kernels(self, rng: np.random.Generator, only_context: bool = False) -> dict:
        """{node: {"self": [S, S], parent: [S_p, S], ...}} or {node: {"joint": [prod, S]}}."""
        kernels = {}
        for name in self.order:
            node = self.nodes[name]
            if only_context and node.mode != "context":
                continue
            states = node.states
            if node.kernel == "joint":
                inputs = states * math.prod(self.nodes[p].states for p in node.parents)
                table = _dirichlet_rows(rng, inputs, states, node.alpha)
                if node.mode == "dead":
                    table = _move_max(table, np.zeros(inputs, dtype=int))
                kernels[name] = {"joint": table}
                continue
            own = _dirichlet_rows(rng, states, states, node.alpha)
            if node.mode == "dead":
                own = _move_max(own, np.zeros(states, dtype=int))
            elif node.mode == "slow":
                own = _move_max(own, np.arange(states))
            tables = {"self": own}
            for parent in node.parents:
                table = _dirichlet_rows(rng, self.nodes[parent].states, states, node.alpha)
                if node.mode == "dead":
                    table = _move_max(table, np.zeros(len(table), dtype=int))
                tables[parent] = table
            kernels[name] = tables
        return kernels

    def next_distribution(
        self, kernels: dict, name: str, previous: int, parents: dict
    ) -> np.ndarray:
        """p(x_name(t+1) | its previous state, its parents' new states)."""
        node = self.nodes[name]
        tables = kernels[name]
        if node.kernel == "joint":
            index = previous
            for parent in node.parents:
                index = index * self.nodes[parent].states + parents[parent]
            return tables["joint"][index]
        probs = tables["self"][previous].copy()
        for parent in node.parents:
            probs = probs * tables[parent][parents[parent]]
        return probs / probs.sum()

    # ------------------------------------------------------------------------------ sampling
    def sample(self, batch: int, length: int, seed: int | None = None) -> dict[str, np.ndarray]:
        """``{"observations": [B, T], "hidden/<node>": [B, T], ...}``; context nodes get new
        kernels per sequence (their tables are returned as ``kernels`` per sequence)."""
        rng = np.random.default_rng(self.seed + 1 if seed is None else seed)
        states = {name: np.zeros((batch, length), dtype=np.int64) for name in self.order}
        per_sequence = []
        for b in range(batch):
            kernels = dict(self.kernels)
            if any(node.mode == "context" for node in self.nodes.values()):
                kernels.update(self.draw_kernels(rng, only_context=True))
            per_sequence.append(kernels)
            current = {name: int(rng.integers(self.nodes[name].states)) for name in self.order}
            for name in self.order:
                states[name][b, 0] = current[name]
            for t in range(1, length):
                new: dict[str, int] = {}
                for name in self.order:
                    probs = self.next_distribution(kernels, name, current[name], new)
                    new[name] = int(rng.choice(len(probs), p=probs))
                    states[name][b, t] = new[name]
                current = new
        out = {"observations": states[self.spec.observed]}
        out.update({f"hidden/{name}": states[name] for name in self.order})
        out["kernels"] = per_sequence
        return out

    # ------------------------------------------------------------------------------ truth
    def joint_states(self) -> list[tuple[int, ...]]:
        return list(product(*(range(self.nodes[name].states) for name in self.order)))

    def transition_matrix(self, kernels: dict) -> np.ndarray:
        """P(z' | z) over joint states z (tuples in ``self.order``): ``[Z, Z]``."""
        joint = self.joint_states()
        matrix = np.zeros((len(joint), len(joint)))
        for i, z in enumerate(joint):
            previous = dict(zip(self.order, z, strict=True))
            for j, z_next in enumerate(joint):
                new = dict(zip(self.order, z_next, strict=True))
                probability = 1.0
                for name in self.order:
                    probs = self.next_distribution(kernels, name, previous[name], new)
                    probability *= probs[new[name]]
                    if probability == 0.0:
                        break
                matrix[i, j] = probability
        return matrix

    def log_likelihood(self, observations: np.ndarray, kernels: dict | None = None) -> float:
        """``log p(x_1..T)`` (nats) of one observed sequence by the forward algorithm on the
        product-state HMM, in log space; the first states are uniform."""
        kernels = self.kernels if kernels is None else kernels
        joint = self.joint_states()
        observed_index = self.order.index(self.spec.observed)
        emits = np.array([z[observed_index] for z in joint])
        with np.errstate(divide="ignore"):
            log_transition = np.log(self.transition_matrix(kernels))  # [Z, Z]
        log_alpha = np.where(emits == observations[0], -math.log(len(joint)), -np.inf)
        for token in observations[1:]:
            scores = log_alpha[:, None] + log_transition  # [Z, Z']
            peak = np.max(scores, axis=0)
            finite = np.isfinite(peak)
            summed = np.full(len(joint), -np.inf)
            summed[finite] = peak[finite] + np.log(
                np.exp(scores[:, finite] - peak[finite]).sum(axis=0)
            )
            log_alpha = np.where(emits == token, summed, -np.inf)
        peak = np.max(log_alpha)
        return float(peak + np.log(np.exp(log_alpha - peak).sum()))

    def entropy_rate(self, sequences: int = 64, length: int = 128, seed: int = 12345) -> dict:
        """Bits per token of the observed process: the exact ``-log2 p(x) / T`` averaged over
        sampled sequences (given their kernels), and zlib's bits per token on the same tokens."""
        data = self.sample(sequences, length, seed=seed)
        observations = data["observations"]
        bits = [
            -self.log_likelihood(sequence, kernels) / math.log(2) / length
            for sequence, kernels in zip(observations, data["kernels"], strict=True)
        ]
        packed = observations.astype(np.uint8).tobytes()
        return {
            "bits_per_token": float(np.mean(bits)),
            "zlib_bits_per_token": 8 * len(zlib.compress(packed, 9)) / observations.size,
            "uniform_bits_per_token": math.log2(self.nodes[self.spec.observed].states),
        }


def save_sequences(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Observations and hidden states (not the per-sequence kernels) to an .npz file."""
    arrays = {key: value for key, value in data.items() if isinstance(value, np.ndarray)}
    np.savez_compressed(Path(path), **{key.replace("/", "__"): v for key, v in arrays.items()})


def load_sequences(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(path)) as data:
        return {key.replace("__", "/"): data[key] for key in data.files}
