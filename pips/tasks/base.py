"""The Task interface: what the runner, the verbs, the callbacks and the report ask of a task.

A task (grids, images, sequences, ...) is a class registered in :data:`TASKS` under its config
name (``task: grids``). It owns its data, its model, its losses and training step (its
LightningModule), its metrics and headline metric, the unit it counts, how to draw its
reconstructions, ``encode`` / ``decode`` between items and codes, and its probe targets. Nothing
outside ``pips/tasks`` asks which task it is holding: it reads these attributes and calls these
methods. A new task is one file with one subclass and one :func:`register_task` call.

The methods that touch a trained model take the bare model (what ``build_model`` returns, with a
``quantizer``), so they serve ``pips evaluate`` on a checkpoint as well as the runner.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch

from pips.config import Config, register_task_section
from pips.models.code_tokens import CodeLayout, IndexSplit, PooledLayout
from pips.plots import html_image


class TaskError(ValueError):
    """A request a task cannot serve (a verb it has no data for, a bad probe target...); the
    message says what would work."""


@dataclass(frozen=True)
class Headline:
    """A task's headline validation metric: what picks the best checkpoints, what `pips runs`
    and `pips compare` show first."""

    metric: str  # without the val/ prefix, e.g. "cell_accuracy"
    label: str  # short, for tables: "cell acc"
    digits: int = 3
    mode: str = "max"  # "max": larger is better


@dataclass
class ProbeData:
    """What a task hands the probe: features per example, integer targets, the train/test split,
    and numbers to print beside the probe's accuracy (e.g. a Bayes-optimal accuracy)."""

    features: np.ndarray  # [E, F] float, or integer codes with ``codebook`` values each
    targets: np.ndarray  # [E]
    train: np.ndarray  # example indices
    test: np.ndarray
    codebook: int | None = None
    note: str = ""  # which items were probed
    baselines: Any = None  # callable(scores) -> dict of extra numbers, or None


@dataclass
class Items:
    """Items a verb works on: the items themselves (a list of arrays, or a tensor with one row
    per item), per-item metadata arrays saved beside their codes, and a description."""

    items: Any
    metadata: dict[str, np.ndarray]
    note: str

    def __len__(self) -> int:
        return len(self.items)


class Task:
    """Base class of every task: override what the task does differently."""

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "items"  # what one item is called in summaries: grids, images...
    section: ClassVar[type | None] = None  # the dataclass of its config section (``name.*``)
    headline: ClassVar[Headline] = Headline("loss", "loss", 4, "min")
    summary_keys: ClassVar[tuple[str, ...]] = ()  # final metrics printed at the end of a run
    progress_metrics: ClassVar[tuple[str, ...]] = ()  # printed after each validation
    reconstruction_loss: ClassVar[str] = "reconstruction"  # train/loss_<name>, val/loss_<name>
    curve_panels: ClassVar[list[tuple[str, list[str]]]] = []  # the report's task-specific curves
    probe_targets: ClassVar[tuple[str, ...]] = ()
    takes_data_spec: ClassVar[bool] = False  # True: --data names items of this task
    slotted_layouts: ClassVar[tuple[str, ...]] = ("pooled",)  # layouts whose latents are slots
    learns_codes: ClassVar[bool] = True  # False: model.* (layout, quantizer) does not apply

    def __init__(self, config: Config):
        self.config = config

    # ----------------------------------------------------------------------- training
    def datamodule(self) -> L.LightningDataModule:
        """The task's data, set up: ``train_size``, ``val_size``, ``describe()``, the loaders and
        ``final_dataloader()`` (the evaluation after training)."""
        raise NotImplementedError

    def module(self, data: L.LightningDataModule) -> L.LightningModule:
        """The LightningModule that trains the model (a :class:`pips.tasks.module.CodeModule`)."""
        raise NotImplementedError

    def build_model(self, hyper_parameters: dict) -> torch.nn.Module:
        """The bare model of a saved run, from its config and its checkpoint's hyper-parameters
        (e.g. the data shape the module saved)."""
        raise NotImplementedError

    def check_data(self) -> None:
        """Read and validate the task's data before a run folder is made; a :class:`TaskError`
        sentence names the bad file or value. (Default: the data is checked when built.)"""

    def depends_on(self) -> dict:
        """Other runs this run is built on (a prior's tokenizer), for ``run_info.json``."""
        return {}

    def model_description(self) -> str:
        """One phrase for the start-up line and the report: layout and quantizer."""
        model = self.config.model
        return f"layout {model.layout}, quantizer {model.quantizer.kind}"

    @property
    def slotted(self) -> bool:
        """True when latent n means the same slot in every item (code usage counted per slot)."""
        return self.config.model.layout in self.slotted_layouts

    def reconstruction_callback(
        self, data: L.LightningDataModule, run_dir: Path
    ) -> L.Callback | None:
        """A callback that draws validation items beside their reconstructions, or None."""
        return None

    def final_metrics(
        self, module: L.LightningModule, data: L.LightningDataModule
    ) -> tuple[dict[str, float], int]:
        """The evaluation after training: metrics over the final validation items, and how many."""
        metrics, count, _ = self.evaluate(module.model, None, module.device)
        return metrics, count

    @staticmethod
    def batch_elements(batch) -> float:
        """Cells, pixels or tokens in a batch (the profiler's and progress bar's throughput)."""
        return float(batch.elements)

    # ----------------------------------------------------------------------- evaluation
    def evaluate(
        self, model: torch.nn.Module, spec: str | None, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, float], int, str]:
        """Validation metrics of ``model`` (eval mode, argmax codes) on the items ``spec`` names
        (None: the run's own validation split), the number of items and a description."""
        raise NotImplementedError

    def items(self, spec: str | None, distinct: bool = True) -> Items:
        """The items ``spec`` names (None: the validation split), for encode and probe."""
        raise NotImplementedError

    def encode(self, model: torch.nn.Module, items) -> list[np.ndarray]:
        """Each item's code indices (argmax codes, eval mode), one integer array per item."""
        raise NotImplementedError

    def decode(self, model: torch.nn.Module, codes: list[np.ndarray]) -> list:
        """Items rebuilt from their codes alone; ``decode(encode(x))`` is what the model
        reconstructs. Codes that do not fit the model raise :class:`TaskError`."""
        raise NotImplementedError

    def decode_in_order(self, model: torch.nn.Module, sequences: list[list[np.ndarray]]) -> list:
        """Sequences of items' codes (a sampled document's spans, a task's grids) decoded, each
        sequence a list of items; here each item alone, as :meth:`decode`. A source whose items
        are decoded after the ones before them (an overlap text run) decodes in order."""
        items = iter(self.decode(model, [code for sequence in sequences for code in sequence]))
        return [[next(items) for _ in sequence] for sequence in sequences]

    def require_codes(self, model: torch.nn.Module) -> None:
        """encode / decode need a discrete quantizer."""
        if model.quantizer.codebook_size < 2:
            raise TaskError(
                "this model has no quantizer (model.quantizer.kind=none), so its latents are "
                "not codes; encode with a model trained with a discrete quantizer"
            )

    def check_metadata(self, metadata: dict[str, np.ndarray], count: int) -> None:
        """The per-item metadata of a codes file (what :meth:`items` saved) checked before
        :meth:`write_items` uses it; a :class:`TaskError` names the bad array."""

    def generate(
        self,
        model: torch.nn.Module,
        text: str,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[tuple[str, str]]:
        """``text`` encoded to codes and decoded back, piece by piece: (piece, reconstruction)."""
        raise TaskError(f"pips generate needs a text run; this is a {self.name} run")

    def generate_from_codes(self, model: torch.nn.Module, codes: list, *settings) -> list[str]:
        """Each code array of a codes file decoded to text."""
        raise TaskError(f"pips generate needs a text run; this is a {self.name} run")

    def interpolate(self, model: torch.nn.Module, first: str, second: str, *settings) -> list:
        """(t, text) at points between two texts' latents."""
        raise TaskError(f"pips generate needs a text run; this is a {self.name} run")

    def sample(self, model: torch.nn.Module, count: int, out: Path, **settings) -> dict:
        """Draw ``count`` items from a prior run and write them into ``out``."""
        raise TaskError(
            f"pips sample draws from a prior over codes (task prior); this is a {self.name} run: "
            f"train one with pips train configs/arc_prior.yaml prior.tokenizer=RUN"
        )

    def compress(self, model: torch.nn.Module, path: Path, out: Path) -> dict:
        """The items of ``path`` as one lossless bit string under a prior run's model."""
        raise TaskError(
            f"pips compress needs a prior over codes (task prior); this is a {self.name} run"
        )

    def decompress(self, model: torch.nn.Module, path: Path, out: Path) -> dict:
        raise TaskError(
            f"pips decompress needs the prior run that compressed the file; this is a "
            f"{self.name} run"
        )

    def write_items(self, items: list, metadata: dict[str, np.ndarray], out: Path) -> str:
        """Write decoded items to ``out`` (grids: ARC task JSON); returns a description."""
        raise NotImplementedError

    def probe(
        self, model: torch.nn.Module, target: str, features: str, spec, count, layer
    ) -> ProbeData:
        raise TaskError(f"pips probe has no targets for task {self.name}")

    # ----------------------------------------------------------------------- a prior over items
    # What task ``prior`` (pips/tasks/prior.py) asks of the task whose items it models: the items,
    # their augmentation, their own tokens (``prior.tokenizer=raw``), the layout of a tokenizer's
    # codes, the decoder's part of a two-part code, and the baselines measured beside it.

    def prior_items(self) -> tuple[list, list]:
        """The training and validation items a prior over this task's items models."""
        raise TaskError(f"a prior over {self.name} items is not supported")

    def augment_items(self, items: list, copies: int, kind: str, seed: int) -> list:
        """``copies`` versions of every item (the items themselves first), augmented as ``kind``
        says; by default the task has no augmentation and the items come once."""
        if kind == "fresh":
            raise TaskError(
                f"prior.augment=fresh draws new items from the process that made them; "
                f"{self.name} items have none (GSSM sequences do): use another prior.augment"
            )
        return list(items)

    def prior_tasks(self) -> tuple[list, list]:
        """``prior.context=task``: the training and validation tasks, each ``(task_id, pairs)``
        with ``pairs`` a list of (input, output) items, the demonstrations in order and one test
        pair last (a task with several test pairs is one entry per test pair)."""
        raise TaskError(
            f"context=task needs a task of pairs (ARC grids); {self.name} items come alone"
        )

    def prior_documents(self) -> tuple[list, list]:
        """``prior.context=document``: the training and validation documents, each a list of
        items in the order they follow each other (a text's consecutive spans)."""
        raise TaskError(
            f"context=document needs items that follow each other in documents (text spans); "
            f"{self.name} items do not"
        )

    def augment_tasks(self, tasks: list, copies: int, kind: str, seed: int) -> list:
        """``copies`` versions of every ``(task_id, pairs)`` task (the tasks themselves
        first), each version augmented by one draw shared by all of its items; by default the
        task has no augmentation and the tasks come once."""
        return list(tasks)

    def raw_layout(self, items: list) -> CodeLayout:
        """The layout of the items' own tokens (``prior.tokenizer=raw``)."""
        raise TaskError(
            f"prior.tokenizer=raw needs items made of tokens; {self.name} items are not: give "
            f"prior.tokenizer=RUN, a run that learned codes of them"
        )

    def raw_codes(self, item) -> np.ndarray:
        """An item as the values its raw layout tokenises."""
        return np.asarray(item)

    def raw_item(self, codes: np.ndarray):
        """The item whose raw codes are ``codes``."""
        return np.asarray(codes)

    def code_layout(
        self, model: torch.nn.Module, codes: list[np.ndarray], part_values: int = 2**16
    ) -> CodeLayout:
        """The token layout of ``model``'s codes (``codes``: some items' codes, as
        :meth:`encode` gives them): by default every item has codes of one shape, read slot by
        slot, each index split along the quantizer's factors into parts of at most
        ``part_values`` values."""
        shapes = {np.asarray(c).shape for c in codes}
        if len(shapes) != 1:
            raise TaskError(
                f"{self.name} codes of several shapes ({sorted(shapes)[:3]}) need a layout"
            )
        split = IndexSplit.for_quantizer(model.quantizer, part_values)
        return PooledLayout(int(np.prod(shapes.pop())), split)

    def decoder_bits(self, model: torch.nn.Module, items: list, codes: list) -> np.ndarray | None:
        """``-log2 p(item | codes)`` per item under the decoder (the second part of a two-part
        code), or None when the decoder gives no such distribution (continuous items)."""
        return None

    def decoder_bits_in_context(
        self, model: torch.nn.Module, items: list, codes: list, contexts: list
    ) -> np.ndarray | None:
        """:meth:`decoder_bits` of items each after its ``contexts`` entry (the items before it
        in its document); by default the decoder reads no context."""
        return self.decoder_bits(model, items, codes)

    def baselines(self, items: list, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Codelength baselines measured on the same items, bits per item (zlib, xz, ...);
        ``model`` is the tokenizer run's model (None for a raw prior), for a baseline it holds
        (a text VAE's frozen LM)."""
        return {}

    def baselines_in_context(
        self, items: list, contexts: list, model: torch.nn.Module | None = None
    ) -> dict[str, float]:
        """Baselines of ``items`` each after its ``contexts`` entry (the items before it in its
        document), bits per item; by default none."""
        return {}

    def sample_statistics(self, samples: list, train: list, val: list) -> dict[str, float]:
        """What a prior's samples are like: the share identical to a training item (and what
        the task can say of their distribution against the validation items)."""
        known = {np.asarray(item).tobytes() for item in train}
        same = sum(np.asarray(item).tobytes() in known for item in samples)
        return {"identical_to_training": same / max(len(samples), 1)}

    def read_items(self, path: Path) -> Items:
        """The items of one file (pips compress): ARC task JSON for grids."""
        raise TaskError(f"pips compress does not read {self.name} items")

    def encode_item(self, encoder, model: torch.nn.Module, item, codes) -> float:
        """Append ``item`` given its ``codes`` to a range coder under ``model``'s decoder (the
        second part of a two-part code); returns the bits the model spent."""
        raise TaskError(
            f"{self.name} items are not coded losslessly by their decoder (continuous values)"
        )

    def decode_item(self, decoder, model: torch.nn.Module, codes):
        """The item :meth:`encode_item` wrote, read back given its codes."""
        raise TaskError(f"{self.name} items are not coded losslessly by their decoder")

    def sample_well_formed(self, model: torch.nn.Module, codes: list, items: list) -> dict:
        """For samples decoded by ``model``: the share of code strings that decode to a
        well-formed item (by default every one does)."""
        return {"well_formed": 1.0}

    def write_samples(self, samples: list, out: Path) -> list[str]:
        """Write sampled items into the folder ``out``; returns the files written."""
        return [self.write_items(samples, {}, Path(out) / "samples")]

    def report_sections(self, model: torch.nn.Module, run_dir: Path) -> dict[str, str]:
        """The task's sections of `pips report` (HTML): by default the newest code-usage and
        reconstruction images the run wrote while training."""
        images = Path(run_dir) / "images"
        return {
            "Code usage": latest_image(images, "code_usage_step*.png")
            or "<p>No code-usage image was written (trainer.image_every=0 or no codes).</p>",
            "Reconstructions": latest_image(images, "reconstructions_step*.png")
            or "<p>No reconstruction image was written (trainer.image_every=0).</p>",
        }


def output_file(out: str | Path, default_name: str, suffix: str) -> Path:
    """Where a verb writes: ``out`` itself, ``out/default_name`` when ``out`` is a folder, with
    ``suffix`` added when ``out`` lacks it (so the printed path is the file written)."""
    out = Path(out)
    if out.is_dir():
        return out / default_name
    return out if out.suffix == suffix else out.with_name(out.name + suffix)


def latest_image(folder: Path, pattern: str) -> str | None:
    """The newest ``pattern`` PNG in ``folder`` (by step in its name) as embedded HTML."""
    files = sorted(Path(folder).glob(pattern))
    if not files:
        return None
    tag = html_image(lambda f: f.write(files[-1].read_bytes()))
    return tag + f"<p class='note'>{html.escape(files[-1].name)}</p>"


TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Add ``task`` to :data:`TASKS` (usable as a class decorator); its config section, if any,
    becomes the ``task.name.*`` keys of every config."""
    if not task.name:
        raise ValueError(f"task class {task.__name__} needs a name")
    TASKS[task.name] = task
    register_task_section(task.name, task.section)
    return task


def get_task(config: Config) -> Task:
    """The task object for ``config.task``."""
    if config.task not in TASKS:
        raise TaskError(f"config key 'task' must be one of {', '.join(TASKS)}; got {config.task!r}")
    return TASKS[config.task](config)


class PeriodicDrawing(L.Callback):
    """Draws after a validation, on rank zero, at most every ``every`` steps (0: never)."""

    def __init__(self, every: int):
        self.every = every
        self.last_step = None

    def due(self, trainer) -> bool:
        step = trainer.global_step
        if (
            trainer.sanity_checking
            or not trainer.is_global_zero
            or self.every <= 0
            or (self.last_step is not None and step - self.last_step < self.every)
        ):
            return False
        self.last_step = step
        return True
