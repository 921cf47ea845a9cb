"""Training callbacks: a step progress bar with throughput, code usage over training, the
trajectories of the latent loss terms, and the run guard (signals, stops, NaN)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm.auto import tqdm

from pips.plots import plot_code_usage, plot_curves, read_metrics
from pips.training.profiling import peak_memory_mb


class TrainingProgress(L.Callback):
    """Counts items and training time (validation excluded), prints a line after each
    validation, and logs throughput at each logging step: items/s and cells (pixels, tokens)/s
    of the step, seconds waiting for data versus computing, and peak memory. ``recent_rate`` and
    ``recent_loss`` (smoothed over ~10 steps) feed the progress bar."""

    def __init__(self, log_every: int = 0, elements=None):
        self.elements = elements or (lambda batch: float(batch.elements))  # cells, pixels...
        self.log_every = log_every
        self._last_end = None
        self._data_seconds = 0.0
        self.grids = 0
        self.train_seconds = 0.0
        self._step_start = None
        self.recent_rate: float | None = None
        self.recent_loss: float | None = None

    @property
    def grids_per_second(self) -> float:
        return self.grids / self.train_seconds if self.train_seconds > 0 else 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()
        # from the end of the previous step: fetching and collating this batch (and hooks)
        self._data_seconds = 0.0 if self._last_end is None else self._step_start - self._last_end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        elapsed = now - self._step_start
        self._last_end = now
        self.grids += len(batch)
        self.train_seconds += elapsed
        step = trainer.global_step - 1  # the step that just ran
        if self.log_every and ((step + 1) % self.log_every == 0 or step == 0):
            module.log_dict(
                {
                    "perf/grids_per_second": len(batch) / max(elapsed, 1e-9),
                    "perf/cells_per_second": self.elements(batch) / max(elapsed, 1e-9),
                    "perf/step_seconds": elapsed,
                    "perf/data_seconds": self._data_seconds,
                    "perf/peak_memory_mb": peak_memory_mb(module.device),
                },
                batch_size=len(batch),
            )
        rate = len(batch) / max(elapsed, 1e-9)
        self.recent_rate = rate if self.recent_rate is None else 0.9 * self.recent_rate + 0.1 * rate
        if outputs and "loss" in outputs:  # empty: a skipped batch
            loss = float(outputs["loss"])
            self.recent_loss = (
                loss if self.recent_loss is None else 0.9 * self.recent_loss + 0.1 * loss
            )

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = []
        for name in module.progress_metrics:
            value = float(metrics.get(f"val/{name}", float("nan")))
            if name == "codebook_perplexity":
                parts.append(f"perplexity {value:.1f}")
            else:
                parts.append(f"{name} {value:.4f}")
        tqdm.write(f"step {trainer.global_step}: val " + ", ".join(parts), file=sys.stderr)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps to ``trainer.max_steps`` across epochs (and
    resumes), with the smoothed loss, the task's headline training metric and items/s; no
    validation bar (a line is printed after each validation instead)."""

    def __init__(self, throughput: TrainingProgress, metric: str, unit: str):
        super().__init__(refresh_rate=1, leave=True)
        self.throughput = throughput
        self.metric = metric  # e.g. train/cell_accuracy
        self.unit = unit

    def init_train_tqdm(self, total: int | None = None, initial: int = 0) -> Tqdm:
        interactive = sys.stderr.isatty()
        return Tqdm(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.2 if interactive else 15.0,
            file=sys.stderr,
            leave=True,
            disable=self.is_disabled,
        )

    def on_train_start(self, trainer, module) -> None:
        self.train_progress_bar = self.init_train_tqdm(trainer.max_steps, trainer.global_step)

    def on_train_epoch_start(self, trainer, *args) -> None:
        """One bar for the whole run: nothing restarts with an epoch."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or not outputs:  # empty: a skipped batch
            return
        bar.update(trainer.global_step - bar.n)
        postfix = {}
        if self.throughput.recent_loss is not None:
            postfix["loss"] = f"{self.throughput.recent_loss:.3f}"
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            postfix[self.metric.split("/", 1)[1]] = f"{float(value):.3f}"
        postfix[f"{self.unit}/s"] = f"{self.throughput.recent_rate or 0:.0f}"
        bar.set_postfix(postfix, refresh=False)

    def on_train_epoch_end(self, trainer, module) -> None:
        """The bar goes on into the next epoch."""

    def on_validation_start(self, trainer, module) -> None:
        """No validation bar."""

    def on_validation_batch_start(self, *args, **kwargs) -> None:
        pass

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_end(self, trainer, module) -> None:
        pass


class CodebookMonitor(L.Callback):
    """Code usage tracked by an exponential moving average over training steps.

    Every logging step: ``codes/usage_perplexity`` (2 ** entropy in bits of the EMA usage,
    per slot for pooled codes then averaged; per level for spatial codes), and ``codes/dead``
    (codes whose EMA share is below ``dead_share / K``, averaged over slots). Every ``every``
    steps: ``images/code_usage_stepN.png`` (ranked usage and a slot-by-code heatmap). The EMA is
    checkpointed with the callback's state. Codebooks over 65,536 codes are not tracked (FSQ
    8^8: the batch perplexity in ``quantizer/perplexity`` stays).
    """

    def __init__(
        self,
        folder: Path,
        slotted: bool,
        log_every: int,
        every: int,
        decay: float = 0.99,
        dead_share: float = 0.01,
    ):
        self.folder = Path(folder)
        self.codebook_size = 0  # the model's, at the start of training
        self.slotted = slotted
        self.log_every = log_every
        self.every = every
        self.decay = decay
        self.dead_share = dead_share
        self.usage: torch.Tensor | None = None  # [rows, K] EMA of code shares
        self.enabled = False

    def on_train_start(self, trainer, module) -> None:
        quantizer = getattr(module.model, "quantizer", None)  # a code prior has none
        self.codebook_size = int(getattr(quantizer, "codebook_size", 0) or 0)
        self.enabled = 2 <= self.codebook_size <= 65536

    def _batch_usage(self, indices: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if indices.dim() == 2:
            indices = indices.unsqueeze(-1)  # [B, N, S]
        keep = ~padding
        size = self.codebook_size
        # slotted: one row per (slot, level) [B, N*S]; else one per level over positions [M, S]
        codes = indices.flatten(1) if self.slotted else indices[keep]
        rows = codes.shape[1]
        codes = codes.clamp(0, size - 1)  # garbage indices of non-finite latents: the guard stops
        ids = codes + torch.arange(rows, device=codes.device) * size
        counts = torch.bincount(ids.reshape(-1), minlength=rows * size).view(rows, size)
        counts = counts.double().cpu()
        return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        codes = getattr(module, "last_codes", None)
        if not self.enabled or codes is None or codes[0] is None:
            return
        share = self._batch_usage(*codes)
        if self.usage is None or self.usage.shape != share.shape:
            self.usage = share
        else:
            self.usage.mul_(self.decay).add_(share, alpha=1 - self.decay)
        step = trainer.global_step - 1
        if self.log_every and ((step + 1) % self.log_every == 0 or step == 0):
            usage = self.usage / self.usage.sum(-1, keepdim=True).clamp_min(1e-12)
            entropy = -(usage * usage.clamp_min(1e-12).log2()).sum(-1)
            dead = (usage < self.dead_share / self.codebook_size).sum(-1).double()
            module.log_dict(
                {
                    "codes/usage_perplexity": float(entropy.exp2().mean()),
                    "codes/dead": float(dead.mean()),
                },
                batch_size=len(batch),
            )
        if self.every > 0 and trainer.is_global_zero and (step + 1) % self.every == 0:
            plot_code_usage(
                self.usage.numpy() * 1e6,
                self.folder / f"code_usage_step{step + 1:07d}.png",
                title=f"code usage (EMA over steps) at step {step + 1}",
            )

    def state_dict(self) -> dict:
        return {"usage": self.usage}

    def load_state_dict(self, state_dict: dict) -> None:
        self.usage = state_dict.get("usage")


class TermCurves(L.Callback):
    """``images/loss_terms.png``: each latent term (``loss/kl``, ``loss/tc``, ...), its weight and
    the reconstruction loss against the step, read back from the run's metrics.csv. Redrawn
    after a validation at most every ``every`` steps, and when training ends."""

    PANELS = (
        ("latent terms (nats per grid; diversity terms are minus an entropy)", "loss/"),
        ("weights", "weight/"),
    )

    def __init__(self, run_dir: Path, every: int, reconstruction_loss: str = "cells"):
        self.run_dir = Path(run_dir)
        self.every = every
        self.reconstruction_loss = reconstruction_loss  # the task's: cells, pixels, tokens...
        self.last_step = None

    def draw(self, trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        series = read_metrics(self.run_dir / "metrics.csv")
        panels = [
            (
                title,
                sorted(
                    key
                    for key in series
                    if key.startswith(prefix)
                    and key not in ("loss/total",)
                    and not key.startswith("loss/clamped_")
                ),
            )
            for title, prefix in self.PANELS
        ]
        reconstruction = sorted(
            key
            for key in series
            if key.startswith(("train/loss_", "val/loss_"))
            and key.split("loss_")[1] == self.reconstruction_loss
        )
        panels.append(("reconstruction", reconstruction))
        names = trainer.lightning_module.progress_metrics
        panels.append(
            ("validation", [f"val/{name}" for name in names if name != "codebook_perplexity"])
        )
        plot_curves(
            series,
            panels,
            self.run_dir / "images" / "loss_terms.png",
            title=f"{self.run_dir.name}: loss terms up to step {trainer.global_step}",
        )

    def on_validation_end(self, trainer, module) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or not trainer.is_global_zero or self.every <= 0:
            return
        if self.last_step is not None and step - self.last_step < self.every:
            return
        self.last_step = step
        self.draw(trainer)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.draw(trainer)


class NonFiniteLoss(RuntimeError):
    """A NaN or inf training loss; the message names the step and the last finite terms."""


class RunGuard(L.Callback):
    """Stops a run cleanly and keeps what it made.

    - A signal in ``signals`` (SIGINT, SIGTERM, and e.g. SIGUSR1 for SLURM pre-emption) asks the
      run to stop after the current step: ``checkpoints/last.ckpt`` is written (atomically) and
      fit returns; a second SIGINT raises RunInterrupted at once.
    - ``stop_at_step``: the same stop at a given step, schedules unchanged.
    - ``checkpoint_every``: ``last.ckpt`` every N steps as well (ModelCheckpoint writes it at
      each validation), and at the end of training when no validation fell on the last step.
    - A NaN or inf loss: the batch is skipped (no backward, no optimizer step) up to
      ``skip_nonfinite`` times; after that the run raises :class:`NonFiniteLoss` naming the step
      and the last finite loss terms, and no checkpoint is written over the last good one.
    """

    def __init__(
        self,
        checkpoint: Path,
        signals: list[str],
        stop_at_step: int | None = None,
        skip_nonfinite: int = 0,
        checkpoint_every: int | None = None,
    ):
        self.checkpoint = Path(checkpoint)
        self.signals = [getattr(signal, name) for name in signals]
        self.stop_at_step = stop_at_step
        self.skip_nonfinite = skip_nonfinite
        self.checkpoint_every = checkpoint_every
        self.skipped = 0
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self.saved_at: int | None = None  # the step of the last checkpoint written
        self.last_finite: dict[str, object] = {}  # step and the loss terms of the last finite step
        self._previous: dict[int, object] = {}

    # ---------------------------------------------------------------------------- signals
    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            from pips.training.signals import RunInterrupted

            # the second Ctrl-C: now (not KeyboardInterrupt, which Lightning makes an exit 1)
            raise RunInterrupted(name, "at once on a second Ctrl-C, mid-step")
        self.requested = name
        print(
            f"\n{name}: stopping after this step and saving {self.checkpoint} "
            f"(press Ctrl-C again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer, module) -> None:
        # after Lightning's own handlers (registered between on_fit_start and on_train_start),
        # which would turn SIGTERM into an exception
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)

    def on_fit_end(self, trainer, module) -> None:
        self.restore()

    def on_exception(self, trainer, module, exception) -> None:
        self.restore()

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    # ---------------------------------------------------------------------------- stopping
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.stopped_at is not None:
            return
        reached = self.stop_at_step is not None and step >= self.stop_at_step
        if self.requested or reached:
            trainer.should_stop = True
            self._save_in_batch(trainer)
            self.stopped_at = step
        elif self.checkpoint_every and step > 0 and step % self.checkpoint_every == 0:
            self._save_in_batch(trainer)

    def _save_in_batch(self, trainer) -> None:
        # Lightning counts this step into its logging step only after on_train_batch_end, and a
        # checkpoint saved here would resume with metrics logged one step behind: count it now
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._batches_that_stepped += 1
        try:
            trainer.save_checkpoint(self.checkpoint)
        finally:
            epoch_loop._batches_that_stepped -= 1

    def on_train_end(self, trainer, module) -> None:
        """The final step is checkpointed too, so a later `pips resume` with more steps
        continues from where training ended. Also when a validation fell on the last step:
        Lightning's ModelCheckpoint does not always save there (a run of 10 steps validated at
        5 and 10 kept last.ckpt of step 5)."""
        step = trainer.global_step
        if self.stopped_at is not None or step == 0 or self.saved_at == step:
            return
        trainer.save_checkpoint(self.checkpoint)

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.saved_at = trainer.global_step  # any checkpoint of this step (last.ckpt or best)

    # ---------------------------------------------------------------------------- NaN / inf
    def check_loss(self, step: int, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> bool:
        """True when the loss can be used; False to skip the batch; raises after the budget.

        ``terms`` (detached tensors) are kept as they are and read only for the error message,
        so a finite step costs one device sync (the isfinite check), not one per term."""
        if bool(torch.isfinite(total)):
            self.last_finite = {"step": step, **terms}
            return True
        if self.skipped < self.skip_nonfinite:
            self.skipped += 1
            print(
                f"step {step}: loss is {float(total)}; skipping this batch "
                f"({self.skipped} of trainer.skip_nonfinite={self.skip_nonfinite})",
                file=sys.stderr,
            )
            return False
        last = self.last_finite
        where = (
            f"the last finite loss was at step {last['step']}: "
            + ", ".join(f"{k}={float(v):.4g}" for k, v in last.items() if k != "step")
            if last
            else "no step had a finite loss"
        )
        raise NonFiniteLoss(
            f"the training loss became {float(total)} at step {step} ({where}); the last good "
            f"checkpoint is kept. Lower optim.lr, set optim.grad_clip, or let the run skip such "
            f"batches with trainer.skip_nonfinite=N"
        )
