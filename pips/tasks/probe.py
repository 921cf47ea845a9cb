"""Probes: how much of a known property can be read off the codes (or the activations)?

A probe is a softmax regression (optionally a one-hidden-layer MLP) fitted on a training split of
(features, target) pairs and scored on held-out pairs, beside two baselines: chance (one over the
number of classes) and the majority class of the training split. For ARC grids the targets are
simple grid properties (:data:`GRID_PROPERTIES`); the features are

- ``codes``: the code indices. Pooled codes are one-hot per slot (a linear probe on them is a sum
  of one weight vector per (slot, code)); spatial codes, whose number varies with the grid, are
  summarised by the mean of their code vectors;
- ``activations``: the encoder's outputs before the quantizer, mean-pooled over latents (pooled
  layout: concatenated over slots).

For GSSM sequences (:mod:`pips.data.gssm`, :class:`~pips.models.sequence_ae.SequenceAutoencoder`)
the targets are a hidden node's state at every position, one example per token
(:func:`sequence_features`), split by sequence so no held-out token's sequence was trained on.
Beside chance and majority sits ``bayes_optimal``: the accuracy of the posterior argmax from the
whole observed sequence under the true process (:meth:`GSSM.bayes_optimal_accuracy`), the best any
reader of the tokens can do; ``recovered = (probe - majority) / (bayes_optimal - majority)`` is the
share of the recoverable accuracy above the majority baseline that the features give (1: all of
it, 0: nothing beyond predicting the majority state). Features computed from the tokens stay at or
below 1 up to sampling noise; features that see more than the tokens (the hidden states
themselves) can exceed it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pips.data.batch import collate_grids
from pips.data.gssm import GSSM, GSSMError
from pips.models.grid_dvae import GridDVAE
from pips.models.sequence_ae import SequenceAutoencoder

GRID_PROPERTIES: dict[str, Callable[[np.ndarray], int]] = {
    "height": lambda grid: int(grid.shape[0]),
    "width": lambda grid: int(grid.shape[1]),
    "colours": lambda grid: int(len(np.unique(grid))),
    "dominant": lambda grid: int(np.bincount(grid.reshape(-1), minlength=10).argmax()),
}
FEATURES = ("codes", "activations")


class ProbeError(ValueError):
    """A probe that cannot be fitted as asked; the message says why."""


def _check_features(model, features: str) -> None:
    """Known features, and codes only from a model that has a quantizer."""
    if features not in FEATURES:
        raise ProbeError(f"probe features must be one of {FEATURES}; got {features!r}")
    if features == "codes" and model.config.quantizer.kind == "none":
        raise ProbeError(
            "this model has no quantizer (model.quantizer.kind=none), so it has no codes to "
            "probe; use --features activations"
        )


@torch.no_grad()
def grid_features(
    model: GridDVAE, grids: Sequence[np.ndarray], kind: str, batch_size: int = 128
) -> np.ndarray | tuple[np.ndarray, int]:
    """``[G, F]`` float features, or for pooled ``codes`` the ``[G, N]`` indices and K."""
    _check_features(model, kind)
    model.eval()
    rows: list[np.ndarray | None] = [None] * len(grids)
    order = sorted(range(len(grids)), key=lambda i: (grids[i].shape, i))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = collate_grids([grids[i] for i in chosen], eos=model.eos)
        encoded = model.encode(batch)
        keep = (~encoded.latent_padding).unsqueeze(-1).float()  # [B, N, 1]
        if kind == "codes" and not model.spatial:
            indices = encoded.quantizer.indices
            values = indices.reshape(len(chosen), -1).numpy()  # [B, N*S]
        else:
            source = encoded.quantizer.quantized if kind == "codes" else encoded.latents
            if model.spatial:
                values = ((source * keep).sum(1) / keep.sum(1).clamp_min(1)).numpy()
            else:
                values = source.reshape(len(chosen), -1).numpy()  # slots concatenated
        for row, i in enumerate(chosen):
            rows[i] = values[row]
    stacked = np.stack(rows)
    if kind == "codes" and not model.spatial:
        return stacked.astype(np.int64), model.quantizer.codebook_size
    return stacked.astype(np.float32)


class _Probe(nn.Module):
    def __init__(self, inputs: int, classes: int, hidden: int, codebook: int | None):
        super().__init__()
        self.codebook = codebook
        width = hidden or classes
        if codebook is not None:  # one weight vector per (slot, code): one-hot inputs
            self.embed = nn.Embedding(inputs * codebook, width)
            self.bias = nn.Parameter(torch.zeros(width))
        else:
            self.linear = nn.Linear(inputs, width)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(hidden, classes)) if hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.codebook is not None:
            offsets = torch.arange(x.shape[1], device=x.device) * self.codebook
            h = self.embed(x + offsets).sum(1) + self.bias
        else:
            h = self.linear(x)
        return self.head(h) if self.head is not None else h


def fit_probe(
    features: np.ndarray,
    targets: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    codebook: int | None = None,
    hidden: int = 0,
    steps: int = 500,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Fit on ``train`` indices, score on ``test``: accuracy, chance and majority baselines.

    ``codebook``: the features are integer codes ``[G, N]`` with K = ``codebook`` values each
    (one-hot inputs). ``hidden`` > 0 makes it an MLP with that many hidden units. Full-batch Adam
    on standardised features (float inputs), ``steps`` steps.
    """
    classes, labels = np.unique(targets, return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(f"the target has a single value ({classes[0]}) on these grids")
    torch.manual_seed(seed)
    if codebook is None:
        x = torch.as_tensor(features, dtype=torch.float32)
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        x = (x - mean) / std
    else:
        x = torch.as_tensor(features, dtype=torch.long)
    y = torch.as_tensor(labels, dtype=torch.long)
    probe = _Probe(x.shape[1], len(classes), hidden, codebook)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(x[train]), y[train]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((probe(x[test]).argmax(-1) == y[test]).float().mean())
        train_accuracy = float((probe(x[train]).argmax(-1) == y[train]).float().mean())
    majority = np.bincount(labels[train], minlength=len(classes)).argmax()
    return {
        "accuracy": accuracy,
        "train_accuracy": train_accuracy,
        "chance": 1.0 / len(classes),
        "majority": float((labels[test] == majority).mean()),
        "classes": float(len(classes)),
        "train_size": float(len(train)),
        "test_size": float(len(test)),
    }


def split(count: int, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    cut = int(round(count * (1 - test_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


# ------------------------------------------------------------------------------------ sequences
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sequence_features(
    model: SequenceAutoencoder,
    tokens: np.ndarray | torch.Tensor,
    features: str = "codes",
    batch_size: int = 256,
    layer: int | None = None,
) -> np.ndarray | tuple[np.ndarray, int]:
    """Per-token features of sequences ``tokens [B, T]``, row ``b * T + t`` for token ``t`` of
    sequence ``b`` (eval mode, argmax codes):

    - ``activations``: the encoder output at the token, float ``[B*T, width]`` (with ``layer``:
      the residual stream after that many encoder blocks, 0 being the embeddings);
    - ``codes``, spatial layout: the code covering the token (``t // p``; every level of a
      multi-level quantizer) joined with the token's offset in the patch,
      ``code * p + t mod p``, so a linear probe can read any function of the pair;
    - ``codes``, pooled layout: the codes of all ``N`` slots (the same for every token of the
      sequence), plus the token's position ``t``.

    Codes come back as ``(integer columns [B*T, F], K)`` with every column in ``[0, K)``,
    ``K = codebook size * p`` (spatial) or ``max(codebook size, T)`` (pooled), for
    :func:`fit_probe`'s one-hot inputs: a linear probe adds one weight vector per (column,
    value), so for pooled codes reading a state that depends on a slot's code *and* the position
    jointly needs ``hidden > 0``.
    """
    _check_features(model, features)
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if tokens.dim() != 2:
        raise ProbeError(f"tokens must be [sequences, length]; got shape {tuple(tokens.shape)}")
    depth = len(model.encoder)
    if layer is not None and (features != "activations" or not 0 <= layer <= depth):
        raise ProbeError(
            f"--layer picks encoder activations: 0 (the embeddings) to {depth} (after the last "
            f"block), with --features activations; got layer {layer} with features {features}"
        )
    count, length = tokens.shape
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, count, batch_size):
            chunk = tokens[start : start + batch_size].to(_device(model))
            batch = chunk.shape[0]
            activations = model.token_activations(  # [b, T, W]
                chunk, layer if features == "activations" else None
            )
            if features == "activations":
                rows.append(activations.reshape(batch * length, -1).float().cpu().numpy())
                continue
            indices = model.encode_activations(activations).quantizer.indices
            indices = indices.reshape(batch, indices.shape[1], -1).cpu()  # [b, N, levels]
            positions = torch.arange(length)
            if model.spatial:
                # (covering code, offset in its patch) as one value: a linear probe can then
                # read any function of the two, as the decoder does
                covering = indices[:, positions // model.patch]  # [b, T, levels]
                offsets = (positions % model.patch).view(1, length, 1)
                columns = [covering * model.patch + offsets]
            else:
                slots = indices.reshape(batch, 1, -1).expand(-1, length, -1)  # [b, T, N*levels]
                columns = [slots, positions.view(1, length, 1).expand(batch, -1, -1)]
            rows.append(torch.cat(columns, dim=-1).reshape(batch * length, -1).numpy())
    finally:
        model.train(was_training)
    stacked = np.concatenate(rows)
    if features == "activations":
        return stacked.astype(np.float32)
    if model.spatial:
        cardinality = model.quantizer.codebook_size * model.patch
    else:
        cardinality = max(model.quantizer.codebook_size, length)
    return stacked.astype(np.int64), cardinality


def hidden_nodes(data: dict) -> list[str]:
    """The hidden nodes recorded in ``data`` (its ``hidden/<node>`` keys)."""
    return [key.split("/", 1)[1] for key in data if key.startswith("hidden/")]


def _check_node(data: dict, node: str) -> None:
    nodes = hidden_nodes(data)
    if node not in nodes:
        raise ProbeError(
            f"unknown hidden node {node!r}; these sequences record {', '.join(nodes) or 'none'}"
        )


def probe_sequences(
    features: np.ndarray,
    data: dict,
    node: str,
    codebook: int | None = None,
    gssm: GSSM | None = None,
    hidden: int = 0,
    test_fraction: float = 0.3,
    steps: int = 500,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Probe node's hidden state from per-token ``features [S*T, F]`` of the first ``S``
    sequences of ``data`` (row ``s * T + t``; ``codebook`` as in :func:`fit_probe`).

    Sequences, not tokens, are split into train and test (:func:`split`). Returns
    :func:`fit_probe`'s scores (held-out ``accuracy``, ``chance``, ``majority``, ...) plus
    ``bayes_optimal`` (with ``gssm``, the generator of ``data``: the Bayes accuracy on the same
    held-out sequences, else None) and ``recovered = (accuracy - majority) / (bayes_optimal -
    majority)`` (None without ``gssm`` or when the Bayes decision is no better than the majority).
    """
    _check_node(data, node)
    states = np.asarray(data[f"hidden/{node}"])
    length = states.shape[1]
    if len(features) % length or len(features) // length > len(states):
        raise ProbeError(
            f"{len(features)} feature rows are not a whole number of the data's {length}-token "
            f"sequences (at most {len(states)}); pass sequence_features of data['observations']"
        )
    count = len(features) // length
    train_sequences, test_sequences = split(count, test_fraction, seed)
    if len(train_sequences) == 0 or len(test_sequences) == 0:
        raise ProbeError(
            f"{count} sequences cannot be split into train and test at test_fraction="
            f"{test_fraction}; probe more sequences"
        )
    offsets = np.arange(length)
    train = (train_sequences[:, None] * length + offsets).reshape(-1)
    test = (test_sequences[:, None] * length + offsets).reshape(-1)
    targets = states[:count].reshape(-1)
    scores: dict = fit_probe(
        features, targets, train, test, codebook, hidden, steps, weight_decay, seed
    )
    gauge = bayes_baselines(data, node, gssm, test_sequences, count, length)
    scores.update(gauge(scores))
    return scores


def bayes_baselines(
    data: dict, node: str, gssm: GSSM | None, test_sequences: np.ndarray, count: int, length: int
) -> Callable[[dict], dict]:
    """A function of a probe's scores that adds ``bayes_optimal`` (with ``gssm``, the generator of
    ``data``: the Bayes accuracy on the same held-out sequences, else None) and ``recovered =
    (accuracy - majority) / (bayes_optimal - majority)`` (None without ``gssm`` or when the Bayes
    decision is no better than the majority)."""
    states = np.asarray(data[f"hidden/{node}"])

    def baselines(scores: dict) -> dict:
        extra = {
            "node": node,
            "sequences": count,
            "length": length,
            "test_sequences": len(test_sequences),
            "bayes_optimal": None,
            "recovered": None,
        }
        if gssm is None:
            return extra
        held_out = {
            "observations": np.asarray(data["observations"])[test_sequences],
            f"hidden/{node}": states[test_sequences],
        }
        if "kernels" in data:
            held_out["kernels"] = [data["kernels"][i] for i in test_sequences]
        try:
            bayes = gssm.bayes_optimal_accuracy(held_out, node)
        except GSSMError as error:
            raise ProbeError(str(error)) from None
        extra["bayes_optimal"] = bayes
        headroom = bayes - scores["majority"]
        if headroom > 1e-9:
            extra["recovered"] = (scores["accuracy"] - scores["majority"]) / headroom
        return extra

    return baselines


def probe_hidden_state(
    model: SequenceAutoencoder,
    data: dict,
    node: str,
    features: str = "codes",
    gssm: GSSM | None = None,
    hidden: int = 0,
    max_sequences: int = 512,
    test_fraction: float = 0.3,
    steps: int = 500,
    weight_decay: float = 1e-4,
    seed: int = 0,
    layer: int | None = None,
) -> dict:
    """How well ``node``'s hidden state at every position can be read off the model's codes or
    activations (:func:`sequence_features`) of the first ``max_sequences`` sequences of ``data``
    (what :meth:`GSSM.sample` or :func:`pips.data.gssm.load_sequences` returns).

    Returns :func:`probe_sequences`' scores plus ``features``: held-out ``accuracy``,
    ``chance``, ``majority``, ``bayes_optimal`` (needs ``gssm``, the generator of ``data``) and
    ``recovered = (accuracy - majority) / (bayes_optimal - majority)``, the share of what the
    whole sequence can tell about the state, beyond the majority guess, that the features hold.
    """
    _check_node(data, node)
    if max_sequences < 2:
        raise ProbeError(f"max_sequences must be at least 2 (train and test); got {max_sequences}")
    observations = np.asarray(data["observations"])[:max_sequences]
    values = sequence_features(model, observations, features, layer=layer)
    rows, codebook = values if isinstance(values, tuple) else (values, None)
    scores = probe_sequences(
        rows, data, node, codebook, gssm, hidden, test_fraction, steps, weight_decay, seed
    )
    scores["features"] = features if layer is None else f"{features} after layer {layer}"
    return scores
