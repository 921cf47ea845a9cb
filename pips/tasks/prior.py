"""Task ``prior``: stage 2, an autoregressive prior over another run's codes (or over the items'
own tokens), trained with teacher-forced cross-entropy; what it measures is a codelength.

- ``prior.tokenizer=RUN``: the tokenizer run's training and validation items (its own task and
  data sections decide which) are encoded once with its ``encode`` and cached in
  ``RUN/prior_cache/`` under a key of the tokenizer's checkpoint bytes and the augmentation, so a
  second prior over the same tokenizer does not encode again. The tokens follow
  :mod:`pips.models.code_tokens` (size first, raster order, an end token; large indices split
  along the quantizer's factors).
- ``prior.tokenizer=raw``: the same prior over the items' own tokens (ARC: the grid's size, then
  its cells in raster order, then an end token; GSSM: the observations), the no-tokenizer
  baseline; ``prior.source`` names the task whose items they are, read from this run's own
  section of it (``grids.*``, ``sequences.*``).

What one sequence is, ``prior.context``:

- ``item`` (the default): one item, ``[BOS, item]``.
- ``task``: a whole ARC task, a world model over tasks in code space:
  ``[BOS, in_1, SEP_IO, out_1, SEP_PAIR, in_2, SEP_IO, out_2, ..., in_test, SEP_IO, out_test]``,
  every grid as its token row of the same layout as ``item`` (its codes, or its raw cells), the
  separators the condition ids ``V + 1`` (after an input) and ``V + 2`` (after an output). A task
  with several test pairs is one sequence per test pair, the other test pairs left out. Trained
  on the source's training tasks (``grids.train_split``, ``prior.max_tasks`` of them), validated
  on its validation tasks (``grids.val_split``; ``data.max_final_val_samples`` of them, the
  periodic validation ``data.max_val_samples``); ``data.max_samples`` does not apply. The loss
  is the cross-entropy of every grid token (inputs and outputs; separators carry none, forced
  tokens cost 0). A task longer than ``prior.max_tokens`` positions drops its earliest
  demonstration pairs until it fits; the test pair is never dropped (alone, it is kept whole
  even when longer). With ``prior.drop_demonstrations = p`` a training sequence becomes
  ``[BOS, in_test, SEP_IO, out_test]`` with probability ``p`` (drawn per batch, seeded), what
  ``prior.guidance`` mixes in at solving (classifier-free guidance).

Augmentation happens before encoding and is precomputed: ``prior.augment_copies`` versions of
every training item (the item itself first; then, for ARC, a random D4 element and colour
permutation each; with ``context=task`` one draw per task version, the same for all its grids)
are encoded once. On a CPU the tokenizer's forward pass costs more than the prior's step, so
encoding on the fly would spend most of a run on the tokenizer; a fixed pool of copies gives
most of augmentation's effect at no cost per step.

Validation and ``pips evaluate``, in bits per item: ``prior_bits = -log2 p(codes)``,
``decoder_bits = -log2 p(item | codes)`` under the tokenizer's decoder (grids, sequences),
``codelength_bits`` their sum (a real two-part lossless code, `pips compress` writes it),
``uniform_code_bits`` the code string's capacity, and beside them, on the same items, the
task's baselines (ARC: zlib -9 per grid, xz -9e over the set, order-0 entropy; GSSM: the exact
``-log2 p(x)`` of each sequence under its own process).

With ``context=task`` the item is a validation task's test output, given its context:
``prior_bits = test_output_bits`` are the bits of the test output given the demonstrations and
the test input, ``test_output_bits_alone`` those of the same output as a one-grid sequence
(``[BOS, out_test]``), ``demonstration_gain_bits`` their difference; ``bits_per_token`` and
``uniform_code_bits`` are of the test outputs, ``sequence_bits_per_token`` of every grid token
(the training loss), ``output_equals_input`` the share of test pairs whose output's tokens are
the input's; ``decoder_bits``, ``codelength_bits`` and the baselines are of the test outputs.
After training and in ``pips evaluate`` (never in the periodic validation), the solve rates:
``solve_rate_greedy`` (the test output decoded greedily after its prefix, decoded to a grid by
the tokenizer, or read off, and compared exactly with the true grid), ``solve_rate_best_of_k``
(``prior.solve_samples`` samples at temperature 1, the one the prior finds likeliest compared),
``predicted_equals_input`` (the share of greedy predictions whose tokens are the test input's),
with a tokenizer ``solve_rate_ceiling`` (the share of test outputs its own codes decode back
to), and in ``pips evaluate`` ``train_solve_rate_greedy`` on at most 100 training tasks (their
own, unaugmented test pairs: memorisation).

With ``context=document`` (a text tokenizer, ``task: text``, or raw text) a sequence is
consecutive spans of one document, ``[BOS, s_1, SEP, s_2, ..., SEP, s_k]`` (``SEP`` the
condition id ``V + 1``), at most ``prior.document_spans`` spans: a latent next-span model.
Training sequences are windows of that many spans starting every half window, the loss on every
span token; each validation span (``data.max_final_val_samples`` of them, whole documents in
order) is one sequence ending with it after the spans before it. ``prior_bits`` are its bits
given those spans, ``prior_bits_alone`` as ``[BOS, span]``, ``context_gain_bits`` their
difference; ``decoder_bits``, ``codelength_bits`` and the baselines are of the same spans, with
the source's ``lm_bits_in_context`` (the frozen LM after the text of the same spans before it)
and ``lm_bits_after_previous`` (after the one span before it) beside ``lm_bits`` (after BOS
alone). With a ``text.mode=overlap`` tokenizer the decoder's bits are of each span after the
previous span's text (``Task.decoder_bits_in_context``), and a sampled document's spans are
decoded in order, each after the one decoded before it (``Task.decode_in_order``).

The three contexts are three :class:`Sequences` (:class:`ItemSequences`, :class:`TaskSequences`,
:class:`DocumentSequences`):
what the data module builds, how a batch is collated, the loss, the validation metric and the
final measurement; the module and the task call the same methods whichever context.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import constriction
import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchmetrics import Metric

from pips.config import option
from pips.data.arc import spread_evenly
from pips.data.text import first_items
from pips.models.code_tokens import CodeLayout, layout_from_spec, layout_spec
from pips.models.prior import CodePrior
from pips.models.range_coding import decode_codes, encode_codes
from pips.tasks.base import (
    TASKS,
    Headline,
    Task,
    TaskError,
    get_task,
    latest_image,
    register_task,
)
from pips.tasks.checkpoint_io import atomic_write, file_sha256
from pips.tasks.checkpoints import (
    CheckpointError,
    find_checkpoint,
    load_model,
    read_json_record,
)
from pips.tasks.module import CodeModule
from pips.tasks.tensors import stateful_loader

AUGMENTATIONS = ("none", "dihedral", "colours", "dihedral+colours", "fresh")
CONTEXTS = ("item", "task", "document")
MEMORISATION_TASKS = 100  # training tasks whose test pairs `pips evaluate` solves


@dataclass
class PriorConfig:
    tokenizer: str = option(
        "raw",
        "raw: the items' own tokens; else a run folder (or .ckpt) whose codes the prior models",
    )
    source: str = option(
        "grids", "tokenizer=raw: the task whose items are modelled (its own config section)"
    )
    context: str = option(
        "item",
        "item: a sequence is one item; task: a whole ARC task (its pairs' grids with "
        "separators, one test pair last), a world model over tasks; document: consecutive "
        "spans of one text, a next-span model",
        CONTEXTS,
    )
    width: int = option(128, "transformer width", min=8)
    depth: int = option(4, "transformer blocks", min=1)
    heads: int = option(4, "attention heads", min=1)
    mlp_ratio: float = option(4.0, "SwiGLU hidden width over the model width", min=0.5)
    dropout: float = option(0.0, "dropout in the blocks", min=0, max=1)
    coordinates: bool = option(
        True, "add learned (row, column, part) embeddings of each code token's place"
    )
    part_values: int = option(
        2**16,
        "the most values one token takes: a larger code index is split along its quantizer's "
        "factors into parts of at most this many (FSQ 8^8 at 64: four tokens of two channels)",
        min=2,
    )
    augment: str = option(
        "dihedral+colours",
        "augmentation of the training items before encoding: ARC grids dihedral and/or colours; "
        "fresh: new draws of the process that made the items (GSSM sequences)",
        AUGMENTATIONS,
    )
    augment_copies: int = option(
        8, "versions of every training item encoded once (the item itself first)", min=1
    )
    max_tokens: int = option(
        4096,
        "context=task: the most positions of a sequence; a longer task drops its earliest "
        "demonstration pairs until it fits (never the test pair)",
        min=8,
    )
    document_spans: int = option(
        8,
        "context=document: the most consecutive spans one sequence holds; a span is scored "
        "after at most this many minus one spans before it",
        min=1,
    )
    max_tasks: int | None = option(
        None, "context=task: at most this many training tasks (spread over the split)", min=1
    )
    solve_samples: int = option(
        8,
        "context=task: samples of each test output (temperature 1) behind solve_rate_best_of_k "
        "(0: greedy only)",
        min=0,
    )
    drop_demonstrations: float = option(
        0.0,
        "context=task: the chance that a training sequence loses its demonstrations ([BOS, "
        "in_test, SEP_IO, out_test]), for classifier-free guidance",
        min=0,
        max=1,
    )
    guidance: float | None = option(
        None,
        "context=task: solve with classifier-free guidance of this scale against the stream "
        "[BOS, in_test, SEP_IO] (train with prior.drop_demonstrations > 0)",
    )


def _atomic_savez(path: Path, **arrays) -> None:
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def _flatten(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return flat, np.concatenate([[0], np.cumsum(lengths)])


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def items_digest(items: list) -> str:
    """A SHA-256 of the items in order (their values, shapes and dtypes): a cache of their codes
    is only reused for the very same items."""
    digest = hashlib.sha256()
    for item in items:
        array = np.ascontiguousarray(np.asarray(item))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class Tokenizer:
    """What a prior models: the source task, its items, and the map items <-> token rows
    (through a tokenizer run's codes, or the items' own tokens)."""

    def __init__(self, config):
        prior = config.prior
        self.config = config
        self.path = prior.tokenizer
        self.model = None
        self.checkpoint: Path | None = None
        if prior.tokenizer == "raw":
            if prior.source not in TASKS or prior.source == "prior":
                raise TaskError(
                    f"prior.source must be the task whose items are modelled "
                    f"({', '.join(t for t in TASKS if t != 'prior')}); got {prior.source!r}"
                )
            self.source = TASKS[prior.source](config)
        else:
            try:
                self.checkpoint = find_checkpoint(prior.tokenizer)
                loaded = load_model(self.checkpoint)
            except CheckpointError as error:
                raise TaskError(f"prior.tokenizer: {error}") from None
            if loaded.config.task == "prior":
                raise TaskError(
                    f"prior.tokenizer={prior.tokenizer} is a prior run; give the run whose codes "
                    f"the prior models (a grids, images or sequences run)"
                )
            self.model = loaded.model
            self.source = get_task(loaded.config)
            self.source.require_codes(self.model)
        self.code_shape: tuple[int, ...] | None = None

    @property
    def raw(self) -> bool:
        return self.model is None

    def describe(self) -> str:
        return "the items' own tokens" if self.raw else f"the codes of {self.path}"

    def codes(self, items: list) -> list[np.ndarray]:
        if self.raw:
            return [self.source.raw_codes(item) for item in items]
        return [np.asarray(c) for c in self.source.encode(self.model, items)]

    def layout(self, codes: list[np.ndarray]) -> CodeLayout:
        shapes = {c.shape for c in codes}
        self.code_shape = shapes.pop() if len(shapes) == 1 else None
        if self.raw:
            return self.source.raw_layout(codes)
        return self.source.code_layout(self.model, codes, self.config.prior.part_values)

    def codes_of(self, layout: CodeLayout, rows: list) -> list[np.ndarray]:
        """Token rows -> the codes they hold (in the shape the tokenizer gives them)."""
        codes = []
        for row in rows:
            code = layout.codes(np.asarray(row))
            if self.code_shape is not None and code.size == math.prod(self.code_shape):
                code = code.reshape(self.code_shape)
            codes.append(code)
        return codes

    def items_of(self, layout: CodeLayout, rows: list) -> tuple[list, list[np.ndarray]]:
        """Token rows -> (items, their codes): decoded by the tokenizer, or read off."""
        codes = self.codes_of(layout, rows)
        if self.raw:
            return [self.source.raw_item(c) for c in codes], codes
        return list(self.source.decode(self.model, codes)), codes

    def samples_of(self, layout: CodeLayout, samples: list[list]) -> tuple[list, list]:
        """Each sample's token rows -> (items, codes), both flat in the samples' order; the
        source decodes a sample's items in order (:meth:`Task.decode_in_order`: a text span
        after the one decoded before it, for an overlap tokenizer)."""
        codes = [self.codes_of(layout, rows) for rows in samples]
        if self.raw:
            items = [[self.source.raw_item(c) for c in sample] for sample in codes]
        else:
            items = self.source.decode_in_order(self.model, codes)
        return [i for sample in items for i in sample], [c for sample in codes for c in sample]

    def items_or_none(self, layout: CodeLayout, rows: list) -> list:
        """Token rows -> items, None for a row the tokenizer cannot decode."""
        try:
            return self.items_of(layout, rows)[0]
        except (TaskError, ValueError):
            if len(rows) == 1:
                return [None]
        return [item for row in rows for item in self.items_or_none(layout, [row])]

    def cache_key(self, copies: int, augment: str, seed: int, extra: tuple = ()) -> str:
        settings = json.dumps(
            [
                file_sha256(self.checkpoint),
                copies,
                augment,
                seed,
                self.config.data.max_samples,
                self.config.data.max_final_val_samples,
                self.config.prior.part_values,
                *extra,
            ]
        )
        return hashlib.sha256(settings.encode()).hexdigest()[:20]


class PriorData(L.LightningDataModule):
    """Token rows of the training items (augmented copies) and validation items, in memory,
    batched in length buckets by PIPS's stateful sampler (seeded, resumable mid-epoch); the
    prior's context (:class:`Sequences`) builds and collates them."""

    def __init__(self, task: PriorTask, layout_override: dict | None = None):
        super().__init__()
        self.task = task
        self.sequences: Sequences = task.sequences
        self.config = task.config
        self.layout_override = layout_override
        self.train_rows: list = []
        self.val_rows: list = []

    def setup(self, stage: str | None = None) -> None:
        if self.val_rows:
            return
        self.tokenizer = Tokenizer(self.config)
        self.sequences.build(self)
        if self.layout_override is not None and layout_spec(self.layout) != self.layout_override:
            raise TaskError(
                "the tokenizer's codes no longer fit the layout this prior was trained on; "
                "was prior.tokenizer retrained or replaced?"
            )

    def new_layout(self, codes: list[np.ndarray]) -> CodeLayout:
        """The layout a checkpoint recorded, else the one the codes need."""
        if self.layout_override:
            return layout_from_spec(self.layout_override)
        return self.tokenizer.layout(codes)

    def cache_file(self, copies: int, extra: tuple = ()) -> Path | None:
        """Where a tokenizer's encoded rows are cached (None: raw tokens, nothing to cache)."""
        tokenizer = self.tokenizer
        if tokenizer.raw:
            return None
        run = tokenizer.checkpoint.parent
        run = run.parent if run.name == "checkpoints" else run
        key = tokenizer.cache_key(copies, self.config.prior.augment, self.config.seed, extra)
        return run / "prior_cache" / f"tokens-{key}.npz"

    @property
    def train_size(self) -> int:
        return len(self.train_rows)

    @property
    def val_size(self) -> int:
        return len(self.val_rows)

    def describe(self) -> str:
        return self.sequences.describe(self)

    def collate(self, rows: list):
        return self.sequences.collate(self, rows)

    def _loader(self, rows, batch_size: int, shuffle: bool, shard=True, dataset=None):
        """Rows in buckets of similar length (less padding), seeded and resumable."""
        lengths = np.array([[len(r), 1] for r in rows], dtype=np.int64).reshape(-1, 2)
        dataset = rows if dataset is None else dataset
        return stateful_loader(self, dataset, lengths, batch_size, shuffle, shard, bucket=True)

    def train_dataloader(self):
        dataset = self.sequences.train_dataset(self)
        return self._loader(self.train_rows, self.config.data.batch_size, True, dataset=dataset)

    def val_dataloader(self):
        data = self.config.data
        rows = spread_evenly(self.val_rows, data.max_val_samples)  # across all tasks
        return self._loader(rows, data.val_batch_size, False)

    def final_dataloader(self):
        """Every validation item (data.max_final_val_samples already chose them)."""
        return self._loader(self.val_rows, self.config.data.val_batch_size, False, shard=False)


class Sequences:
    """What a prior's context decides: the rows the data module holds, their batches, the
    training loss, the validation metric and the measurement after training."""

    condition_vocab = 0  # separator ids after the layout's and BOS
    label = ""  # what the model description adds

    def unit(self, data: PriorData) -> str:
        """What one validation row is called."""
        return data.tokenizer.source.unit

    def build(self, data: PriorData) -> None:
        """Fill ``data``: ``layout``, ``train_rows``, ``val_rows``, ``train_items``,
        ``val_items`` (for sample statistics)."""
        raise NotImplementedError

    def describe(self, data: PriorData) -> str:
        raise NotImplementedError

    def train_dataset(self, data: PriorData):
        """What the training loader draws from (by default the rows themselves)."""
        return data.train_rows

    def collate(self, data: PriorData, rows: list):
        raise NotImplementedError

    def loss(self, prior: CodePrior, batch) -> torch.Tensor:
        """Nats per real token of the batch (scalar), the training loss."""
        raise NotImplementedError

    def new_metrics(self, **kwargs) -> Metric:
        raise NotImplementedError

    def score(self, prior: CodePrior, batch, quality: Metric) -> None:
        """Add one validation batch to ``quality``."""
        raise NotImplementedError

    def measure(
        self, prior: CodePrior, data: PriorData, device, memorisation: bool = False
    ) -> dict[str, float]:
        """The final metrics over every final validation row (``memorisation``: `pips
        evaluate`, which may add what it costs more to measure on training rows)."""
        raise NotImplementedError

    @torch.no_grad()
    def final_quality(self, prior: CodePrior, data: PriorData, device) -> dict[str, float]:
        """The validation metric over every final validation row (the caller sets the mode)."""
        quality = self.new_metrics(sync_on_compute=False).to(device)
        for batch in data.final_dataloader():
            self.score(prior, move_data_to_device(batch, device), quality)
        return quality.compute()

    @torch.no_grad()
    def sample_rows(
        self, prior: CodePrior, data: PriorData, count: int, generator, batch_size=64, **drawing
    ):
        """``count`` samples, each a list of token rows (one per item it holds; here one
        item each, drawn after BOS, ``batch_size`` at once). ``drawing``: temperature, top_k,
        top_p."""
        rows = []
        for start in range(0, count, batch_size):
            tokens = prior.sample(min(batch_size, count - start), generator=generator, **drawing)
            lengths = prior.layout.lengths(tokens)
            rows.extend([row[: int(n)].numpy()] for row, n in zip(tokens, lengths, strict=True))
        return rows

    def join(self, items: list) -> object:
        """One sample's items as what is written (here the one item)."""
        return items[0]

    def sample_unit(self, data: PriorData) -> str:
        """What one sample is called."""
        return data.tokenizer.source.unit


# ---------------------------------------------------------------------------- context=item
@dataclass
class PriorBatch:
    tokens: torch.Tensor  # [B, T] long, padded with forced tokens
    lengths: torch.Tensor  # [B] real tokens per row

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def elements(self) -> int:
        return int(self.lengths.sum())


class PriorQuality(Metric):
    """Bits of the validation items under the prior, their capacity and their tokens."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("bits", "capacity", "tokens", "items"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, bits: torch.Tensor, capacity: torch.Tensor, lengths: torch.Tensor) -> None:
        self.bits += bits.double().sum()
        self.capacity += capacity.double().sum()
        self.tokens += lengths.double().sum()
        self.items += float(len(bits))

    def compute(self) -> dict[str, float]:
        items = max(float(self.items), 1.0)
        return {
            "prior_bits": float(self.bits) / items,
            "bits_per_token": float(self.bits) / max(float(self.tokens), 1.0),
            "uniform_code_bits": float(self.capacity) / items,
        }


def score_batch(prior: CodePrior, batch: PriorBatch, quality: PriorQuality) -> torch.Tensor:
    bits = prior.bits(batch.tokens)
    quality.update(bits, prior.layout.capacity_bits(batch.tokens), batch.lengths)
    return bits


class ItemSequences(Sequences):
    """``context=item``: a sequence is one item, ``[BOS, item]``."""

    def build(self, data: PriorData) -> None:
        config, tokenizer = data.config, data.tokenizer
        prior = config.prior
        try:
            train, data.val_items = tokenizer.source.prior_items()
        except (ValueError, OSError) as error:
            raise TaskError(str(error)) from None
        limits = config.data  # this run's limits apply to the source's items too
        train = spread_evenly(train, limits.max_samples)
        data.val_items = spread_evenly(data.val_items, limits.max_final_val_samples)
        if not train or not data.val_items:
            raise TaskError(
                f"the prior needs training and validation items; got {len(train)} and "
                f"{len(data.val_items)}"
            )
        data.train_items = train
        copies = prior.augment_copies if prior.augment != "none" else 1
        cached = data.cache_file(copies, (items_digest(train + data.val_items),))
        if cached is not None and cached.is_file():
            with np.load(cached, allow_pickle=False) as saved:
                data.train_rows = _unflatten(saved["train"], saved["train_offsets"])
                data.val_rows = _unflatten(saved["val"], saved["val_offsets"])
                data.val_codes = [np.asarray(c) for c in json.loads(str(saved["val_codes"]))]
                spec = json.loads(str(saved["layout"]))
                shape = json.loads(str(saved["code_shape"]))
            tokenizer.code_shape = None if shape is None else tuple(shape)
            data.layout = layout_from_spec(spec)
            return
        augmented = tokenizer.source.augment_items(train, copies, prior.augment, config.seed)
        train_codes = tokenizer.codes(augmented)
        data.val_codes = tokenizer.codes(data.val_items)
        data.layout = data.new_layout(train_codes + data.val_codes)
        try:
            data.train_rows = [data.layout.tokens(c) for c in train_codes]
            data.val_rows = [data.layout.tokens(c) for c in data.val_codes]
        except ValueError as error:
            raise TaskError(f"the items do not fit the prior's token layout: {error}") from None
        if cached is not None:
            train_flat, train_offsets = _flatten(data.train_rows)
            val_flat, val_offsets = _flatten(data.val_rows)
            _atomic_savez(
                cached,
                train=train_flat,
                train_offsets=train_offsets,
                val=val_flat,
                val_offsets=val_offsets,
                val_codes=json.dumps([c.tolist() for c in data.val_codes]),
                layout=json.dumps(layout_spec(data.layout)),
                code_shape=json.dumps(tokenizer.code_shape),
            )

    def describe(self, data: PriorData) -> str:
        tokens = np.mean([len(r) for r in data.val_rows])
        return (
            f"training on {data.train_size} token rows ({len(data.train_items)} "
            f"{data.tokenizer.source.unit} x {data.train_size // max(len(data.train_items), 1)} "
            f"versions, {data.tokenizer.describe()}), validating on {data.val_size} "
            f"({tokens:.0f} tokens each on average, vocabulary {data.layout.vocab_size})"
        )

    def collate(self, data: PriorData, rows: list[np.ndarray]) -> PriorBatch:
        tokens = data.layout.pad(rows)
        return PriorBatch(tokens, torch.tensor([len(r) for r in rows]))

    def loss(self, prior: CodePrior, batch: PriorBatch) -> torch.Tensor:
        return -prior.log_prob(batch.tokens).sum() / batch.lengths.sum()

    def new_metrics(self, **kwargs) -> PriorQuality:
        return PriorQuality(**kwargs)

    def score(self, prior: CodePrior, batch: PriorBatch, quality: PriorQuality) -> None:
        score_batch(prior, batch, quality)

    @torch.no_grad()
    def measure(self, prior, data, device, memorisation: bool = False) -> dict[str, float]:
        """Every final validation item: prior bits, decoder bits, the codelength, and the
        source task's baselines on the same items."""
        was_training = prior.training
        prior.eval()
        metrics = self.final_quality(prior, data, device)
        prior.train(was_training)
        count = len(data.final_dataloader().dataset)
        items, codes = data.val_items[:count], data.val_codes[:count]
        return {**metrics, **_decoder_and_baselines(data.tokenizer, items, codes, metrics)}


def _decoder_and_baselines(
    tokenizer: Tokenizer, items: list, codes: list, metrics: dict, contexts: list | None = None
):
    """The decoder's part of the two-part code and the source's baselines, on ``items`` (each
    after its ``contexts`` entry, the items before it, when given: then the source's baselines
    in context too)."""
    out = {}
    source, model = tokenizer.source, tokenizer.model  # no model: a raw prior
    if tokenizer.raw:
        decoder = np.zeros(len(items))  # the tokens are the item: nothing left to code
    elif contexts is None:
        decoder = source.decoder_bits(model, items, codes)
    else:
        decoder = source.decoder_bits_in_context(model, items, codes, contexts)
    if decoder is not None:
        out["decoder_bits"] = float(np.mean(decoder))
        out["codelength_bits"] = metrics["prior_bits"] + out["decoder_bits"]
    out.update(source.baselines(items, model))
    if contexts is not None:
        out.update(source.baselines_in_context(items, contexts, model))
    return out


# ---------------------------------------------------------------------------- context=task
SEPARATOR, DEMO_INPUT, DEMO_OUTPUT, TEST_INPUT, TEST_OUTPUT = range(5)  # roles of a position
SEP_IO, SEP_PAIR = 1, 2  # separator ids past BOS: V + 1 after an input, V + 2 after an output


@dataclass
class GridFields:
    """One grid's token row and, per position, its coordinates and allowed ids."""

    tokens: np.ndarray  # [T] int32
    coordinates: np.ndarray  # [T, 3] int16
    low: np.ndarray  # [T] int32
    high: np.ndarray  # [T] int32

    def __len__(self) -> int:
        return len(self.tokens)


def grid_fields(layout: CodeLayout, rows: list[np.ndarray], chunk: int = 256) -> list[GridFields]:
    """Each grid's row with ``layout.coordinates`` and ``layout.allowed`` at its positions,
    computed in padded batches of similar length."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[GridFields | None] = [None] * len(rows)
    for start in range(0, len(order), chunk):
        chosen = order[start : start + chunk]
        tokens = layout.pad([rows[i] for i in chosen])
        positions = torch.arange(tokens.shape[1])
        low, high = (t.numpy() for t in layout.allowed(tokens, positions))
        coordinates = layout.coordinates(tokens, positions).numpy()
        for j, i in enumerate(chosen):
            n = len(rows[i])
            out[i] = GridFields(
                np.asarray(rows[i], dtype=np.int32),
                coordinates[j, :n].astype(np.int16),
                low[j, :n].astype(np.int32),
                high[j, :n].astype(np.int32),
            )
    return out


@dataclass
class TaskRow:
    """One task as a sequence, precomputed per position ``t`` (what input ``t`` predicts: the
    input is ``BOS`` at 0, else ``tokens[t - 1]``)."""

    tokens: np.ndarray  # [N] int32: grid tokens and separators (V + 1 + i)
    coordinates: np.ndarray  # [N, 3] int16: the place of token t in its grid, 0 for separators
    low: np.ndarray  # [N] int32: ids allowed at t, low <= id < high (separators: all of [0, V))
    high: np.ndarray  # [N] int32
    role: np.ndarray  # [N] int8: SEPARATOR (no loss), DEMO_INPUT, DEMO_OUTPUT, TEST_*
    test_input: int  # where the test input begins
    test_output: int  # where the test output begins
    dropped: int = 0  # demonstration pairs left out to fit prior.max_tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def suffix(self, start: int) -> TaskRow:
        """The sequence from ``start`` on (a grid's first token), as if nothing came before:
        ``suffix(test_output)`` is ``[BOS, out_test]``, ``suffix(test_input)`` the task
        without its demonstrations."""
        return TaskRow(
            self.tokens[start:],
            self.coordinates[start:],
            self.low[start:],
            self.high[start:],
            self.role[start:],
            max(self.test_input - start, 0),
            self.test_output - start,
            self.dropped,
        )

    @property
    def test_input_tokens(self) -> np.ndarray:
        return self.tokens[self.test_input : self.test_output - 1]

    @property
    def test_output_tokens(self) -> np.ndarray:
        return self.tokens[self.test_output :]


def separator(vocab: int, kind: int) -> GridFields:
    """Separator ``kind`` (the condition id ``vocab + kind``): no place, any grid id allowed."""
    return GridFields(
        np.array([vocab + kind], dtype=np.int32),
        np.zeros((1, 3), dtype=np.int16),
        np.zeros(1, dtype=np.int32),
        np.full(1, vocab, dtype=np.int32),
    )


def join_fields(
    pieces: list[tuple[GridFields, int]], test_input: int, test_output: int, dropped: int = 0
) -> TaskRow:
    """A :class:`TaskRow` of ``(fields, role)`` pieces in order."""
    return TaskRow(
        np.concatenate([p.tokens for p, _ in pieces]),
        np.concatenate([p.coordinates for p, _ in pieces]),
        np.concatenate([p.low for p, _ in pieces]),
        np.concatenate([p.high for p, _ in pieces]),
        np.concatenate([np.full(len(p), role, dtype=np.int8) for p, role in pieces]),
        test_input,
        test_output,
        dropped,
    )


def task_row(pairs: list[tuple[GridFields, GridFields]], vocab: int, max_tokens: int) -> TaskRow:
    """``[in_1, SEP_IO, out_1, SEP_PAIR, ..., in_test, SEP_IO, out_test]`` of (input, output)
    grids, the test pair last; the earliest demonstrations dropped while it is longer than
    ``max_tokens`` (the test pair never)."""
    dropped = 0
    while len(pairs) > 1 and sum(len(a) + len(b) + 2 for a, b in pairs) - 1 > max_tokens:
        pairs, dropped = pairs[1:], dropped + 1

    pieces: list[tuple[GridFields, int]] = []
    length = test_input = test_output = 0
    for index, (grid_in, grid_out) in enumerate(pairs):
        test = index == len(pairs) - 1
        if index:
            pieces.append((separator(vocab, SEP_PAIR), SEPARATOR))
            length += 1
        test_input = length
        pieces.append((grid_in, TEST_INPUT if test else DEMO_INPUT))
        pieces.append((separator(vocab, SEP_IO), SEPARATOR))
        length += len(grid_in) + 1
        test_output = length
        pieces.append((grid_out, TEST_OUTPUT if test else DEMO_OUTPUT))
        length += len(grid_out)
    return join_fields(pieces, test_input, test_output, dropped)


def document_row(spans: list[GridFields], vocab: int) -> TaskRow:
    """``[span_1, SEP, span_2, SEP, ..., span_k]``: the spans before the last are context
    (``DEMO_OUTPUT``, scored in training), the last is the one measured (``TEST_OUTPUT``)."""
    pieces: list[tuple[GridFields, int]] = []
    for index, span in enumerate(spans):
        if index:
            pieces.append((separator(vocab, SEP_IO), SEPARATOR))
        pieces.append((span, TEST_OUTPUT if index == len(spans) - 1 else DEMO_OUTPUT))
    last = sum(len(p) for p, _ in pieces) - len(spans[-1])
    return join_fields(pieces, last, last)


@dataclass
class SequenceBatch:
    """Task sequences, right-padded, with what the loss needs at every position."""

    inputs: torch.Tensor  # [B, L] long: BOS, then the tokens but the last
    coordinates: torch.Tensor  # [B, L, 3] long: of the token each input predicts
    low: torch.Tensor  # [B, L] long
    high: torch.Tensor  # [B, L] long
    targets: torch.Tensor  # [B, L] long: the grid tokens (0 at separators and padding)
    role: torch.Tensor  # [B, L] long (SEPARATOR at padding)
    same: torch.Tensor  # [B] float: the test output's tokens are the test input's
    alone: SequenceBatch | None = None  # the test outputs as [BOS, out_test] (scoring)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def elements(self) -> int:
        return int((self.role > 0).sum())

    def log_probs(self, prior: CodePrior) -> torch.Tensor:
        return prior.sequence_log_probs(
            self.inputs, self.coordinates, self.low, self.high, self.targets
        )


def collate_task_rows(rows: list[TaskRow], layout: CodeLayout, alone: bool) -> SequenceBatch:
    vocab = layout.vocab_size
    count, width = len(rows), max(len(r) for r in rows)
    tokens = np.full((count, width), layout.pad_id, dtype=np.int64)
    coordinates = np.zeros((count, width, 3), dtype=np.int64)
    low = np.zeros((count, width), dtype=np.int64)
    high = np.full((count, width), vocab, dtype=np.int64)
    role = np.zeros((count, width), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row)
        tokens[i, :n], coordinates[i, :n] = row.tokens, row.coordinates
        low[i, :n], high[i, :n], role[i, :n] = row.low, row.high, row.role
    inputs = np.concatenate([np.full((count, 1), vocab, dtype=np.int64), tokens[:, :-1]], 1)
    same = [np.array_equal(r.test_input_tokens, r.test_output_tokens) for r in rows]
    return SequenceBatch(
        torch.from_numpy(inputs),
        torch.from_numpy(coordinates),
        torch.from_numpy(low),
        torch.from_numpy(high),
        torch.from_numpy(np.where(role > 0, tokens, 0)),
        torch.from_numpy(role),
        torch.tensor(same, dtype=torch.float64),
        collate_task_rows([r.suffix(r.test_output) for r in rows], layout, False)
        if alone
        else None,
    )


class TaskRows(torch.utils.data.Dataset):
    """The training rows; with ``drop > 0`` a row loses its demonstrations with that chance,
    drawn from the batch's own seed (``BatchIndices.rng_key``: the same after a resume)."""

    def __init__(self, rows: list[TaskRow], drop: float):
        self.rows, self.drop = rows, drop

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> TaskRow:
        return self.rows[index]

    def __getitems__(self, indices) -> list[TaskRow]:
        rows = [self.rows[i] for i in indices]
        key = getattr(indices, "rng_key", None)
        if not self.drop or key is None:
            return rows
        draws = np.random.default_rng([*key, 17]).random(len(rows))
        return [
            r.suffix(r.test_input) if d < self.drop else r for r, d in zip(rows, draws, strict=True)
        ]


class TaskQuality(Metric):
    """Bits of the validation tasks' test outputs given their context and alone, their
    capacity, and the bits of every grid token."""

    full_state_update = False
    NAMES = ("bits", "alone", "capacity", "tokens", "sequence", "grid_tokens", "same", "items")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in self.NAMES:
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, **sums: torch.Tensor) -> None:
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value.double().sum())

    def compute(self) -> dict[str, float]:
        items = max(float(self.items), 1.0)
        bits, alone = float(self.bits) / items, float(self.alone) / items
        return {
            "prior_bits": bits,
            "test_output_bits": bits,
            "test_output_bits_alone": alone,
            "demonstration_gain_bits": alone - bits,
            "bits_per_token": float(self.bits) / max(float(self.tokens), 1.0),
            "uniform_code_bits": float(self.capacity) / items,
            "sequence_bits_per_token": float(self.sequence) / max(float(self.grid_tokens), 1.0),
            "output_equals_input": float(self.same) / items,
        }


def _masked_sum(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, values, torch.zeros_like(values)).sum(-1)


class TaskSequences(Sequences):
    """``context=task``: a sequence is a whole ARC task (see the module docstring)."""

    condition_vocab = 2
    label = ", whole tasks"

    def unit(self, data: PriorData) -> str:
        return "tasks' test pairs"

    def build(self, data: PriorData) -> None:
        config, tokenizer = data.config, data.tokenizer
        prior = config.prior
        try:
            train, val = tokenizer.source.prior_tasks()
        except (ValueError, OSError) as error:
            raise TaskError(str(error)) from None
        train = spread_evenly(train, prior.max_tasks)
        val = spread_evenly(val, config.data.max_final_val_samples)
        if not train or not val:
            raise TaskError(
                f"context=task needs training and validation tasks; got {len(train)} and {len(val)}"
            )
        data.train_tasks, data.val_tasks = train, val
        copies = prior.augment_copies if prior.augment != "none" else 1
        augmented = tokenizer.source.augment_tasks(train, copies, prior.augment, config.seed)
        grids = [[g for pair in pairs for g in pair] for _, pairs in augmented + val]
        flat = [g for task in grids for g in task]
        data.train_items = [g for task in grids[: len(train)] for g in task]
        data.val_items = [g for task in grids[len(augmented) :] for g in task]
        rows = self._grid_rows(data, flat, copies, ("task", prior.max_tasks, len(flat)))
        fields = grid_fields(data.layout, rows)
        sequences, start = [], 0
        for task in grids:
            pairs = [(fields[start + i], fields[start + i + 1]) for i in range(0, len(task), 2)]
            sequences.append(task_row(pairs, data.layout.vocab_size, prior.max_tokens))
            start += len(task)
        data.train_rows, data.val_rows = sequences[: len(augmented)], sequences[len(augmented) :]

    def _grid_rows(self, data: PriorData, grids: list, copies: int, key: tuple) -> list[np.ndarray]:
        """Every grid's token row (codes encoded once, cached beside the tokenizer under
        ``key``, what picked the grids)."""
        tokenizer = data.tokenizer
        cached = data.cache_file(copies, (*key, items_digest(grids)))
        if cached is not None and cached.is_file():
            with np.load(cached, allow_pickle=False) as saved:
                rows = _unflatten(saved["rows"], saved["offsets"])
                data.layout = layout_from_spec(json.loads(str(saved["layout"])))
                shape = json.loads(str(saved["code_shape"]))
            tokenizer.code_shape = None if shape is None else tuple(shape)
            return rows
        codes = tokenizer.codes(grids)
        data.layout = data.new_layout(codes)
        try:
            rows = [data.layout.tokens(c) for c in codes]
        except ValueError as error:
            raise TaskError(f"the items do not fit the prior's token layout: {error}") from None
        if cached is not None:
            flat, offsets = _flatten(rows)
            _atomic_savez(
                cached,
                rows=flat,
                offsets=offsets,
                layout=json.dumps(layout_spec(data.layout)),
                code_shape=json.dumps(tokenizer.code_shape),
            )
        return rows

    def describe(self, data: PriorData) -> str:
        tokens = np.mean([len(r) for r in data.val_rows])
        cut = sum(r.dropped > 0 for r in data.train_rows + data.val_rows)
        tasks = len(data.train_tasks)
        return (
            f"training on {data.train_size} task sequences ({tasks} test pairs of training "
            f"tasks x {data.train_size // max(tasks, 1)} versions, {data.tokenizer.describe()}), "
            f"validating on {data.val_size} ({tokens:.0f} tokens each on average, {cut} "
            f"sequences cut to prior.max_tokens={data.config.prior.max_tokens}, vocabulary "
            f"{data.layout.vocab_size})"
        )

    def train_dataset(self, data: PriorData) -> TaskRows:
        return TaskRows(data.train_rows, data.config.prior.drop_demonstrations)

    def collate(self, data: PriorData, rows: list[TaskRow]) -> SequenceBatch:
        return collate_task_rows(rows, data.layout, alone=True)

    def loss(self, prior: CodePrior, batch: SequenceBatch) -> torch.Tensor:
        scored = batch.role > 0
        return -_masked_sum(batch.log_probs(prior), scored).sum() / scored.sum()

    def new_metrics(self, **kwargs) -> TaskQuality:
        return TaskQuality(**kwargs)

    def score(self, prior: CodePrior, batch: SequenceBatch, quality: TaskQuality) -> None:
        nats = -batch.log_probs(prior)
        output, grid = batch.role == TEST_OUTPUT, batch.role > 0
        alone = batch.alone
        alone_nats = _masked_sum(-alone.log_probs(prior), alone.role == TEST_OUTPUT)
        capacity = (batch.high - batch.low).clamp_min(1).double().log2()
        quality.update(
            bits=_masked_sum(nats, output) / math.log(2),
            alone=alone_nats / math.log(2),
            capacity=_masked_sum(capacity, output),
            tokens=output.sum(-1),
            sequence=_masked_sum(nats, grid) / math.log(2),
            grid_tokens=grid.sum(-1),
            same=batch.same,
            items=torch.ones_like(batch.same),
        )

    @torch.no_grad()
    def measure(self, prior, data, device, memorisation: bool = False) -> dict[str, float]:
        """The bits of every final validation task's test output (given its context, alone),
        the decoder's part and the baselines on the test outputs, the solve rates, and with
        ``memorisation`` the greedy solve rate on training tasks."""
        was_training = prior.training
        prior.eval()
        metrics = self.final_quality(prior, data, device)
        tokenizer, layout = data.tokenizer, data.layout
        outputs = [pairs[-1][1] for _, pairs in data.val_tasks]
        codes = tokenizer.codes_of(layout, [r.test_output_tokens for r in data.val_rows])
        metrics.update(_decoder_and_baselines(tokenizer, outputs, codes, metrics))
        if not tokenizer.raw:
            rebuilt = tokenizer.items_or_none(layout, [r.test_output_tokens for r in data.val_rows])
            metrics["solve_rate_ceiling"] = _exact(rebuilt, outputs)
        prior_config = data.config.prior
        generator = torch.Generator().manual_seed(data.config.seed)
        metrics.update(
            solve_metrics(
                prior,
                tokenizer,
                data.val_rows,
                outputs,
                prior_config.solve_samples,
                generator,
                prior_config.guidance,
            )
        )
        if memorisation:
            originals = list(zip(data.train_rows, data.train_tasks, strict=False))
            chosen = spread_evenly(originals, MEMORISATION_TASKS)
            rows, truths = [r for r, _ in chosen], [t[1][-1][1] for _, t in chosen]
            solved = solve_metrics(prior, tokenizer, rows, truths, 0, generator, None)
            metrics["train_solve_rate_greedy"] = solved["solve_rate_greedy"]
        prior.train(was_training)
        return metrics


# ------------------------------------------------------------------------ context=document
class DocumentQuality(TaskQuality):
    """:class:`TaskQuality` of spans after the spans before them, under a document's names."""

    def compute(self) -> dict[str, float]:
        task = super().compute()
        return {
            "prior_bits": task["test_output_bits"],
            "prior_bits_alone": task["test_output_bits_alone"],
            "context_gain_bits": task["demonstration_gain_bits"],
            "bits_per_token": task["bits_per_token"],
            "uniform_code_bits": task["uniform_code_bits"],
            "sequence_bits_per_token": task["sequence_bits_per_token"],
        }


def windows(count: int, size: int) -> list[tuple[int, int]]:
    """Training windows ``(start, end)`` over ``count`` consecutive items: ``size`` items each,
    starting every ``size // 2`` (so every item is also seen late in a window), the last
    ending at ``count``; one window when ``count <= size``."""
    if count <= size:
        return [(0, count)]
    stride = max(size // 2, 1)
    starts = list(range(0, count - size, stride)) + [count - size]
    return [(start, start + size) for start in starts]


class DocumentSequences(TaskSequences):
    """``context=document``: consecutive spans of one document, ``[BOS, s_1, SEP, s_2, ...,
    SEP, s_k]``, each span its token row (its codes or raw tokens), at most
    ``prior.document_spans`` spans a sequence. Training: windows of that many spans every half
    window, the loss on every span token. Validation: one sequence per validation span, ending
    with it after the spans before it in its document (as many as fit), scored on that span:
    ``prior_bits`` given those spans, ``prior_bits_alone`` as a one-span sequence."""

    condition_vocab = 1
    label = ", consecutive spans"

    def unit(self, data: PriorData) -> str:
        return f"{data.tokenizer.source.unit} after the ones before them"

    def build(self, data: PriorData) -> None:
        config, tokenizer = data.config, data.tokenizer
        size = config.prior.document_spans
        try:
            train, val = tokenizer.source.prior_documents()
        except (ValueError, OSError) as error:
            raise TaskError(str(error)) from None
        limits = config.data  # this run's limits apply to the source's spans too, in order
        train = first_items(train, limits.max_samples)
        val = first_items(val, limits.max_final_val_samples)
        if not train or not val:
            raise TaskError(
                f"context=document needs training and validation documents; got {len(train)} "
                f"and {len(val)}"
            )
        data.train_items = [item for document in train for item in document]
        data.val_items = [item for document in val for item in document]
        flat = data.train_items + data.val_items
        key = ("document", len(data.train_items), len(data.val_items))
        rows = self._grid_rows(data, flat, 1, key)  # sets data.layout
        fields = grid_fields(data.layout, rows)
        vocab = data.layout.vocab_size
        data.train_rows, start = [], 0
        for document in train:
            for a, b in windows(len(document), size):
                data.train_rows.append(document_row(fields[start + a : start + b], vocab))
            start += len(document)
        data.val_rows, data.val_contexts = [], []
        for document in val:
            for j in range(len(document)):
                first = max(j - size + 1, 0)
                data.val_rows.append(document_row(fields[start + first : start + j + 1], vocab))
                data.val_contexts.append(document[first:j])
            start += len(document)
        data.documents = (len(train), len(val))

    def describe(self, data: PriorData) -> str:
        tokens = np.mean([len(r) for r in data.val_rows])
        train_documents, val_documents = data.documents
        return (
            f"training on {data.train_size} windows of up to "
            f"{data.config.prior.document_spans} consecutive spans ({len(data.train_items)} "
            f"{data.tokenizer.source.unit} in {train_documents} documents, "
            f"{data.tokenizer.describe()}), validating on {data.val_size} spans after the ones "
            f"before them ({val_documents} documents, {tokens:.0f} tokens a sequence on "
            f"average, vocabulary {data.layout.vocab_size})"
        )

    def train_dataset(self, data: PriorData):
        return data.train_rows

    def new_metrics(self, **kwargs) -> DocumentQuality:
        return DocumentQuality(**kwargs)

    @torch.no_grad()
    def sample_rows(
        self, prior: CodePrior, data: PriorData, count: int, generator, batch_size=64, **drawing
    ):
        """``count`` documents of ``prior.document_spans`` spans, each span drawn after the
        ones drawn before it (``[BOS, s_1, SEP, ..., s_j, SEP]``); the documents' ``j``-th spans
        are drawn together, ``batch_size`` at once (those whose conditions have one length)."""
        layout, vocab = prior.layout, prior.layout.vocab_size
        device = prior.head.weight.device
        sep = np.array([vocab + SEP_IO])
        out: list[list[np.ndarray]] = [[] for _ in range(count)]
        for _ in range(data.config.prior.document_spans):
            conditions, groups = [], {}
            for number, rows in enumerate(out):
                condition = None
                if rows:
                    row = document_row(grid_fields(layout, rows), vocab)
                    tokens = np.concatenate([row.tokens, sep])
                    condition = (tokens, np.concatenate([row.coordinates, np.zeros((1, 3))]))
                conditions.append(condition)
                groups.setdefault(0 if condition is None else len(condition[0]), []).append(number)
            for members in groups.values():
                for start in range(0, len(members), batch_size):
                    chosen = members[start : start + batch_size]
                    condition = coordinates = None
                    if conditions[chosen[0]] is not None:
                        condition, coordinates = (
                            torch.as_tensor(np.stack(part)).long().to(device)
                            for part in zip(*(conditions[n] for n in chosen), strict=True)
                        )
                    tokens = prior.sample(
                        len(chosen),
                        condition,
                        generator=generator,
                        condition_coordinates=coordinates,
                        **drawing,
                    )
                    lengths = layout.lengths(tokens)
                    for number, row, n in zip(chosen, tokens, lengths, strict=True):
                        out[number].append(row[: int(n)].cpu().numpy())
        return out

    def join(self, items: list) -> object:
        """A sampled document's spans (token arrays) as one item: their tokens in order."""
        return np.concatenate([np.asarray(item) for item in items])

    def sample_unit(self, data: PriorData) -> str:
        return f"documents of {data.config.prior.document_spans} {data.tokenizer.source.unit}"

    @torch.no_grad()
    def measure(self, prior, data, device, memorisation: bool = False) -> dict[str, float]:
        """Every final validation span after the spans before it: the prior's bits (and
        alone), the decoder's bits given the span's codes, their sum, and the source's
        baselines on the same spans, alone and after the same spans before them."""
        was_training = prior.training
        prior.eval()
        metrics = self.final_quality(prior, data, device)
        prior.train(was_training)
        tokenizer = data.tokenizer
        codes = tokenizer.codes_of(data.layout, [r.test_output_tokens for r in data.val_rows])
        contexts = data.val_contexts
        metrics.update(_decoder_and_baselines(tokenizer, data.val_items, codes, metrics, contexts))
        return metrics


def _exact(items: list, truths: list) -> float:
    """The share of ``items`` equal to their truth (shape and every cell); None never is."""
    hits = [
        item is not None and np.array_equal(np.asarray(item), np.asarray(truth))
        for item, truth in zip(items, truths, strict=True)
    ]
    return float(np.mean(hits)) if hits else 0.0


@torch.no_grad()
def solve_row(
    prior: CodePrior,
    row: TaskRow,
    samples: int,
    generator: torch.Generator,
    guidance: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The test output of ``row`` decoded after its prefix ``[BOS, ..., in_test, SEP_IO]``:
    greedily, and (``samples > 0``) the likeliest under the prior of that many samples at
    temperature 1. Returns the token rows (through their end token)."""
    device = prior.head.weight.device
    cut = row.test_output
    condition = torch.as_tensor(row.tokens[:cut], dtype=torch.long, device=device)
    coordinates = torch.as_tensor(row.coordinates[:cut], dtype=torch.long, device=device)
    options = {}
    if guidance is not None:
        options = dict(
            unconditional=condition[row.test_input :],
            unconditional_coordinates=coordinates[row.test_input :],
        )
    decoding = prior.start(
        1 + samples, None, condition, guidance, True, condition_coordinates=coordinates, **options
    )
    chosen = []
    while decoding.position < decoding.length and not decoding.complete():
        logits = decoding.next_logits()  # [1 + samples, V]
        token = logits.argmax(-1)
        if samples:
            probs = logits[1:].float().softmax(-1).cpu()
            token[1:] = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
        chosen.append(logits.log_softmax(-1).gather(-1, token[:, None])[:, 0])
        decoding.push(token)
    tokens = decoding.seen
    lengths = prior.layout.lengths(tokens)
    rows = [tokens[i, : int(n)].cpu().numpy() for i, n in enumerate(lengths)]
    if not samples:
        return rows[0], None
    real = torch.arange(tokens.shape[1], device=device) < lengths[:, None]
    score = _masked_sum(torch.stack(chosen, 1), real)[1:]
    return rows[0], rows[1 + int(score.argmax())]


def solve_metrics(
    prior: CodePrior,
    tokenizer: Tokenizer,
    rows: list[TaskRow],
    truths: list,
    samples: int,
    generator: torch.Generator,
    guidance: float | None = None,
) -> dict[str, float]:
    """Solve rates of ``rows`` against their true test outputs ``truths`` (see
    :func:`solve_row`), and the share of greedy predictions equal to the test input's tokens."""
    solved = [solve_row(prior, row, samples, generator, guidance) for row in rows]
    greedy = [g for g, _ in solved]
    metrics = {
        "solve_rate_greedy": _exact(tokenizer.items_or_none(prior.layout, greedy), truths),
        "predicted_equals_input": float(
            np.mean(
                [np.array_equal(g, r.test_input_tokens) for g, r in zip(greedy, rows, strict=True)]
            )
        ),
    }
    if samples:
        best = tokenizer.items_or_none(prior.layout, [b for _, b in solved])
        metrics["solve_rate_best_of_k"] = _exact(best, truths)
    return metrics


SEQUENCES: dict[str, type[Sequences]] = {
    "item": ItemSequences,
    "task": TaskSequences,
    "document": DocumentSequences,
}


class PriorModule(CodeModule):
    """Teacher-forced cross-entropy of the token rows (nats per real token), through the
    task's :class:`Sequences` (whichever ``prior.context``)."""

    def new_metrics(self, **kwargs) -> Metric:
        return self.task.sequences.new_metrics(**kwargs)

    def train_losses(self, batch, step: int, with_logs: bool = False):
        nats = self.task.sequences.loss(self.model, batch)
        self.last_losses = {"prior": nats.detach()}
        if not with_logs:
            return nats, {}
        values = self.schedule_values(step)
        logs = {
            "train/loss": nats.detach(),
            "train/bits_per_token": nats.detach() / math.log(2),
            **{f"schedule/{name}": value for name, value in values.items()},
        }
        return nats, logs

    def validation_step(self, batch, batch_idx: int) -> None:
        self.task.sequences.score(self.model, batch, self.val_quality)


@register_task
class PriorTask(Task):
    name = "prior"
    learns_codes = False  # it models another run's codes (prior.*), model.* does not apply
    unit = "items"
    section = PriorConfig
    headline = Headline("prior_bits", "prior bits", 1, "min")
    summary_keys = (
        "codelength_bits",
        "prior_bits",
        "decoder_bits",
        "uniform_code_bits",
        "bits_per_token",
        "test_output_bits",
        "test_output_bits_alone",
        "demonstration_gain_bits",
        "prior_bits_alone",
        "context_gain_bits",
        "solve_rate_greedy",
        "solve_rate_best_of_k",
    )
    progress_metrics = ("prior_bits", "bits_per_token")
    reconstruction_loss = "prior"
    curve_panels = [
        ("loss (nats per token)", ["train/loss"]),
        (
            "bits per item",
            [
                "val/prior_bits",
                "val/test_output_bits_alone",
                "val/prior_bits_alone",
                "val/uniform_code_bits",
            ],
        ),
    ]

    def __init__(self, config):
        super().__init__(config)
        self.sequences: Sequences = SEQUENCES[config.prior.context]()

    def model_description(self) -> str:
        prior = self.config.prior
        over = "raw tokens" if prior.tokenizer == "raw" else f"codes of {prior.tokenizer}"
        return f"prior: {prior.depth} blocks x {prior.width} over {over}{self.sequences.label}"

    def depends_on(self) -> dict:
        """The tokenizer run: its folder, the checkpoint whose codes were modelled, and that
        checkpoint's SHA-256 (a retrained tokenizer is a different one)."""
        if self.config.prior.tokenizer == "raw":
            return {}
        try:
            checkpoint = find_checkpoint(self.config.prior.tokenizer)
        except CheckpointError:
            return {}
        return {
            "tokenizer": str(Path(self.config.prior.tokenizer).resolve()),
            "tokenizer_checkpoint": str(checkpoint.resolve()),
            "tokenizer_sha256": file_sha256(checkpoint),
        }

    @property
    def slotted(self) -> bool:
        return False

    def check_data(self) -> None:
        self.datamodule()

    def datamodule(self, layout: dict | None = None) -> PriorData:
        data = PriorData(self, layout)
        data.setup("fit")
        return data

    def new_prior(self, layout: CodeLayout) -> CodePrior:
        prior = self.config.prior
        if prior.width % prior.heads or (prior.width // prior.heads) % 2:
            raise TaskError(
                f"prior.width ({prior.width}) must split into prior.heads ({prior.heads}) heads "
                f"of an even size"
            )
        return CodePrior(
            layout,
            width=prior.width,
            depth=prior.depth,
            heads=prior.heads,
            mlp_ratio=prior.mlp_ratio,
            dropout=prior.dropout,
            coordinates=prior.coordinates,
            condition_vocab=self.sequences.condition_vocab,
        )

    def module(self, data: PriorData) -> PriorModule:
        hyper = {"layout": layout_spec(data.layout), "code_shape": data.tokenizer.code_shape}
        return PriorModule(self, self.new_prior(data.layout), data.train_size, hyper)

    def build_model(self, hyper_parameters: dict) -> CodePrior:
        if "layout" not in hyper_parameters:
            raise TaskError(
                "the checkpoint records no token layout; it was not written by pips train"
            )
        return self.new_prior(layout_from_spec(hyper_parameters["layout"]))

    @staticmethod
    def batch_elements(batch) -> float:
        return float(batch.elements)

    # ------------------------------------------------------------------ evaluation
    def measure(self, prior: CodePrior, data: PriorData, device, memorisation: bool = False):
        return self.sequences.measure(prior, data, device, memorisation)

    def final_metrics(self, module, data: PriorData):
        metrics = self.measure(module.model, data, module.device)
        return metrics, len(data.final_dataloader().dataset)

    def evaluate(self, model: CodePrior, spec, device="cpu"):
        if spec is not None:
            raise TaskError(
                "a prior run is evaluated on the validation items of its tokenizer's config: "
                "leave --data out"
            )
        data = self.datamodule(layout_spec(model.layout))
        count = len(data.final_dataloader().dataset)
        unit = self.sequences.unit(data)
        note = f"{count} validation {unit} ({data.tokenizer.describe()})"
        return self.measure(model, data, device, memorisation=True), count, note

    def require_codes(self, model) -> None:
        raise TaskError("a prior run has no codes of its own; encode with its tokenizer run")

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        model: CodePrior,
        count: int,
        out: Path,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> dict:
        """Draw ``count`` samples (items; ``context=document``: documents of consecutive
        spans), decode them, write them into ``out`` and say what they are like (of their
        items)."""
        if count < 1:
            raise TaskError(f"-n must be at least 1; got {count}")
        try:
            data = self.datamodule(layout_spec(model.layout))
        except TaskError:
            raise
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        drawing = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        samples = self.sequences.sample_rows(model, data, count, generator, batch_size, **drawing)
        source = data.tokenizer.source
        items, codes = data.tokenizer.samples_of(model.layout, samples)
        statistics = source.sample_statistics(items, data.train_items, data.val_items)
        if not data.tokenizer.raw:
            statistics.update(source.sample_well_formed(data.tokenizer.model, codes, items))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        joined, start = [], 0
        for rows in samples:
            joined.append(self.sequences.join(items[start : start + len(rows)]))
            start += len(rows)
        files = source.write_samples(joined, out)
        unit = self.sequences.sample_unit(data)
        return {"samples": count, "unit": unit, "files": files, **statistics}

    def report_sections(self, model: CodePrior, run_dir: Path) -> dict[str, str]:
        """The codelength table (from summary.json, beside the baselines) and 16 fresh
        samples (seed 0) with what they are like."""
        summary = read_json_record(Path(run_dir) / "summary.json")
        rows = [
            (key, summary.get(key, summary.get(f"val_{key}")))
            for key in (
                "codelength_bits",
                "prior_bits",
                "decoder_bits",
                "uniform_code_bits",
                "zlib_bits",
                "xz_bits",
                "order0_bits",
                "exact_bits",
                "test_output_bits",
                "test_output_bits_alone",
                "prior_bits_alone",
                "lm_bits",
                "lm_bits_in_context",
                "solve_rate_greedy",
                "solve_rate_best_of_k",
            )
        ]
        cells = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in rows if v is not None
        )
        table = (
            f"<table><tr><th>bits per item</th><th></th></tr>{cells}</table>"
            if cells
            else "<p>No summary.json yet: the run has not finished.</p>"
        )
        try:
            drawn = self.sample(model, 16, Path(run_dir) / "images" / "report_samples")
        except TaskError as error:
            return {"Codelength": table, "Samples": f"<p>{html.escape(str(error))}</p>"}
        stats = ", ".join(
            f"{key} {drawn[key]:.3f}"
            for key in ("well_formed", "identical_to_training", "size_tv", "colour_tv")
            if key in drawn
        )
        pictures = [f for f in drawn["files"] if f.endswith(".png")]
        sheet = latest_image(Path(pictures[0]).parent, Path(pictures[0]).name) if pictures else ""
        note = f"<p class='note'>16 samples at temperature 1, seed 0: {html.escape(stats)}.</p>"
        return {"Codelength": table, "Samples": (sheet or "") + note}

    # ------------------------------------------------------------------ a real code
    def compress(self, model: CodePrior, path: Path, out: Path) -> dict:
        """The items of ``path`` (ARC: a task file) as one range-coded bit string: for each
        item its code tokens under the prior, then (with a tokenizer) the item under the
        tokenizer's decoder given those codes. The header (JSON) says where each item belongs
        (task, pair, role) and which prior wrote the stream; the payload is the code."""
        tokenizer = Tokenizer(self.config)
        items = tokenizer.source.read_items(Path(path))
        encoder = constriction.stream.queue.RangeEncoder()
        prior_bits = decoder_bits = 0.0
        for item in items.items:
            codes = tokenizer.codes([item])
            try:
                tokens = model.layout.tokens(codes[0])
            except ValueError as error:
                raise TaskError(
                    f"{path}: an item does not fit the prior's layout: {error}"
                ) from None
            prior_bits += encode_codes(encoder, model, tokens)
            if not tokenizer.raw:
                decoder_bits += tokenizer.source.encode_item(
                    encoder, tokenizer.model, item, codes[0]
                )
        words = encoder.get_compressed()
        header = {
            "format": STREAM_FORMAT,
            "prior": self.config.prior.tokenizer,
            "items": len(items),
            "layout": layout_spec(model.layout),
            "code_shape": tokenizer.code_shape,
            "metadata": {key: value.tolist() for key, value in items.metadata.items()},
        }
        out = Path(out)
        write_stream(out, header, words)
        model_bits = prior_bits + decoder_bits
        return {
            "items": len(items),
            "unit": tokenizer.source.unit,
            "out": str(out),
            "payload_bits": 32 * len(words),
            "header_bytes": out.stat().st_size - 4 * len(words),
            "prior_bits": prior_bits,
            "decoder_bits": decoder_bits,
            "codelength_bits": model_bits,
        }

    def decompress(self, model: CodePrior, path: Path, out: Path) -> dict:
        """A :meth:`compress` stream back to its items, written where ``out`` says."""
        header, words = read_stream(Path(path))
        if header["layout"] != layout_spec(model.layout):
            raise TaskError(f"{path} was written by another prior (its token layout differs)")
        tokenizer = Tokenizer(self.config)
        decoder = constriction.stream.queue.RangeDecoder(words)
        shape = header.get("code_shape")
        tokenizer.code_shape = None if shape is None else tuple(shape)
        items = []
        for _ in range(int(header["items"])):
            tokens = decode_codes(decoder, model).numpy()
            [item], [codes] = tokenizer.items_of(model.layout, [tokens])
            if not tokenizer.raw:
                item = tokenizer.source.decode_item(decoder, tokenizer.model, codes)
            items.append(item)
        metadata = {key: np.asarray(value) for key, value in header["metadata"].items()}
        written = tokenizer.source.write_items(items, metadata, Path(out))
        return {"items": len(items), "written": written}


STREAM_FORMAT = "pips-prior-stream-2"
STREAM_MAGIC = b"PIPSRC2\n"


def write_stream(path: Path, header: dict, words: np.ndarray) -> None:
    """magic, the header's length (4 bytes, little-endian), the header (zlib-compressed UTF-8
    JSON), then the range coder's 32-bit words (little-endian); written atomically."""
    body = zlib.compress(json.dumps(header).encode(), 9)
    data = STREAM_MAGIC + len(body).to_bytes(4, "little") + body
    data += np.asarray(words, dtype="<u4").tobytes()
    atomic_write(path, lambda handle: handle.write(data))


def read_stream(path: Path) -> tuple[dict, np.ndarray]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TaskError(f"cannot read {path} ({error.strerror or error})") from None
    if not data.startswith(STREAM_MAGIC) or len(data) < len(STREAM_MAGIC) + 4:
        raise TaskError(f"{path} is not a stream written by pips compress")
    start = len(STREAM_MAGIC) + 4
    size = int.from_bytes(data[len(STREAM_MAGIC) : start], "little")
    try:
        header = json.loads(zlib.decompress(data[start : start + size]))
        if header.get("format") != STREAM_FORMAT:
            raise ValueError("unknown format")
    except (ValueError, AttributeError, zlib.error):
        raise TaskError(f"{path} has a damaged header; compress the file again") from None
    payload = data[start + size :]
    if len(payload) % 4:
        raise TaskError(f"{path} is cut short (its payload is not whole 32-bit words)")
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)
