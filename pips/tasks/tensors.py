"""What tasks whose items are fixed-shape tensors share (images, sequences, and any such task).

- :class:`TensorDataModule`: training and validation tensors in memory, batched by PIPS's
  stateful sampler (seeded per epoch, sharded per rank, resumable mid-epoch); validation is split
  across ranks, each rank scoring its own share.
- :class:`AutoencoderModule`: reconstruction loss + the quantizer's loss + the latent terms, and
  validation through the task's metric and the shared code usage.
- :class:`TensorTask`: evaluate / encode / decode / write on tensors, given three hooks of the
  task (``inputs`` of a batch, the model's ``decode_codes``, the reconstruction loss).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, TensorDataset

from pips.data.loader import GridDataLoader
from pips.data.sampler import BucketBatchSampler
from pips.metrics import CodeUsage, code_metrics
from pips.quantizers.base import check_code_indices
from pips.tasks.base import Items, Task, TaskError, output_file
from pips.tasks.module import CodeModule


def stateful_loader(
    data: L.LightningDataModule,
    dataset,
    shapes: np.ndarray,
    batch_size: int,
    shuffle: bool,
    shard: bool = True,
    bucket: bool = False,
) -> GridDataLoader:
    """Batches of ``dataset`` through ``data.collate``, seeded per epoch and stateful (a run
    stopped mid-epoch resumes with the next batch); ``bucket``: grouped by ``shapes`` [N, 2].
    Under DDP training batches are sharded by the sampler and validation items split across
    ranks (rank r scores items r, r + world, ...)."""
    trainer = getattr(data, "trainer", None)
    distributed = shard and trainer is not None and trainer.world_size > 1
    sharding = {}
    indices = np.arange(len(dataset))
    if distributed and shuffle:
        sharding = {"num_replicas": trainer.world_size, "rank": trainer.global_rank}
    elif distributed:
        indices = indices[trainer.global_rank :: trainer.world_size]
        dataset = torch.utils.data.Subset(dataset, indices.tolist())
    count = len(indices)
    config = data.config
    sampler = BucketBatchSampler(
        np.asarray(shapes, dtype=np.int64)[indices],
        batch_size,
        shuffle=shuffle,
        seed=config.seed,
        bucket=bucket,
        drop_last=shuffle and count >= batch_size,
        **sharding,
    )
    workers = config.data.num_workers if shuffle else 0
    return GridDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )


class TensorDataModule(L.LightningDataModule):
    """Train/validation tensors in memory (``train_items``, ``val_items``: tuples of tensors with
    one row per item); the training order is drawn from the sampler's own seeded generator, so a
    resumed run does not depend on torch's global random stream."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task
        self.config = task.config
        self.train_items: tuple[torch.Tensor, ...] = ()
        self.val_items: tuple[torch.Tensor, ...] = ()

    def collate(self, items: list[tuple[torch.Tensor, ...]]):
        """A batch from ``(tensor, ...)`` rows; the task's batch type."""
        raise NotImplementedError

    def load(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The training and validation tensors (before ``data.max_samples``)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """What the model needs to know of the data (saved in the checkpoint)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        train, self.val_items = self.load()
        limit = self.config.data.max_samples
        self.train_items = tuple(tensor[:limit] for tensor in train) if limit else train

    @property
    def train_size(self) -> int:
        return len(self.train_items[0])

    @property
    def val_size(self) -> int:
        return len(self.val_items[0])

    def describe(self) -> str:
        return f"training on {self.train_size} {self.task.unit}, validating on {self.val_size}"

    def _loader(self, items, batch_size: int, shuffle: bool, limit: int | None = None, shard=True):
        """Batches without size buckets (see :func:`stateful_loader`)."""
        if limit is not None:
            items = tuple(tensor[:limit] for tensor in items)
        return stateful_loader(
            self, TensorDataset(*items), np.ones((len(items[0]), 2)), batch_size, shuffle, shard
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_items, self.config.data.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        data = self.config.data
        return self._loader(self.val_items, data.val_batch_size, False, data.max_val_samples)

    def final_dataloader(self) -> DataLoader:
        """Every final validation item, unsharded (rank zero evaluates after training)."""
        data = self.config.data
        limit = data.max_final_val_samples
        return self._loader(self.val_items, data.val_batch_size, False, limit, shard=False)


class AutoencoderModule(CodeModule):
    """Reconstruction loss plus the quantizer's loss and the latent terms; validation through the
    task's metric (``task.metric``) and the code usage."""

    def step_output(self, batch, values: dict[str, float]):
        """The model's forward pass on a training batch."""
        return self(self.task.inputs(batch), **values)

    def latent_loss_weight(self, step: int, values: dict[str, float]) -> tuple[str, float]:
        """The name under which the model's own latent loss is logged, and its weight now."""
        return "quantizer", values["quantizer_weight"]

    def train_losses(self, batch, step: int, with_logs: bool = False):
        values = self.schedule_values(step)
        output = self.step_output(batch, values)
        reconstruction = self.task.loss(output, batch)
        latent_loss = output.encoded.quantizer.loss
        name, weight = self.latent_loss_weight(step, values)
        losses = {
            "total": reconstruction + weight * latent_loss,
            self.task.reconstruction_loss: reconstruction,
            name: latent_loss,
        }
        terms, clamped = self.add_latent_terms(output, losses, step, values)
        if not with_logs:
            return losses["total"], {}
        logs = self.common_logs(output, losses, terms, clamped, values, step)
        with torch.no_grad():
            logs.update(self.task.train_logs(output, batch))
        return losses["total"], logs

    def new_metrics(self, **kwargs):
        return self.task.metric(**kwargs)

    def validation_step(self, batch, batch_idx: int) -> None:
        output = self(self.task.inputs(batch), **self.quantizer_values(self.global_step))
        self.update_metrics(self.val_quality, self.val_codes, output, batch)

    def update_metrics(self, quality, codes: CodeUsage, output, batch) -> None:
        self.task.update_metrics(quality, codes, output, batch)


class TensorTask(Task):
    """A task whose items are rows of tensors; subclasses give the data module, the model, the
    loss, the metric and how to turn a batch into model inputs."""

    data_class: type[TensorDataModule] = TensorDataModule
    module_class: type[AutoencoderModule] = AutoencoderModule
    shape_key = "data_shape"  # the hyper-parameter that holds the data's shape
    held_out = "the validation split"  # what evaluate scores, for its messages

    # ------------------------------------------------------------------- hooks
    def new_model(self, shape: tuple[int, ...]) -> torch.nn.Module:
        raise NotImplementedError

    def inputs(self, batch) -> torch.Tensor:
        """The model's input tensor of a batch."""
        raise NotImplementedError

    def loss(self, output, batch) -> torch.Tensor:
        """The reconstruction loss of a batch."""
        raise NotImplementedError

    def metric(self, **kwargs):
        """A fresh validation metric (torchmetrics Metric) of this task."""
        raise NotImplementedError

    def train_logs(self, output, batch) -> dict[str, torch.Tensor]:
        return {}

    def decode_codes(self, model: torch.nn.Module, indices: torch.Tensor) -> torch.Tensor:
        """Items ``[B, ...]`` from code indices ``[B, ...]``."""
        return model.decode_codes(indices)

    def reconstruct(self, output) -> torch.Tensor:
        """The reconstructed items of a forward pass (what decode gives from the codes)."""
        raise NotImplementedError

    def update_metrics(self, quality, codes: CodeUsage, output, batch) -> None:
        quality.update(output, batch, self.loss(output, batch))
        codes.update(output.encoded.quantizer.indices, output.encoded.latent_padding)

    # ------------------------------------------------------------------- the interface
    def check_data(self) -> None:
        """Build the data and the model once before a run folder is made (a missing file, a bad
        preset, a damaged archive or a model that does not fit the data is then one sentence and
        nothing is written)."""
        try:
            self.new_model(self.datamodule().shape)
        except (ValueError, OSError) as error:
            raise TaskError(str(error)) from None

    def datamodule(self) -> TensorDataModule:
        data = self.data_class(self)
        data.setup("fit")
        return data

    def module(self, data: TensorDataModule) -> AutoencoderModule:
        shape = data.shape
        return self.module_class(
            self,
            self.new_model(shape),
            data.train_size,
            {self.shape_key: [int(v) for v in shape]},
        )

    def build_model(self, hyper_parameters: dict) -> torch.nn.Module:
        if self.shape_key not in hyper_parameters:
            raise TaskError(
                f"the checkpoint does not record the data shape ({self.shape_key}) a "
                f"{self.name} model is built for; it was not written by pips train"
            )
        return self.new_model(tuple(int(v) for v in hyper_parameters[self.shape_key]))

    def score_batch(self, model, batch, quality, codes: CodeUsage) -> None:
        """Add one evaluation batch (on the model's device) to the metrics."""
        self.update_metrics(quality, codes, model(self.inputs(batch)), batch)

    @torch.no_grad()
    def score_loader(self, model, loader, device) -> dict[str, float]:
        """The task's metrics and the code usage over every batch of ``loader`` (eval mode)."""
        was_training = model.training
        model.eval()
        quality = self.metric(sync_on_compute=False).to(device)
        codes = CodeUsage(model.quantizer.codebook_size, self.slotted, sync_on_compute=False)
        codes = codes.to(device)
        for batch in loader:
            self.score_batch(model, move_data_to_device(batch, device), quality, codes)
        model.train(was_training)
        return {**quality.compute(), **code_metrics(codes, self.unit)}

    def final_metrics(self, module, data: TensorDataModule) -> tuple[dict[str, float], int]:
        """The run's own data module, not a second copy of the data."""
        loader = data.final_dataloader()
        return self.score_loader(module.model, loader, module.device), len(loader.dataset)

    def evaluate(self, model, spec, device="cpu") -> tuple[dict[str, float], int, str]:
        if spec is not None:
            raise TaskError(
                f"--data picks ARC grids; a {self.name} run is evaluated on {self.held_out} "
                f"of its own config ({self.name}.*): leave --data out"
            )
        loader = self.datamodule().final_dataloader()
        count = len(loader.dataset)
        return self.score_loader(model, loader, device), count, self.evaluation_note(count)

    def evaluation_note(self, count: int) -> str:
        return f"{count} validation {self.unit}"

    def prior_items(self) -> tuple[list, list]:
        """The run's training items and its final validation items."""
        data = self.datamodule()
        limit = self.config.data.max_final_val_samples
        val = data.val_items[0][:limit] if limit else data.val_items[0]
        return list(data.train_items[0].numpy()), list(val.numpy())

    def items(self, spec: str | None, distinct: bool = True) -> Items:
        if spec is not None:
            raise TaskError(
                f"--data picks ARC grids; a {self.name} run uses the validation split of its "
                f"own config: leave --data out"
            )
        data = self.datamodule()
        tensors = data.val_items[0]
        limit = self.config.data.max_final_val_samples
        tensors = tensors[:limit] if limit else tensors
        index = np.arange(len(tensors), dtype=np.int64)
        return Items(tensors, {"item_index": index}, f"{len(tensors)} validation {self.unit}")

    @torch.no_grad()
    def encode(self, model, items, batch_size: int = 256) -> list[np.ndarray]:
        self.require_codes(model)
        model.eval()
        device = next(model.parameters()).device
        tensors = torch.as_tensor(np.stack(items) if isinstance(items, list) else items)
        out = []
        for start in range(0, len(tensors), batch_size):
            chunk = tensors[start : start + batch_size].to(device)
            indices = model.encode(chunk).quantizer.indices  # [B, ...]
            out.extend(indices.cpu().numpy())
        return out

    @torch.no_grad()
    def decode(self, model, codes: list[np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
        self.require_codes(model)
        model.eval()
        device = next(model.parameters()).device
        arrays = [self.check_codes(model, np.asarray(c), f"item {i}") for i, c in enumerate(codes)]
        out = []
        for start in range(0, len(arrays), batch_size):
            indices = torch.as_tensor(np.stack(arrays[start : start + batch_size])).to(device)
            out.extend(self.decode_codes(model, indices.long()).cpu().numpy())
        return out

    def check_codes(self, model, codes: np.ndarray, where: str) -> np.ndarray:
        """Integer codes inside the codebook, or a :class:`TaskError` naming the problem."""
        try:
            return check_code_indices(codes, model.quantizer.codebook_size, where)
        except ValueError as error:
            raise TaskError(str(error)) from None

    def write_items(self, items: list, metadata: dict[str, np.ndarray], out: Path) -> str:
        out = output_file(out, "items.npz", ".npz")
        arrays = np.stack([np.asarray(item) for item in items]) if items else np.zeros((0,))
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, items=arrays, **metadata)
        return f"{len(items)} {self.unit} into {out}"
