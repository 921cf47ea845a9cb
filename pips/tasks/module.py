"""What every task's LightningModule shares: schedules, the latent terms of the code posteriors,
the NaN guard, gradient norms, validation metrics, the saved random streams and the optimizer.

Besides a task's reconstruction loss, optional terms of the code posteriors ``q(z|x)``
(``loss.kl``, ``loss.mi``/``tc``/``dwkl``, entropies, code usage; see
:class:`pips.config.LossConfig`) enter the loss as ``weight * term``. Each weight is a Schedule,
and a term is computed only at the steps where its weight is above 0.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import grad_norm

from pips.config import DECOMPOSITION_TERMS, LOGIT_TERMS, schedule_is_off, to_dict
from pips.losses import (
    CodeUsageKL,
    SlotMarginalEMA,
    batch_average_entropy,
    decompose_kl,
    entropy_diversity_loss,
    kl_to_uniform,
    monte_carlo_kl_to_uniform,
    posterior_entropy,
    slot_average_entropy,
)
from pips.metrics import CodeUsage, code_metrics
from pips.optim import OPTIMIZERS
from pips.quantizers.base import SCHEDULE_VALUES
from pips.schedules import Schedule

# loss.mi/tc/dwkl -> the KLDecomposition field that holds the term
DECOMPOSITION_FIELDS = {
    "mi": "mutual_information",
    "tc": "total_correlation",
    "dwkl": "dimension_wise_kl",
}


def code_statistics(output) -> dict[str, torch.Tensor]:
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
    the NaN guard, gradient-norm logs, validation metrics, the saved random streams and the
    optimizer. A task's module is given its bare ``model`` (which has a ``quantizer``) and its
    :class:`~pips.tasks.base.Task`, and defines ``train_losses`` and ``update_metrics``.
    ``dataset_size`` (the number of training items) feeds the minibatch estimator of
    ``loss.mi/tc/dwkl`` unless ``loss.dataset_size`` sets it; None treats each batch as the whole
    dataset. ``hyper_parameters`` (e.g. the data's shape) are saved beside the config, so
    ``task.build_model`` can rebuild the model from a checkpoint alone."""

    def __init__(
        self,
        task,
        model: torch.nn.Module,
        dataset_size: int | None = None,
        hyper_parameters: dict | None = None,
    ):
        super().__init__()
        config = task.config
        self.task = task
        self.config = config
        self.save_hyperparameters({"config": to_dict(config), **(hyper_parameters or {})})
        self.model = model
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
        self.dataset_size = loss.dataset_size or dataset_size
        # stateful terms are submodules, so their running averages live in the checkpoint; they
        # see a product codebook's factors as latents of k codes each
        own_quantizer = getattr(self.model, "quantizer", None)  # a code prior has none
        factors = getattr(own_quantizer, "factors", 1)
        codebook_size = getattr(own_quantizer, "factor_size", quantizer.codebook_size)
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
        # validation metrics: summed over batches and across ranks (torchmetrics states)
        self.val_quality = self.new_metrics()
        self.val_codes = (
            None if own_quantizer is None else CodeUsage(own_quantizer.codebook_size, task.slotted)
        )
        self.last_codes: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self.last_losses: dict[str, torch.Tensor] = {}  # this step's loss parts, detached
        self.guard = None  # a RunGuard (set by the runner): NaN/inf checks of the loss

    def new_metrics(self, **kwargs):
        """The task's validation metric (a torchmetrics Metric), e.g. cell accuracy."""
        raise NotImplementedError

    def update_metrics(self, quality, codes: CodeUsage, output, batch) -> None:
        """Add one validation batch's ``output`` to the task's metric and the code usage."""
        raise NotImplementedError

    @property
    def progress_metrics(self) -> tuple[str, ...]:
        return self.task.progress_metrics

    @property
    def spatial_codes(self) -> bool:
        """True when a position's latent means a place, not a slot: every slot-wise term then
        pools all latents of the batch (and padded latents are left out)."""
        return self.config.model.layout == "spatial"

    def schedule_values(self, step: int) -> dict[str, float]:
        return {name: schedule(step) for name, schedule in self.schedules.items()}

    def quantizer_values(self, step: int) -> dict[str, float]:
        """The scheduled values the model's quantizer takes (temperature, hardness, noise)."""
        return {
            name: schedule(step)
            for name, schedule in self.schedules.items()
            if name in SCHEDULE_VALUES
        }

    def forward(self, batch, **schedule_values: float):
        values = {k: v for k, v in schedule_values.items() if k in SCHEDULE_VALUES}
        return self.model(batch, **values)

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
        self, output, weights: dict[str, float], temperature: float
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

    def training_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        step = self.global_step
        total, logs = self.train_losses(batch, step, self.is_logging_step(step))
        if self.guard is not None:
            if not self.guard.check_loss(step, total.detach(), self.last_losses):
                return None  # Lightning skips this batch's backward and optimizer step
        if logs:
            self.log_dict(logs, batch_size=len(batch))
        return {"loss": total}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient norms (after unscaling, before clipping): global and per top-level part, by
        Lightning's ``grad_norm``."""
        if not self.is_logging_step(self.global_step):
            return
        norms = {}
        for name, child in self.model.named_children():
            total = grad_norm(child, norm_type=2).get("grad_2.0_norm_total")
            if total is not None:
                norms[f"grad_norm/{name}"] = float(total)
        total = grad_norm(self.model, norm_type=2).get("grad_2.0_norm_total")
        if total is not None:
            norms["grad_norm/total"] = float(total)
        self.log_dict(norms)

    # ----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_quality.reset()
        if self.val_codes is not None:
            self.val_codes.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        output = self(batch, **self.quantizer_values(self.global_step))
        self.update_metrics(self.val_quality, self.val_codes, output, batch)

    def on_validation_epoch_end(self) -> None:
        """Every rank validated its own share of the items; the metrics add them up."""
        metrics = self.val_quality.compute()
        if self.val_codes is not None:
            metrics.update(code_metrics(self.val_codes, self.task.unit))
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})

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
