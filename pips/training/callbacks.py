"""Training callbacks: a step progress bar with throughput, reconstruction pictures, and the
trajectories of the latent loss terms."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
from tqdm.auto import tqdm

from pips.data.batch import Batch, batch_to_grids
from pips.evaluation.evaluate import reconstruct
from pips.evaluation.plots import plot_curves, read_metrics, save_reconstructions


class TrainingProgress(L.Callback):
    """Counts grids and training time (validation excluded) and shows a step progress bar with
    loss, cell accuracy and grids/s."""

    def __init__(self, show_bar: bool = True):
        self.show_bar = show_bar
        self.bar = None
        self.grids = 0
        self.train_seconds = 0.0
        self._step_start = None
        self._recent_rate = None
        self._recent_loss = None

    @property
    def grids_per_second(self) -> float:
        return self.grids / self.train_seconds if self.train_seconds > 0 else 0.0

    def on_train_start(self, trainer, module) -> None:
        if self.show_bar and trainer.is_global_zero:
            interactive = sys.stderr.isatty()
            self.bar = tqdm(
                total=trainer.max_steps,
                initial=trainer.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=0.2 if interactive else 15.0,
                file=sys.stderr,
                leave=True,
            )

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_start
        self.grids += len(batch)
        self.train_seconds += elapsed
        rate = len(batch) / max(elapsed, 1e-9)
        self._recent_rate = (
            rate if self._recent_rate is None else 0.9 * self._recent_rate + 0.1 * rate
        )
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)
            metrics = trainer.callback_metrics
            loss = float(outputs["loss"])
            self._recent_loss = (
                loss if self._recent_loss is None else 0.9 * self._recent_loss + 0.1 * loss
            )
            postfix = {"loss": f"{self._recent_loss:.3f}"}  # smoothed over ~10 steps
            if "train/cell_accuracy" in metrics:
                postfix["cell_acc"] = f"{float(metrics['train/cell_accuracy']):.3f}"
            postfix["grids/s"] = f"{self._recent_rate:.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        line = (
            f"step {trainer.global_step}: val cell_accuracy "
            f"{float(metrics.get('val/cell_accuracy', float('nan'))):.4f}, grid_accuracy "
            f"{float(metrics.get('val/grid_accuracy', float('nan'))):.4f}, perplexity "
            f"{float(metrics.get('val/codebook_perplexity', float('nan'))):.1f}"
        )
        (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def on_train_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ReconstructionImages(L.Callback):
    """After a validation, at most every ``every`` steps: a PNG of validation grids, their
    reconstructions from codes, and the differing cells."""

    def __init__(self, folder: Path, every: int, batch: Batch, num_grids: int = 8):
        self.folder = Path(folder)
        self.every = every
        self.batch = batch  # the same validation grids every time
        self.num_grids = num_grids
        self.last_step = None

    def on_validation_end(self, trainer, module) -> None:
        step = trainer.global_step
        if (
            trainer.sanity_checking
            or not trainer.is_global_zero
            or self.every <= 0
            or (self.last_step is not None and step - self.last_step < self.every)
        ):
            return
        self.last_step = step
        batch = self.batch.to(module.device)
        was_training = module.training
        module.eval()
        grids = reconstruct(
            module.model, batch, module.config.loss.pad_weight, **module.schedule_values(step)
        )
        module.train(was_training)
        originals = batch_to_grids(batch.tokens, batch.shapes, batch.canvas_width)
        count = min(self.num_grids, len(originals))
        save_reconstructions(
            originals[:count],
            grids[:count],
            self.folder / f"reconstructions_step{step:07d}.png",
            title=f"step {step}",
        )


class TermCurves(L.Callback):
    """``images/loss_terms.png``: each latent term (``loss/kl``, ``loss/tc``, ...), its weight and
    the reconstruction loss against the step, read back from the run's metrics.csv. Redrawn
    after a validation at most every ``every`` steps, and when training ends."""

    PANELS = (
        ("latent terms (nats per grid; diversity terms are minus an entropy)", "loss/"),
        ("weights", "weight/"),
    )

    def __init__(self, run_dir: Path, every: int):
        self.run_dir = Path(run_dir)
        self.every = every
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
        panels.append(("reconstruction", ["train/loss_cells", "val/loss_cells"]))
        panels.append(("validation", ["val/cell_accuracy", "val/grid_accuracy"]))
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
