"""What `pips train` learns codes of: ARC grids, images, or GSSM sequences (``task`` in config).

Each task supplies a LightningDataModule, a :class:`~pips.training.module.CodeModule`, an optional
callback that draws reconstructions, and the final evaluation after training. Everything else a
run does (schedules, latent terms, checkpoints, resume, signals, loggers, codebook monitoring) is
shared.

- ``images``: :func:`pips.data.images.load_images` (scikit-learn's digits offline, MNIST IDX
  files, or a folder) and :class:`~pips.models.image_ae.ImageAutoencoder` (conv or ViT backbone,
  one code per position of its code map), trained on ``images.reconstruction`` (l2, l1 or
  logit-Laplace); validation reports MSE and PSNR.
- ``sequences``: sequences sampled from a GSSM preset (or read from .npz files) and
  :class:`~pips.models.sequence_ae.SequenceAutoencoder`, trained on the tokens' cross-entropy;
  validation reports token and whole-sequence accuracy. ``pips probe RUN --target NODE`` then asks
  how much of a hidden node's state the codes carry, against the Bayes-optimal posterior.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pips.config import Config
from pips.evaluation.metrics import perplexity
from pips.losses.stablemax import stablemax_cross_entropy
from pips.training.callbacks import PeriodicDrawing
from pips.training.module import CodeModule

# ---------------------------------------------------------------------------------------------
# batches


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


@dataclass
class SequenceBatch:
    tokens: torch.Tensor  # [B, T] long

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def elements(self) -> int:
        return self.tokens.numel()


def _image_collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> ImageBatch:
    images, labels = zip(*items, strict=True)
    return ImageBatch(torch.stack(images), torch.stack(labels))


def _sequence_collate(items: list[torch.Tensor]) -> SequenceBatch:
    return SequenceBatch(torch.stack(items))


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int):
        items = tuple(tensor[index] for tensor in self.tensors)
        return items if len(items) > 1 else items[0]


class _TensorDataModule(L.LightningDataModule):
    """Train/validation tensors in memory; the training order is drawn from the module's own
    generator (seeded), so a resumed run does not depend on torch's global random stream."""

    collate = None

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.train_items: tuple[torch.Tensor, ...] = ()
        self.val_items: tuple[torch.Tensor, ...] = ()

    @property
    def train_size(self) -> int:
        return len(self.train_items[0])

    @property
    def val_size(self) -> int:
        return len(self.val_items[0])

    def _loader(self, items, batch_size: int, shuffle: bool, limit: int | None = None):
        """Batches from the grids' sampler without size buckets: seeded per epoch, sharded per
        rank under DDP, and stateful, so a run stopped mid-epoch resumes with the next batch."""
        from pips.data.loader import GridDataLoader
        from pips.data.sampler import BucketBatchSampler

        if limit is not None:
            items = tuple(tensor[:limit] for tensor in items)
        count = len(items[0])
        trainer = getattr(self, "trainer", None)
        shard = (
            {"num_replicas": trainer.world_size, "rank": trainer.global_rank}
            if shuffle and trainer is not None and trainer.world_size > 1
            else {}
        )
        sampler = BucketBatchSampler(
            np.ones((count, 2), dtype=np.int64),
            batch_size,
            shuffle=shuffle,
            seed=self.config.seed,
            bucket=False,
            drop_last=shuffle and count >= batch_size,
            **shard,
        )
        workers = self.config.data.num_workers if shuffle else 0
        return GridDataLoader(
            _Pairs(*items),
            batch_sampler=sampler,
            collate_fn=type(self).collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_items, self.config.data.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        data = self.config.data
        return self._loader(self.val_items, data.val_batch_size, False, data.max_val_samples)

    def final_dataloader(self) -> DataLoader:
        data = self.config.data
        return self._loader(self.val_items, data.val_batch_size, False, data.max_final_val_samples)


# ---------------------------------------------------------------------------------------------
# images


class ImageDataModule(_TensorDataModule):
    collate = staticmethod(_image_collate)

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        from pips.data.images import load_images

        data = load_images(self.config.images, self.config.seed)
        limit = self.config.data.max_samples
        train = data.train[:limit] if limit else data.train

        def labels(values, count):
            return values[:count] if values is not None else torch.full((count,), -1)

        self.train_items = (train, labels(data.train_labels, len(train)))
        self.val_items = (data.val, labels(data.val_labels, len(data.val)))
        self.name = data.name
        self.image_shape = (data.channels, data.image_size)

    def describe(self) -> str:
        channels, size = self.image_shape
        return (
            f"training on {self.train_size} images ({self.name}, {channels}x{size}x{size}), "
            f"validating on {self.val_size}"
        )


class CodeCounter:
    """A histogram of the code indices seen in validation ([B, N], or [B, N, levels]: the first
    level's codebook), its perplexity and how many codes were used."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.counts: torch.Tensor | None = None
        self.codes_per_item = 0

    def update(self, indices: torch.Tensor | None) -> None:
        if indices is None:
            return
        if indices.dim() == 3:
            indices = indices[..., 0]  # the first level (residual / group): one codebook
        self.codes_per_item = indices.shape[1]
        counts = torch.bincount(indices.reshape(-1).cpu(), minlength=self.codebook_size)
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self, bits_per_code: float, unit: str) -> dict[str, float]:
        if self.counts is None:
            return {
                f"bits_per_{unit}": 0.0,
                "codebook_perplexity": float("nan"),
                "codes_used": 0.0,
            }
        return {
            f"bits_per_{unit}": bits_per_code * self.codes_per_item,
            "codebook_perplexity": float(perplexity(self.counts)),
            "codes_used": float((self.counts > 0).sum()),
        }


class ImageMetrics:
    """Validation sums: squared error, per-image PSNR, pixel loss and code counts."""

    def __init__(self, codebook_size: int):
        self.squared_error = 0.0
        self.elements = 0
        self.psnr_sum = 0.0
        self.loss_sum = 0.0
        self.images = 0
        self.codes = CodeCounter(codebook_size)

    def update(self, output, batch: ImageBatch, loss: torch.Tensor) -> None:
        from pips.losses.pixels import psnr

        reconstruction = output.reconstruction.float().clamp(0, 1)
        target = batch.images.float()
        self.squared_error += float((reconstruction - target).pow(2).sum())
        self.elements += target.numel()
        self.psnr_sum += float(psnr(reconstruction, target).per_image.sum())
        self.loss_sum += float(loss) * len(batch)
        self.images += len(batch)
        self.codes.update(output.encoded.quantizer.indices)

    def compute(self, bits_per_code: float) -> dict[str, float]:
        mse = self.squared_error / max(self.elements, 1)
        metrics = {
            "mse": mse,
            "psnr": self.psnr_sum / max(self.images, 1),
            "loss_pixels": self.loss_sum / max(self.images, 1),
        }
        metrics.update(self.codes.compute(bits_per_code, "image"))
        return metrics


def _bits_per_code(model) -> float:
    bits = model.quantizer.bits_per_code
    return float(bits() if callable(bits) else bits)


class AutoencoderModule(CodeModule):
    """What the images and sequences modules share: the data's shape (kept in the checkpoint's
    hyper-parameters, so the model can be rebuilt without the data), the reconstruction loss plus
    the quantizer's loss and the latent terms, and validation through a metrics accumulator."""

    loss_name = "reconstruction"  # logged as train/loss_<name>, val/loss_<name>
    shape_key = "data_shape"
    metrics_class: type = None

    def __init__(self, config: Config, dataset_size: int | None = None, data_shape=(1, 1)):
        self.data_shape = tuple(int(v) for v in data_shape)
        super().__init__(config, dataset_size)
        self.save_hyperparameters(
            {"config": self.hparams["config"], self.shape_key: list(self.data_shape)}
        )

    def inputs(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def reconstruction_loss(self, output, batch) -> torch.Tensor:
        raise NotImplementedError

    def quality_logs(self, output, batch) -> dict[str, torch.Tensor]:
        return {}

    def train_losses(self, batch, step: int, with_logs: bool = False):
        values = self.schedule_values(step)
        output = self(self.inputs(batch), **values)
        reconstruction = self.reconstruction_loss(output, batch)
        quantizer_loss = output.encoded.quantizer.loss
        losses = {
            "total": reconstruction + values["quantizer_weight"] * quantizer_loss,
            self.loss_name: reconstruction,
            "quantizer": quantizer_loss,
        }
        terms, clamped = self.add_latent_terms(output, losses, step, values)
        if not with_logs:
            return losses["total"], {}
        logs = self.common_logs(output, losses, terms, clamped, values, step)
        with torch.no_grad():
            logs.update(self.quality_logs(output, batch))
        return losses["total"], logs

    def on_validation_epoch_start(self) -> None:
        self.val_metrics = self.metrics_class(self.model.quantizer.codebook_size)

    def validation_step(self, batch, batch_idx: int) -> None:
        output = self(self.inputs(batch), **self.schedule_values(self.global_step))
        self.val_metrics.update(output, batch, self.reconstruction_loss(output, batch))

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute(_bits_per_code(self.model))
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)


@torch.no_grad()
def evaluate_autoencoder(module: AutoencoderModule, loader: DataLoader) -> dict[str, float]:
    """The validation metrics over ``loader`` with argmax codes (eval mode)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    was_training = module.training
    module.eval()
    metrics = module.metrics_class(module.model.quantizer.codebook_size)
    values = module.schedule_values(module.global_step)
    for batch in loader:
        batch = move_data_to_device(batch, module.device)
        output = module.model(module.inputs(batch), **values)
        metrics.update(output, batch, module.reconstruction_loss(output, batch))
    module.train(was_training)
    return metrics.compute(_bits_per_code(module.model))


class ImageModule(AutoencoderModule):
    """Trains an :class:`~pips.models.image_ae.ImageAutoencoder`."""

    progress_metrics = ("psnr", "mse", "codebook_perplexity")
    loss_name = "pixels"
    shape_key = "image_shape"
    metrics_class = ImageMetrics

    def build_model(self):
        from pips.models.image_ae import ImageAutoencoder

        channels, size = self.data_shape
        return ImageAutoencoder(self.config.model, self.config.images, channels, size)

    @property
    def spatial_codes(self) -> bool:
        return True  # one code per position of the code map

    def inputs(self, batch: ImageBatch) -> torch.Tensor:
        return batch.images

    def reconstruction_loss(self, output, batch: ImageBatch) -> torch.Tensor:
        from pips.losses.pixels import pixel_loss

        return pixel_loss(self.config.images.reconstruction, output.params, batch.images)

    def quality_logs(self, output, batch: ImageBatch) -> dict[str, torch.Tensor]:
        from pips.losses.pixels import psnr

        return {"train/psnr": psnr(output.reconstruction.clamp(0, 1), batch.images).mean}


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
            output = module.model(images, **module.schedule_values(step))
        module.train(was_training)
        save_image_rows(
            [images.cpu(), output.reconstruction.clamp(0, 1).cpu()],
            self.folder / f"reconstructions_step{step:07d}.png",
            title=f"step {step}: inputs (top), reconstructions from codes (bottom)",
        )


def save_image_rows(rows: list[torch.Tensor], path: Path, title: str = "") -> None:
    """One matplotlib row per tensor of images ``[N, C, H, W]`` in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = rows[0].shape[0]
    figure, axes = plt.subplots(
        len(rows), count, figsize=(1.2 * count, 1.3 * len(rows) + 0.4), squeeze=False
    )
    for r, images in enumerate(rows):
        for c in range(count):
            image = images[c].permute(1, 2, 0).numpy()
            axis = axes[r, c]
            if image.shape[-1] == 1:
                axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# sequences


def sequence_splits(config: Config) -> tuple[dict, dict, Any]:
    """The training and validation sequences of a sequences run, and their GSSM (None when both
    come from files). Sampled sequences are seeded: ``sequences.generator_seed`` fixes the
    process, ``seed`` and ``seed + 1`` the training and validation draws."""
    from pips.data.gssm import GSSM, load_sequences

    sequences = config.sequences
    gssm = None
    if sequences.train_file is None or sequences.val_file is None:
        gssm = GSSM(sequences.preset, seed=sequences.generator_seed)

    def take(file, count, seed):
        if file is not None:
            return load_sequences(file)
        return gssm.sample(count, sequences.length, seed=seed)

    train = take(sequences.train_file, sequences.train_sequences, 2 * config.seed + 1)
    val = take(sequences.val_file, sequences.val_sequences, 2 * config.seed + 2)
    return train, val, gssm


class SequenceDataModule(_TensorDataModule):
    collate = staticmethod(_sequence_collate)

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        train, val, self.gssm = sequence_splits(self.config)
        limit = self.config.data.max_samples
        train_tokens = torch.as_tensor(np.asarray(train["observations"]), dtype=torch.long)
        val_tokens = torch.as_tensor(np.asarray(val["observations"]), dtype=torch.long)
        self.train_items = (train_tokens[:limit] if limit else train_tokens,)
        self.val_items = (val_tokens,)
        vocab = int(max(train_tokens.max(), val_tokens.max())) + 1
        if self.gssm is not None:
            vocab = max(vocab, self.gssm.nodes[self.gssm.spec.observed].states)
        self.sequence_shape = (vocab, max(train_tokens.shape[1], val_tokens.shape[1]))

    def describe(self) -> str:
        vocab, length = self.sequence_shape
        source = self.config.sequences.train_file or self.config.sequences.preset
        return (
            f"training on {self.train_size} sequences ({source}, {length} tokens of {vocab}), "
            f"validating on {self.val_size}"
        )


class SequenceMetrics:
    def __init__(self, codebook_size: int):
        self.correct = 0
        self.tokens = 0
        self.exact = 0
        self.sequences = 0
        self.loss_sum = 0.0
        self.codes = CodeCounter(codebook_size)

    def update(self, output, batch: SequenceBatch, loss: torch.Tensor) -> None:
        right = output.token_logits.argmax(-1) == batch.tokens
        self.correct += int(right.sum())
        self.tokens += right.numel()
        self.exact += int(right.all(-1).sum())
        self.sequences += len(batch)
        self.loss_sum += float(loss) * right.numel()
        self.codes.update(output.encoded.quantizer.indices)

    def compute(self, bits_per_code: float) -> dict[str, float]:
        metrics = {
            "token_accuracy": self.correct / max(self.tokens, 1),
            "sequence_accuracy": self.exact / max(self.sequences, 1),
            "loss_tokens": self.loss_sum / max(self.tokens, 1),
        }
        metrics.update(self.codes.compute(bits_per_code, "sequence"))
        return metrics


class SequenceModule(AutoencoderModule):
    """Trains a :class:`~pips.models.sequence_ae.SequenceAutoencoder` on token sequences."""

    progress_metrics = ("token_accuracy", "sequence_accuracy", "codebook_perplexity")
    loss_name = "tokens"
    shape_key = "sequence_shape"
    metrics_class = SequenceMetrics

    def build_model(self):
        from pips.models.sequence_ae import SequenceAutoencoder

        vocab, length = self.data_shape
        return SequenceAutoencoder(self.config.model, vocab, length)

    def inputs(self, batch: SequenceBatch) -> torch.Tensor:
        return batch.tokens

    def reconstruction_loss(self, output, batch: SequenceBatch) -> torch.Tensor:
        if self.config.loss.stablemax:
            logits = output.token_logits
            return stablemax_cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                batch.tokens.reshape(-1),
                label_smoothing=self.config.loss.label_smoothing,
            )
        logits = output.token_logits.float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            batch.tokens.reshape(-1),
            label_smoothing=self.config.loss.label_smoothing,
        )

    def quality_logs(self, output, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        right = output.token_logits.argmax(-1) == batch.tokens
        return {"train/token_accuracy": right.float().mean()}


# ---------------------------------------------------------------------------------------------
# the task registry used by the runner


@dataclass
class TaskParts:
    datamodule: L.LightningDataModule
    module: CodeModule
    train_size: int
    description: str
    summary_keys: tuple[str, ...]
    unit: str  # what one training item is called in summaries (grids, images, sequences)

    def reconstruction_callback(self, config: Config, run_dir: Path) -> L.Callback | None:
        every = config.trainer.image_every
        if isinstance(self.module, ImageModule):
            images = self.datamodule.val_items[0]
            picked = images[:: max(len(images) // 8, 1)][:8]
            return ImageReconstructions(run_dir / "images", every, picked)
        if isinstance(self.module, SequenceModule):
            return None
        from pips.data.batch import collate_grids
        from pips.training.callbacks import ReconstructionImages

        records = self.datamodule.val_records
        picked = records[:: max(len(records) // 8, 1)][:8]
        batch = collate_grids([record.grid for record in picked], eos=config.data.eos)
        return ReconstructionImages(run_dir / "images", every, batch)

    def final_metrics(self, config: Config) -> tuple[dict[str, float], int]:
        """The evaluation after training and the number of items it covered."""
        module, datamodule = self.module, self.datamodule
        if isinstance(module, AutoencoderModule):
            loader = datamodule.final_dataloader()
            return evaluate_autoencoder(module, loader), len(loader.dataset)
        from pips.evaluation.evaluate import evaluate

        records = datamodule.final_val_records
        metrics = evaluate(
            module.model,
            datamodule.eval_dataloader(records),
            module.device,
            config.loss.pad_weight,
            **module.schedule_values(module.global_step),
        )
        return metrics, len(records)


def build_task(config: Config) -> TaskParts:
    """The data (set up) and the module of ``config.task``."""
    if config.task == "images":
        datamodule = ImageDataModule(config)
        datamodule.setup("fit")
        module = ImageModule(config, datamodule.train_size, datamodule.image_shape)
        keys = ("psnr", "mse", "codebook_perplexity", "bits_per_image")
        return TaskParts(
            datamodule, module, datamodule.train_size, datamodule.describe(), keys, "images"
        )
    if config.task == "sequences":
        datamodule = SequenceDataModule(config)
        datamodule.setup("fit")
        module = SequenceModule(config, datamodule.train_size, datamodule.sequence_shape)
        keys = ("token_accuracy", "sequence_accuracy", "codebook_perplexity", "bits_per_sequence")
        return TaskParts(
            datamodule, module, datamodule.train_size, datamodule.describe(), keys, "sequences"
        )
    from pips.training.datamodule import GridDataModule
    from pips.training.module import GridDVAEModule

    datamodule = GridDataModule(config.data, config.seed)
    datamodule.setup("fit")
    module = GridDVAEModule(config, dataset_size=len(datamodule.train_records))
    description = (
        f"training on {len(datamodule.train_records)} grids ({config.data.source} "
        f"{config.data.train_split}), validating on {len(datamodule.val_records)} "
        f"({config.data.val_split})"
    )
    keys = ("cell_accuracy", "grid_accuracy", "codebook_perplexity", "bits_per_grid")
    return TaskParts(datamodule, module, len(datamodule.train_records), description, keys, "grids")


def build_model_for(config: Config, hyper_parameters: dict) -> torch.nn.Module:
    """The bare model of a saved run (for `pips probe`, `pips evaluate`, ...)."""
    if config.task == "images":
        from pips.models.image_ae import ImageAutoencoder

        channels, size = hyper_parameters.get("image_shape", (1, 8))
        return ImageAutoencoder(config.model, config.images, int(channels), int(size))
    if config.task == "sequences":
        from pips.models.sequence_ae import SequenceAutoencoder

        vocab, length = hyper_parameters.get("sequence_shape", (2, 2))
        return SequenceAutoencoder(config.model, int(vocab), int(length))
    from pips.models.grid_dvae import GridDVAE

    return GridDVAE(config.model, eos=config.data.eos)


__all__ = [
    "ImageBatch",
    "SequenceBatch",
    "ImageModule",
    "SequenceModule",
    "build_task",
    "build_model_for",
    "sequence_splits",
]
