"""The LightningModule that trains a grid DVAE: schedules, losses, optimizer, validation metrics.

Besides the reconstruction losses, optional terms of the code posteriors ``q(z|x)`` (``loss.kl``,
``loss.mi``/``tc``/``dwkl``, entropies, code usage; see :class:`pips.config.LossConfig`) enter the
loss as ``weight * term``. Each weight is a Schedule, and a term is computed only at the steps where
its weight is above 0. During training, ``data.mask_ratio`` hides input cells behind MASK.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from pips.config import DECOMPOSITION_TERMS, LOGIT_TERMS, Config, schedule_is_off, to_dict
from pips.data.batch import Batch
from pips.data.masking import mask_cells
from pips.evaluation.evaluate import predict, update_metrics
from pips.evaluation.metrics import ReconstructionMetrics
from pips.losses import (
    CodeUsageKL,
    SlotMarginalEMA,
    batch_average_entropy,
    cell_weights,
    decompose_kl,
    entropy_diversity_loss,
    kl_to_uniform,
    monte_carlo_kl_to_uniform,
    posterior_entropy,
    shape_cross_entropy,
    slot_average_entropy,
    weighted_cross_entropy,
)
from pips.models.grid_dvae import GridDVAE, GridDVAEOutput
from pips.optim import OPTIMIZERS
from pips.schedules import Schedule

# loss.mi/tc/dwkl -> the KLDecomposition field that holds the term
DECOMPOSITION_FIELDS = {
    "mi": "mutual_information",
    "tc": "total_correlation",
    "dwkl": "dimension_wise_kl",
}


def code_statistics(output: GridDVAEOutput) -> dict[str, torch.Tensor]:
    """Peakiness (mean max probability of q(z|x)) for the probabilistic quantizers, and the mean
    norms of the encoder outputs and of the quantized vectors (for VQ: the chosen codebook
    vectors), over the grid's real latents."""
    encoded = output.encoded
    keep = ~encoded.latent_padding
    stats = {}
    with torch.no_grad():
        if encoded.quantizer.logits is not None:
            probs = encoded.quantizer.logits.float().softmax(-1)
            stats["codes/peakiness"] = probs.amax(-1)[keep].mean()
        stats["codes/latent_norm"] = encoded.latents.float().norm(dim=-1)[keep].mean()
        stats["codes/quantized_norm"] = (
            encoded.quantizer.quantized.float().norm(dim=-1)[keep].mean()
        )
    return stats


class CodeModule(L.LightningModule):
    """What every task's module shares: the schedules, the latent terms of the code posteriors,
    the NaN guard, gradient-norm logs, the saved random streams and the optimizer. A task's
    module builds ``self.model`` (which has a ``quantizer``) in :meth:`build_model` and defines
    ``train_losses`` and validation. ``dataset_size`` (the number of training items) feeds the
    minibatch estimator of ``loss.mi/tc/dwkl`` unless ``loss.dataset_size`` sets it; None treats
    each batch as the whole dataset."""

    #: validation metrics printed after each validation (``step N: val a 0.1, b 0.2, ...``)
    progress_metrics: tuple[str, ...] = ("cell_accuracy", "grid_accuracy", "codebook_perplexity")

    def __init__(self, config: Config, dataset_size: int | None = None):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"config": to_dict(config)})
        self.model = self.build_model()
        max_steps = config.trainer.max_steps
        quantizer = config.model.quantizer
        self.schedules: dict[str, Schedule] = {
            "lr": config.optim.lr.resolve(max_steps),
            "temperature": quantizer.temperature.resolve(max_steps),
            "hardness": quantizer.hardness.resolve(max_steps),
            "noise_scale": quantizer.noise_scale.resolve(max_steps),
            "quantizer_weight": config.loss.quantizer_weight.resolve(max_steps),
        }
        loss = config.loss
        # weights of the latent terms that are ever on; the model never sees these values
        self.term_weights: dict[str, Schedule] = {
            name: getattr(loss, name).resolve(max_steps)
            for name in LOGIT_TERMS
            if not schedule_is_off(getattr(loss, name))
        }
        self.mask_ratio = config.data.mask_ratio.resolve(max_steps)
        self.dataset_size = loss.dataset_size or dataset_size
        # stateful terms are submodules, so their running averages live in the checkpoint; they
        # see a product codebook's factors as latents of k codes each
        factors = getattr(self.model.quantizer, "factors", 1)
        codebook_size = getattr(self.model.quantizer, "factor_size", quantizer.codebook_size)
        decomposition = any(name in self.term_weights for name in DECOMPOSITION_TERMS)
        self.slot_marginals = (
            SlotMarginalEMA(config.model.num_latents * factors, codebook_size, loss.marginal_ema)
            if decomposition and loss.marginal_ema is not None
            else None
        )
        self.code_usage = (
            CodeUsageKL(codebook_size, loss.code_usage_decay)
            if "code_usage_kl" in self.term_weights
            else None
        )
        self.val_metrics: ReconstructionMetrics | None = None
        self.last_codes: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self.last_losses: dict[str, torch.Tensor] = {}  # this step's loss parts, detached
        self.guard = None  # a RunGuard (set by the runner): NaN/inf checks of the loss

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def spatial_codes(self) -> bool:
        """True when a position's latent means a place, not a slot: every slot-wise term then
        pools all latents of the batch (and padded latents are left out)."""
        return self.config.model.layout == "spatial"

    def schedule_values(self, step: int) -> dict[str, float]:
        return {name: schedule(step) for name, schedule in self.schedules.items()}

    def forward(self, batch, **schedule_values: float):
        return self.model(batch, **schedule_values)

    def add_latent_terms(self, output, losses: dict, step: int, values: dict) -> tuple[dict, dict]:
        """Add the scheduled latent terms to ``losses["total"]``; keep this step's detached loss
        parts and codes (for the guard and the codebook monitor). Returns (terms, clamp flags)."""
        weights = {name: schedule(step) for name, schedule in self.term_weights.items()}
        # the step's codes, for the codebook monitor (indices [B, N(, S)], padding [B, N])
        self.last_codes = (output.encoded.quantizer.indices, output.encoded.latent_padding)
        terms, clamped = self.latent_terms(output, weights, values["temperature"])
        for name, term in terms.items():
            if weights.get(name, 0.0) > 0:  # mi, tc, dwkl come together
                losses["total"] = losses["total"] + weights[name] * term
        self.last_losses = {
            **{name: value.detach() for name, value in losses.items() if name != "total"},
            **{name: term.detach() for name, term in terms.items()},
        }
        return terms, clamped

    def common_logs(self, output, losses: dict, terms: dict, clamped: dict, values: dict, step):
        """Loss parts, schedules, quantizer statistics and the latent terms with their weights."""
        logs = {f"train/loss_{name}": value.detach() for name, value in losses.items()}
        logs["train/loss"] = losses["total"].detach()
        logs.update({f"schedule/{name}": value for name, value in values.items()})
        for key, value in output.encoded.quantizer.stats.items():
            logs[f"quantizer/{key}"] = value.float()
        logs.update(code_statistics(output))
        if self.term_weights:
            weights = {name: schedule(step) for name, schedule in self.term_weights.items()}
            logs["loss/total"] = losses["total"].detach()
            logs.update({f"weight/{name}": weight for name, weight in weights.items()})
            logs.update({f"loss/{name}": term.detach() for name, term in terms.items()})
            logs.update({f"loss/clamped_{name}": flag.float() for name, flag in clamped.items()})
        return logs

    def train_losses(self, batch, step: int, with_logs: bool = False):
        raise NotImplementedError

    def latent_terms(
        self, output: GridDVAEOutput, weights: dict[str, float], temperature: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The latent terms whose weight is above 0 now, and the decomposition's clamp flags.

        Each value is signed as it enters the loss (``loss += weight * value``): the diversity
        terms are minus an entropy. The decomposition yields mi, tc and dwkl together whenever
        one of them is on, and with it the analytic KL (as ``kl``) when ``loss.kl`` is off. Spatial
        layout: padded latents cover no cell and are left out.
        """
        active = {name for name, weight in weights.items() if weight > 0}
        if not active:
            return {}, {}
        loss = self.config.loss
        # [B, N, K]; a product codebook's [B, N, F, k]: its factors are independent given x, so
        # every term treats them as F latents of k codes (the KL to uniform adds up exactly)
        logits = output.encoded.quantizer.logits
        factored = logits.dim() == 4
        terms: dict[str, torch.Tensor] = {}
        clamped: dict[str, torch.Tensor] = {}
        if self.spatial_codes:
            # the real latents of the whole batch, one per row: every slot-wise term pools them
            latents = logits[~output.encoded.latent_padding]  # [M, K] or [M, F, k]
            latents = latents if factored else latents.unsqueeze(1)  # [M, 1 or F, k]
            latents_per_grid = latents.shape[0] / logits.shape[0]
        else:
            latents = logits.flatten(1, 2) if factored else logits  # [B, N (x F), k]
            latents_per_grid = None

        if "kl" in active:
            kl = (
                monte_carlo_kl_to_uniform(latents, temperature, per_latent=loss.kl_per_latent)
                if loss.kl_monte_carlo
                else kl_to_uniform(latents, per_latent=loss.kl_per_latent)
            )
            if latents_per_grid is not None and not loss.kl_per_latent:
                kl = kl * latents_per_grid  # mean per latent -> sum per grid
            terms["kl"] = kl
        if active & set(DECOMPOSITION_TERMS):  # pooled only (check_config)
            marginals = None if self.slot_marginals is None else self.slot_marginals(latents)
            dataset_size = (
                None if self.dataset_size is None else max(self.dataset_size, len(latents))
            )
            parts = decompose_kl(
                latents,
                dataset_size,
                estimator=loss.decomposition_estimator,
                clamp=loss.clamp_terms,
                slot_marginals=marginals,
            )
            for name, field in DECOMPOSITION_FIELDS.items():
                terms[name] = getattr(parts, field)
                if loss.clamp_terms:
                    clamped[name] = parts.clamped[field]
            if "kl" not in terms:  # logged beside its parts; added only when loss.kl is on
                terms["kl"] = parts.kl / latents.shape[1] if loss.kl_per_latent else parts.kl
        if "posterior_entropy" in active:
            terms["posterior_entropy"] = posterior_entropy(latents)
        if "slot_diversity" in active:  # pooled only (check_config)
            terms["slot_diversity"] = -slot_average_entropy(latents)
        if "batch_diversity" in active:
            terms["batch_diversity"] = -batch_average_entropy(latents)
        if "code_usage_kl" in active:
            terms["code_usage_kl"] = self.code_usage(latents)
        if "lfq_diversity" in active:
            terms["lfq_diversity"] = entropy_diversity_loss(latents, loss.diversity_gamma)
        return terms, clamped

    def is_logging_step(self, step: int) -> bool:
        return (step + 1) % self.config.trainer.log_every == 0 or step == 0

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        step = self.global_step
        total, logs = self.train_losses(batch, step, self.is_logging_step(step))
        if self.guard is not None:
            if not self.guard.check_loss(step, total.detach(), self.last_losses):
                return None  # Lightning skips this batch's backward and optimizer step
        if logs:
            self.log_dict(logs, batch_size=len(batch))
        return {"loss": total}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient norms (after unscaling, before clipping): global and per top-level part."""
        if not self.is_logging_step(self.global_step):
            return
        norms = {}
        squares_total = 0.0
        for name, child in self.model.named_children():
            grads = [p.grad for p in child.parameters() if p.grad is not None]
            if not grads:
                continue
            squares = float(sum(g.detach().float().pow(2).sum() for g in grads))
            squares_total += squares
            norms[f"grad_norm/{name}"] = squares**0.5
        top_level = [p.grad for p in self.model.parameters(recurse=False) if p.grad is not None]
        squares_total += float(sum(g.detach().float().pow(2).sum() for g in top_level))
        norms["grad_norm/total"] = squares_total**0.5
        self.log_dict(norms)

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
        optimizer = OPTIMIZERS[optim.name](
            groups,
            lr=1.0,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            # Lightning refuses to clip the gradients of a fused optimizer under mixed precision
            fused=torch.cuda.is_available()
            and self.config.trainer.accelerator != "cpu"
            and (optim.grad_clip is None or self.config.trainer.precision == "32"),
        )
        lr = self.schedules["lr"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr(step))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class GridDVAEModule(CodeModule):
    """Trains a :class:`GridDVAE` on ARC grids."""

    def build_model(self) -> GridDVAE:
        return GridDVAE(self.config.model, eos=self.config.data.eos)

    @property
    def sizes_from_cells(self) -> bool:
        """Spatial runs that learn PAD/EOS read a grid's size off its decoded cells."""
        return self.model.spatial and self.config.loss.pad_weight > 0

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
            loss_config.stablemax,
        )
        shape = output.cell_logits.new_zeros(())
        if not self.sizes_from_cells:  # else the size is read off the decoded PAD/EOS cells
            shape = shape_cross_entropy(output.height_logits, output.width_logits, batch.shapes)
        quantizer_loss = output.encoded.quantizer.loss
        total = cells + loss_config.shape_weight * shape + quantizer_weight * quantizer_loss
        return {"total": total, "cells": cells, "shape": shape, "quantizer": quantizer_loss}

    def train_losses(
        self, batch: Batch, step: int, with_logs: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The training loss at ``step`` and, with ``with_logs``, every metric to log.

        The encoder sees ``batch`` with some cells masked (``data.mask_ratio``); the losses
        compare the decoded cells with the original tokens.
        """
        values = self.schedule_values(step)
        inputs = mask_cells(batch, self.mask_ratio(step))
        output = self(inputs, **values)
        losses = self.compute_losses(output, batch, values["quantizer_weight"])
        terms, clamped = self.add_latent_terms(output, losses, step, values)
        if not with_logs:
            return losses["total"], {}

        with torch.no_grad():
            colours, _ = predict(self.model, output, batch, self.config.loss.pad_weight)
            mask = batch.grid_mask
            accuracy = ((colours == batch.tokens) & mask).sum() / mask.sum()
        logs = self.common_logs(output, losses, terms, clamped, values, step)
        logs["train/cell_accuracy"] = accuracy
        if not schedule_is_off(self.config.data.mask_ratio):
            hidden = (inputs.tokens != batch.tokens).sum()
            logs["train/mask_fraction"] = hidden / batch.grid_mask.sum()
        return losses["total"], logs

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
