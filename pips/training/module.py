"""The LightningModule that trains a grid DVAE: schedules, losses, optimizer, validation metrics."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from pips.config import Config, to_dict
from pips.data.batch import Batch
from pips.evaluation.evaluate import predict, update_metrics
from pips.evaluation.metrics import ReconstructionMetrics
from pips.losses import cell_weights, shape_cross_entropy, weighted_cross_entropy
from pips.models.grid_dvae import GridDVAE, GridDVAEOutput
from pips.schedules import Schedule


class GridDVAEModule(L.LightningModule):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"config": to_dict(config)})
        self.model = GridDVAE(config.model, eos=config.data.eos)
        max_steps = config.trainer.max_steps
        quantizer = config.model.quantizer
        self.schedules: dict[str, Schedule] = {
            "lr": config.optim.lr.resolve(max_steps),
            "temperature": quantizer.temperature.resolve(max_steps),
            "hardness": quantizer.hardness.resolve(max_steps),
            "noise_scale": quantizer.noise_scale.resolve(max_steps),
            "quantizer_weight": config.loss.quantizer_weight.resolve(max_steps),
        }
        self.val_metrics: ReconstructionMetrics | None = None

    # ----------------------------------------------------------------------------------------
    def schedule_values(self, step: int) -> dict[str, float]:
        return {name: schedule(step) for name, schedule in self.schedules.items()}

    def forward(self, batch: Batch, **schedule_values: float) -> GridDVAEOutput:
        return self.model(batch, **schedule_values)

    def compute_losses(self, output: GridDVAEOutput, batch: Batch, quantizer_weight: float):
        loss_config = self.config.loss
        grid_mask = batch.grid_mask
        # PAD/EOS weigh pad_weight; cells outside the grid's own code patches carry no signal
        weights = cell_weights(grid_mask, loss_config.pad_weight) * output.covered
        cells = weighted_cross_entropy(
            output.cell_logits,
            batch.tokens,
            weights,
            loss_config.focal_gamma,
            loss_config.label_smoothing,
        )
        shape = shape_cross_entropy(output.height_logits, output.width_logits, batch.shapes)
        quantizer_loss = output.encoded.quantizer.loss
        total = cells + loss_config.shape_weight * shape + quantizer_weight * quantizer_loss
        return {"total": total, "cells": cells, "shape": shape, "quantizer": quantizer_loss}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        values = self.schedule_values(self.global_step)
        output = self(batch, **values)
        losses = self.compute_losses(output, batch, values["quantizer_weight"])
        if (self.global_step + 1) % self.config.trainer.log_every == 0 or self.global_step == 0:
            with torch.no_grad():
                colours, _ = predict(self.model, output, batch, self.config.loss.pad_weight)
                mask = batch.grid_mask
                accuracy = ((colours == batch.tokens) & mask).sum() / mask.sum()
            logs = {f"train/loss_{name}": value.detach() for name, value in losses.items()}
            logs["train/loss"] = losses["total"].detach()
            logs["train/cell_accuracy"] = accuracy
            logs.update({f"schedule/{name}": value for name, value in values.items()})
            for key, value in output.encoded.quantizer.stats.items():
                logs[f"quantizer/{key}"] = value.float()
            self.log_dict(logs, batch_size=len(batch))
        self.last_train_loss = losses["total"].detach()
        return losses["total"]

    # ----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_metrics = ReconstructionMetrics(self.model.quantizer.codebook_size)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        output = self(batch, **self.schedule_values(self.global_step))
        losses = self.compute_losses(output, batch, 0.0)
        update_metrics(self.val_metrics, self.model, output, batch, self.config.loss.pad_weight)
        self.log("val/loss_cells", losses["cells"], batch_size=len(batch))

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        metrics.pop("grids", None)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)

    # ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the random streams, so a resumed run draws the same noise it would have drawn."""
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {  # plain types and tensors: loadable with weights_only=True
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            kind, keys, position, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
            random.setstate(states["python"])

    # ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optim = self.config.optim
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() >= 2 else no_decay).append(parameter)
        groups = [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # lr=1 and a LambdaLR returning the scheduled value: the Schedule is the learning rate
        optimizer = torch.optim.AdamW(
            groups,
            lr=1.0,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            fused=torch.cuda.is_available() and self.config.trainer.accelerator != "cpu",
        )
        lr = self.schedules["lr"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr(step))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
