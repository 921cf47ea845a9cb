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
:meth:`GSSM.posterior_marginals` runs forward-backward on the same HMM for every node's posterior
``p(x_node(t) | x_1..T)``, and :meth:`GSSM.bayes_optimal_accuracy` scores its argmax against the
true hidden states: the ceiling of any probe that reads the observed sequence.
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
        kernels per sequence (their tables are returned as ``kernels`` per sequence).

        Vectorised over the batch: at each step every node draws its next state for all
        sequences at once (inverse-CDF sampling from :meth:`next_distribution`'s rows)."""
        rng = np.random.default_rng(self.seed + 1 if seed is None else seed)
        has_context = any(node.mode == "context" for node in self.nodes.values())
        per_sequence = []
        for _ in range(batch):
            kernels = dict(self.kernels)
            if has_context:
                kernels.update(self.draw_kernels(rng, only_context=True))
            per_sequence.append(kernels)
        # every table stacked over the batch: [B, rows, S] (shared tables are broadcast views)
        stacked = {
            name: {
                key: (
                    np.stack([kernels[name][key] for kernels in per_sequence])
                    if self.nodes[name].mode == "context"
                    else np.broadcast_to(table, (batch, *table.shape))
                )
                for key, table in self.kernels[name].items()
            }
            for name in self.order
        }
        rows = np.arange(batch)
        states = {name: np.zeros((batch, length), dtype=np.int64) for name in self.order}
        for name in self.order:
            states[name][:, 0] = rng.integers(self.nodes[name].states, size=batch)
        for t in range(1, length):
            for name in self.order:
                node, tables = self.nodes[name], stacked[name]
                previous = states[name][:, t - 1]
                if node.kernel == "joint":
                    index = previous
                    for parent in node.parents:
                        index = index * self.nodes[parent].states + states[parent][:, t]
                    probs = tables["joint"][rows, index]  # [B, S]
                else:
                    probs = tables["self"][rows, previous].copy()
                    for parent in node.parents:
                        probs = probs * tables[parent][rows, states[parent][:, t]]
                cumulative = np.cumsum(probs, axis=1)
                draw = rng.random(batch)[:, None] * cumulative[:, -1:]
                chosen = (cumulative <= draw).sum(axis=1)
                states[name][:, t] = np.minimum(chosen, node.states - 1)
        out = {"observations": states[self.spec.observed]}
        out.update({f"hidden/{name}": states[name] for name in self.order})
        out["kernels"] = per_sequence
        return out

    # ------------------------------------------------------------------------------ truth
    def joint_states(self) -> list[tuple[int, ...]]:
        return list(product(*(range(self.nodes[name].states) for name in self.order)))

    def transition_matrix(self, kernels: dict) -> np.ndarray:
        """P(z' | z) over joint states z (tuples in ``self.order``): ``[Z, Z]``, the product over
        nodes of :meth:`next_distribution` (own previous state from z, parents' new states from
        z'), vectorised over every (z, z') pair."""
        joint = np.array(self.joint_states())  # [Z, nodes]
        column = {name: index for index, name in enumerate(self.order)}
        matrix = np.ones((len(joint), len(joint)))
        for name in self.order:
            node, tables = self.nodes[name], kernels[name]
            previous = joint[:, column[name]][:, None]  # [Z, 1] own state in z
            new = np.broadcast_to(joint[:, column[name]][None, :], matrix.shape)  # [Z, Z] in z'
            if node.kernel == "joint":
                index = np.broadcast_to(previous, matrix.shape)
                for parent in node.parents:
                    index = index * self.nodes[parent].states + joint[:, column[parent]][None, :]
                matrix *= tables["joint"][index, new]
                continue
            probs = np.broadcast_to(tables["self"][previous], (*matrix.shape, node.states))
            for parent in node.parents:  # [Z, Z, S]: parents' new states come from z'
                probs = probs * tables[parent][joint[:, column[parent]]][None, :, :]
            probs = probs / probs.sum(-1, keepdims=True)
            matrix *= np.take_along_axis(probs, new[..., None], axis=-1)[..., 0]
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

    def _log_posteriors(
        self, observations: np.ndarray, log_transition: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Forward-backward on the product-state HMM in log space, batched over sequences.

        ``observations [B, T]``, ``log_transition [Z, Z]`` (``log P(z' | z)``). The conventions of
        :meth:`log_likelihood`: the first joint state is uniform (``1 / Z``), the observed node's
        state *is* the token (emission ``1[z_obs = x_t]``). Only the ``Zo = Z / S_obs`` joint
        states that emit ``x_t`` can hold at step ``t``, so the recursions run over those:

        - ``log a_1(z) = -log Z``; ``log a_t(z') = logsumexp_z(log a_{t-1}(z) + log P(z'|z))``;
        - ``log b_T(z) = 0``; ``log b_t(z) = logsumexp_z'(log P(z'|z) + log b_{t+1}(z'))``;
        - ``log p(z_t = z | x_1..T) = log a_t(z) + log b_t(z) - log p(x_1..T)``.

        Returns ``(states [B, T, Zo], log_posterior [B, T, Zo])``: the indices (into
        :meth:`joint_states`) of the allowed states at each step and their log posteriors.
        """
        observations = np.asarray(observations, dtype=np.int64)
        observed = self.nodes[self.spec.observed]
        if observations.ndim != 2 or observations.shape[1] < 1:
            raise GSSMError(
                f"observations must be [sequences, length] with length >= 1; got shape "
                f"{observations.shape}"
            )
        if observations.size and (observations.min() < 0 or observations.max() >= observed.states):
            raise GSSMError(
                f"observed tokens must lie in [0, {observed.states}) (the states of "
                f"{observed.name!r}); got values from {observations.min()} to {observations.max()}"
            )
        joint = np.array(self.joint_states())  # [Z, nodes]
        emits = joint[:, self.order.index(self.spec.observed)]
        states_of = np.stack([np.flatnonzero(emits == v) for v in range(observed.states)])
        states = states_of[observations]  # [B, T, Zo]
        batch, length, width = states.shape
        log_alpha = np.empty((batch, length, width))
        log_beta = np.zeros((batch, length, width))
        log_alpha[:, 0] = -math.log(len(joint))
        for t in range(1, length):
            step = log_transition[states[:, t - 1, :, None], states[:, t, None, :]]  # [B, Zo, Zo]
            log_alpha[:, t] = _logsumexp(log_alpha[:, t - 1, :, None] + step, axis=1)
        for t in range(length - 2, -1, -1):
            step = log_transition[states[:, t, :, None], states[:, t + 1, None, :]]
            log_beta[:, t] = _logsumexp(step + log_beta[:, t + 1, None, :], axis=2)
        log_joint = log_alpha + log_beta  # log p(z_t, x_1..T), the same total at every t
        log_evidence = _logsumexp(log_joint, axis=2)[..., None]  # [B, T, 1]
        if not np.isfinite(log_evidence).all():
            raise GSSMError(
                "an observed sequence has probability 0 under these kernels; pass the kernels "
                "that generated it (for context nodes, the per-sequence kernels of sample())"
            )
        return states, log_joint - log_evidence

    def _marginals(
        self, observations: np.ndarray, log_transition: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``{node: [B, T, S_node]}`` posterior marginals of ``observations [B, T]``."""
        states, log_posterior = self._log_posteriors(observations, log_transition)
        posterior = np.exp(log_posterior)  # [B, T, Zo]
        joint = np.array(self.joint_states())  # [Z, nodes]
        marginals = {}
        for index, name in enumerate(self.order):
            values = joint[states, index]  # [B, T, Zo] the node's state in each joint state
            one_hot = values[..., None] == np.arange(self.nodes[name].states)  # [B, T, Zo, S]
            marginals[name] = np.einsum("btz,btzs->bts", posterior, one_hot)
        return marginals

    def log_transition(self, kernels: dict | None = None) -> np.ndarray:
        """``log P(z' | z)`` ``[Z, Z]`` of :meth:`transition_matrix` (``-inf`` where 0);
        default the generator's own kernels."""
        with np.errstate(divide="ignore"):
            return np.log(self.transition_matrix(self.kernels if kernels is None else kernels))

    def posterior_marginals(
        self, observations: np.ndarray, kernels: dict | None = None
    ) -> dict[str, np.ndarray]:
        """``{node: [T, S_node]}``: ``p(x_node(t) = s | x_1..T)`` for every node (the observed
        one is one-hot on the tokens), by log-space forward-backward on the product-state HMM
        with the conventions of :meth:`log_likelihood` (uniform first joint state, the observed
        node's state is the token). ``observations [B, T]`` gives ``{node: [B, T, S_node]}``.
        ``kernels``: default the generator's own (for every sequence); a sequence with context
        nodes needs its own kernels (``sample()["kernels"][b]``)."""
        observations = np.asarray(observations)
        if observations.ndim not in (1, 2):
            raise GSSMError(
                f"posterior_marginals takes observations [T] or [B, T]; got shape "
                f"{observations.shape}"
            )
        marginals = self._marginals(np.atleast_2d(observations), self.log_transition(kernels))
        if observations.ndim == 1:
            return {name: values[0] for name, values in marginals.items()}
        return marginals

    def bayes_optimal_accuracy(self, data: dict, node: str) -> float:
        """Accuracy of the Bayes decision ``argmax_s p(x_node(t) = s | x_1..T)`` (the posterior
        of :meth:`posterior_marginals`, from the whole observed sequence) against the true hidden
        states ``data["hidden/<node>"]`` [B, T], averaged over every position of every sequence.

        The posteriors use the true kernels: the generator's own, and for ``context`` nodes the
        per-sequence kernels of ``data["kernels"]`` (what :meth:`sample` returns). With context
        nodes this is an oracle upper bound: a model that reads the sequence must also infer
        those kernels, which the oracle is given. Files of :func:`save_sequences` do not keep the
        kernels, so context-node GSSMs need the sampled ``data``.
        """
        if node not in self.nodes:
            raise GSSMError(f"unknown GSSM node {node!r}; nodes are {', '.join(self.order)}")
        key = f"hidden/{node}"
        if key not in data or "observations" not in data:
            raise GSSMError(
                f"the data have no {key!r} or 'observations'; pass what sample() or "
                f"load_sequences() returns"
            )
        observations = np.asarray(data["observations"])
        truth = np.asarray(data[key])
        context = [name for name in self.order if self.nodes[name].mode == "context"]
        if not context:
            marginals = self.posterior_marginals(observations)[node]
        else:
            kernels = data.get("kernels")
            if kernels is None or len(kernels) != len(observations):
                raise GSSMError(
                    f"nodes {context} are context nodes (new kernels per sequence), so the Bayes "
                    f"decision needs data['kernels'] per sequence; pass the data of sample() "
                    f"(save_sequences files do not keep kernels)"
                )
            marginals = np.stack(
                [
                    self.posterior_marginals(row, tables)[node]
                    for row, tables in zip(observations, kernels, strict=True)
                ]
            )
        return float((marginals.argmax(-1) == truth).mean())

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


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    """``log(sum(exp(values)))`` along ``axis``, ``-inf`` where every value is ``-inf``."""
    peak = np.max(values, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.exp(values - peak).sum(axis=axis, keepdims=True)) + peak
    return np.squeeze(total, axis=axis)


def save_sequences(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Observations and hidden states (not the per-sequence kernels) to an .npz file."""
    arrays = {key: value for key, value in data.items() if isinstance(value, np.ndarray)}
    np.savez_compressed(Path(path), **{key.replace("/", "__"): v for key, v in arrays.items()})


def load_sequences(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(path)) as data:
        return {key.replace("__", "/"): data[key] for key in data.files}
