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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pips.data.batch import collate_grids
from pips.models.grid_dvae import GridDVAE

GRID_PROPERTIES: dict[str, Callable[[np.ndarray], int]] = {
    "height": lambda grid: int(grid.shape[0]),
    "width": lambda grid: int(grid.shape[1]),
    "colours": lambda grid: int(len(np.unique(grid))),
    "dominant": lambda grid: int(np.bincount(grid.reshape(-1), minlength=10).argmax()),
}
FEATURES = ("codes", "activations")


class ProbeError(ValueError):
    """A probe that cannot be fitted as asked; the message says why."""


@torch.no_grad()
def grid_features(
    model: GridDVAE, grids: Sequence[np.ndarray], kind: str, batch_size: int = 128
) -> np.ndarray | tuple[np.ndarray, int]:
    """``[G, F]`` float features, or for pooled ``codes`` the ``[G, N]`` indices and K."""
    if kind not in FEATURES:
        raise ProbeError(f"probe features must be one of {FEATURES}; got {kind!r}")
    if kind == "codes" and model.config.quantizer.kind == "none":
        raise ProbeError(
            "this model has no quantizer (model.quantizer.kind=none), so it has no codes to "
            "probe; use --features activations"
        )
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
