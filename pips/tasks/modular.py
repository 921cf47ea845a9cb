"""Task ``modular``: modular arithmetic, the grokking benchmark (Power et al. 2022).

Every pair ``(a, b)`` with ``a, b < p`` is one item, labelled ``(a op b) mod p``; a seeded share
(``modular.train_fraction``) trains, the rest validates, so validation accuracy measures
generalisation to pairs never seen. The model is a small transformer from PIPS's blocks over the
three tokens ``a, b, =``, reading the answer off the last position; its latent there goes
through ``model.quantizer`` like any task's (``none`` by default: the task is about the optimizer
and the loss, ``optim.name=orthograd`` and ``loss.stablemax``, not the codes). Nothing is
downloaded: the dataset is generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from pips.config import ModularConfig
from pips.losses.stablemax import stablemax_cross_entropy
from pips.models.build import block_arguments, build_quantizer, quantizer_dim
from pips.models.grid_dvae import Encoded
from pips.nn.transformer import Block, init_weights
from pips.tasks.base import Headline, register_task
from pips.tasks.tensors import TensorDataModule, TensorTask

OPERATIONS = {
    "add": lambda a, b, p: (a + b) % p,
    "subtract": lambda a, b, p: (a - b) % p,
    "multiply": lambda a, b, p: (a * b) % p,
}


@dataclass
class ModularBatch:
    pairs: torch.Tensor  # [B, 2] long
    answers: torch.Tensor  # [B] long

    def __len__(self) -> int:
        return self.pairs.shape[0]

    @property
    def elements(self) -> int:
        return self.pairs.shape[0]


class ModularOutput(NamedTuple):
    logits: torch.Tensor  # [B, p]
    encoded: Encoded


class ModularTransformer(nn.Module):
    """Tokens ``a, b, =`` with learned positions -> ``model.encoder_layers`` pre-norm blocks ->
    the last position's latent through the quantizer -> logits over the p answers."""

    def __init__(self, model_config, modulus: int):
        super().__init__()
        width = model_config.width
        self.modulus = modulus
        self.token_embedding = nn.Embedding(modulus + 1, width)  # p numbers and "="
        self.position_embedding = nn.Parameter(torch.zeros(3, width))
        self.blocks = nn.ModuleList(
            Block(**block_arguments(model_config)) for _ in range(model_config.encoder_layers)
        )
        self.norm = nn.RMSNorm(width)
        dim = quantizer_dim(model_config.quantizer, width)
        self.to_latent = nn.Linear(width, dim) if dim != width else nn.Identity()
        self.head = nn.Linear(dim, modulus)
        init_weights(self, max(model_config.encoder_layers, 1))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.quantizer = build_quantizer(model_config.quantizer, dim, None)

    def encode(self, pairs: torch.Tensor, **values) -> Encoded:
        equals = torch.full_like(pairs[:, :1], self.modulus)
        h = self.token_embedding(torch.cat([pairs, equals], dim=1)) + self.position_embedding
        for block in self.blocks:
            h = block(h)
        latents = self.to_latent(self.norm(h[:, -1:]))  # [B, 1, D]
        batch = pairs.shape[0]
        positions = torch.zeros(batch, 1, 2, dtype=torch.long, device=pairs.device)
        padding = torch.zeros(batch, 1, dtype=torch.bool, device=pairs.device)
        return Encoded(latents, self.quantizer(latents, **values), positions, padding)

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Answers ``[B]`` from the codes of the latent ``[B, 1]``."""
        return self.head(self.quantizer.codes_to_quantized(indices))[:, 0].argmax(-1)

    def forward(self, pairs: torch.Tensor, **values) -> ModularOutput:
        encoded = self.encode(pairs, **values)
        return ModularOutput(self.head(encoded.quantizer.quantized)[:, 0], encoded)


class ModularData(TensorDataModule):
    def collate(self, items) -> ModularBatch:
        pairs, answers = zip(*items, strict=True)
        return ModularBatch(torch.stack(pairs), torch.stack(answers))

    def load(self):
        section = self.config.modular
        p = section.modulus
        a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)  # [p*p, 2]
        answers = OPERATIONS[section.operation](pairs[:, 0], pairs[:, 1], p)
        order = torch.randperm(
            len(pairs), generator=torch.Generator().manual_seed(self.config.seed)
        )
        cut = int(round(section.train_fraction * len(pairs)))
        train, val = order[:cut], order[cut:]
        return (pairs[train], answers[train]), (pairs[val], answers[val])

    @property
    def shape(self) -> tuple[int]:
        return (self.config.modular.modulus,)

    def describe(self) -> str:
        section = self.config.modular
        return (
            f"training on {self.train_size} of the {section.modulus}^2 pairs "
            f"((a {section.operation} b) mod {section.modulus}), validating on {self.val_size}"
        )


class AnswerAccuracy(Metric):
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("right", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state(
            "loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, output, batch: ModularBatch, loss: torch.Tensor) -> None:
        self.right += (output.logits.argmax(-1) == batch.answers).sum()
        self.total += len(batch)
        self.loss_sum += loss.detach().double() * len(batch)

    def compute(self) -> dict[str, float]:
        total = max(float(self.total), 1.0)
        return {"accuracy": float(self.right) / total, "loss_answer": float(self.loss_sum) / total}


@register_task
class ModularTask(TensorTask):
    name = "modular"
    unit = "pairs"
    section = ModularConfig
    headline = Headline("accuracy", "val acc", 3, "max")
    summary_keys = ("accuracy", "loss_answer")
    progress_metrics = ("accuracy", "loss_answer")
    reconstruction_loss = "answer"
    curve_panels = [
        ("loss", ["train/loss", "train/loss_answer", "val/loss_answer"]),
        ("accuracy", ["train/accuracy", "val/accuracy"]),
    ]
    data_class = ModularData
    shape_key = "modulus"
    slotted_layouts = ("spatial", "pooled")  # one latent per item: a slot

    def new_model(self, shape) -> ModularTransformer:
        return ModularTransformer(self.config.model, int(shape[0]))

    def model_description(self) -> str:
        model = self.config.model
        return f"{model.encoder_layers}-block transformer, quantizer {model.quantizer.kind}"

    def inputs(self, batch: ModularBatch) -> torch.Tensor:
        return batch.pairs

    def loss(self, output, batch: ModularBatch) -> torch.Tensor:
        if self.config.loss.stablemax:
            return stablemax_cross_entropy(output.logits, batch.answers)
        return F.cross_entropy(output.logits.float(), batch.answers)

    def metric(self, **kwargs) -> AnswerAccuracy:
        return AnswerAccuracy(**kwargs)

    def train_logs(self, output, batch: ModularBatch) -> dict[str, torch.Tensor]:
        return {"train/accuracy": (output.logits.argmax(-1) == batch.answers).float().mean()}
