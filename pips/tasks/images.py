"""Task ``images``: :func:`pips.data.images.load_images` (scikit-learn's digits offline, MNIST IDX
files, or a folder) and :class:`~pips.models.image_ae.ImageAutoencoder` (conv or ViT backbone, one
code per position of its code map), trained on ``images.reconstruction`` (l2, l1 or
logit-Laplace); validation reports MSE and PSNR (dB, per image then averaged)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

from pips.config import ImageConfig
from pips.data.images import load_images
from pips.losses.pixels import pixel_loss, psnr
from pips.models.image_ae import ImageAutoencoder
from pips.plots import save_image_rows
from pips.tasks.base import Headline, PeriodicDrawing, output_file, register_task
from pips.tasks.tensors import TensorDataModule, TensorTask


@dataclass
class ImageBatch:
    images: torch.Tensor  # [B, C, H, W] float in [0, 1]
    labels: torch.Tensor  # [B] long (-1 when the data has no labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def elements(self) -> int:
        """Pixels (times channels) in the batch, for throughput logs."""
        return self.images.numel()


class ImageDataModule(TensorDataModule):
    def collate(self, items) -> ImageBatch:
        images, labels = zip(*items, strict=True)
        return ImageBatch(torch.stack(images), torch.stack(labels))

    def load(self):
        data = load_images(self.config.images, self.config.seed)

        def labels(values, count):
            return values[:count] if values is not None else torch.full((count,), -1)

        self.name = data.name
        self.image_shape = (data.channels, data.image_size)
        train = (data.train, labels(data.train_labels, len(data.train)))
        return train, (data.val, labels(data.val_labels, len(data.val)))

    @property
    def shape(self) -> tuple[int, int]:
        return self.image_shape

    def describe(self) -> str:
        channels, size = self.image_shape
        return (
            f"training on {self.train_size} images ({self.name}, {channels}x{size}x{size}), "
            f"validating on {self.val_size}"
        )


class ImageQuality(Metric):
    """Squared error, per-image PSNR and the pixel loss, summed over images and ranks."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("squared_error", "elements", "psnr_sum", "loss_sum", "images"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, output, batch: ImageBatch, loss: torch.Tensor) -> None:
        reconstruction = output.reconstruction.float().clamp(0, 1)
        target = batch.images.float()
        self.squared_error += (reconstruction - target).pow(2).sum().double()
        self.elements += target.numel()
        self.psnr_sum += psnr(reconstruction, target).per_image.sum().double()
        self.loss_sum += loss.detach().double() * len(batch)
        self.images += len(batch)

    def compute(self) -> dict[str, float]:
        images = max(float(self.images), 1.0)
        return {
            "mse": float(self.squared_error) / max(float(self.elements), 1.0),
            "psnr": float(self.psnr_sum) / images,
            "loss_pixels": float(self.loss_sum) / images,
        }


class ImageReconstructions(PeriodicDrawing):
    """After a validation, at most every ``every`` steps: ``images/reconstructions_stepN.png``,
    a row of validation images over the row of their reconstructions from codes."""

    def __init__(self, folder: Path, every: int, images: torch.Tensor):
        super().__init__(every)
        self.folder = Path(folder)
        self.images = images  # the same validation images every time

    def on_validation_end(self, trainer, module) -> None:
        if not self.due(trainer):
            return
        step = trainer.global_step
        was_training = module.training
        module.eval()
        with torch.no_grad():
            images = self.images.to(module.device)
            output = module.model(images, **module.quantizer_values(step))
        module.train(was_training)
        save_image_rows(
            [images.cpu(), output.reconstruction.clamp(0, 1).cpu()],
            self.folder / f"reconstructions_step{step:07d}.png",
            title=f"step {step}: inputs (top), reconstructions from codes (bottom)",
        )


@register_task
class ImagesTask(TensorTask):
    name = "images"
    unit = "images"
    section = ImageConfig
    headline = Headline("psnr", "PSNR dB", 2, "max")
    summary_keys = ("psnr", "mse", "codebook_perplexity", "bits_per_image")
    progress_metrics = ("psnr", "mse", "codebook_perplexity")
    reconstruction_loss = "pixels"
    curve_panels = [
        ("loss", ["train/loss", "train/loss_pixels", "val/loss_pixels", "train/loss_quantizer"]),
        ("PSNR (dB)", ["train/psnr", "val/psnr"]),
    ]
    data_class = ImageDataModule
    shape_key = "image_shape"
    slotted_layouts = ()  # one code per position of the code map

    def new_model(self, shape) -> ImageAutoencoder:
        channels, size = shape
        return ImageAutoencoder(self.config.model, self.config.images, int(channels), int(size))

    def model_description(self) -> str:
        return (
            f"{self.config.images.backbone} backbone, quantizer {self.config.model.quantizer.kind}"
        )

    def inputs(self, batch: ImageBatch) -> torch.Tensor:
        return batch.images

    def loss(self, output, batch: ImageBatch) -> torch.Tensor:
        return pixel_loss(self.config.images.reconstruction, output.params, batch.images)

    def metric(self, **kwargs) -> ImageQuality:
        return ImageQuality(**kwargs)

    def train_logs(self, output, batch: ImageBatch) -> dict[str, torch.Tensor]:
        return {"train/psnr": psnr(output.reconstruction.clamp(0, 1), batch.images).mean}

    def reconstruction_callback(self, data: ImageDataModule, run_dir: Path):
        images = data.val_items[0]
        picked = images[:: max(len(images) // 8, 1)][:8]
        return ImageReconstructions(run_dir / "images", self.config.trainer.image_every, picked)

    def write_items(self, items: list, metadata: dict[str, np.ndarray], out: Path) -> str:
        """``out.npz`` with the images ``[N, C, H, W]`` and a PNG sheet beside it."""
        written = super().write_items(items, metadata, out)
        if items:
            sheet = output_file(out, "items.npz", ".npz").with_suffix(".png")
            images = torch.as_tensor(np.stack(items[:16])).float().clamp(0, 1)
            save_image_rows([images], sheet, title="decoded from codes")
            written += f" (and {sheet.name})"
        return written

    def write_samples(self, samples: list, out: Path) -> list[str]:
        """``samples.npz`` (the images) and ``samples.png`` (rows of 16)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        images = torch.as_tensor(np.stack(samples)).float().clamp(0, 1)
        np.savez_compressed(out / "samples.npz", items=images.numpy())
        rows = [images[i : i + 16] for i in range(0, min(len(images), 64), 16)]
        save_image_rows([r for r in rows if len(r) == len(rows[0])], out / "samples.png")
        return [str(out / "samples.npz"), str(out / "samples.png")]
