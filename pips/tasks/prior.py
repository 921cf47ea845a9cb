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

Augmentation happens before encoding and is precomputed: ``prior.augment_copies`` versions of
every training item (the item itself first; then, for ARC, a random D4 element and colour
permutation each) are encoded once. On a CPU the tokenizer's forward pass costs more than the
prior's step, so encoding on the fly would spend most of a run on the tokenizer; a fixed pool of
copies gives most of augmentation's effect at no cost per step.

Validation and ``pips evaluate``, in bits per item: ``prior_bits = -log2 p(codes)``,
``decoder_bits = -log2 p(item | codes)`` under the tokenizer's decoder (grids, sequences),
``codelength_bits`` their sum (a real two-part lossless code, `pips compress` writes it),
``uniform_code_bits`` the code string's capacity, and beside them, on the same items, the
task's baselines (ARC: zlib -9 per grid, xz -9e over the set, order-0 entropy; GSSM: the exact
``-log2 p(x)`` of each sequence under its own process).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
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
from pips.models.code_tokens import CodeLayout, layout_from_spec, layout_spec
from pips.models.prior import CodePrior
from pips.models.range_coding import decode_codes, encode_codes
from pips.tasks.base import TASKS, Headline, Task, TaskError, get_task, register_task
from pips.tasks.checkpoints import CheckpointError, find_checkpoint, load_model
from pips.tasks.module import CodeModule
from pips.tasks.tensors import stateful_loader

AUGMENTATIONS = ("none", "dihedral", "colours", "dihedral+colours")


@dataclass
class PriorConfig:
    tokenizer: str = option(
        "raw",
        "raw: the items' own tokens; else a run folder (or .ckpt) whose codes the prior models",
    )
    source: str = option(
        "grids", "tokenizer=raw: the task whose items are modelled (its own config section)"
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
        "augmentation of the training items before encoding (ARC grids; other items have none)",
        AUGMENTATIONS,
    )
    augment_copies: int = option(
        8, "versions of every training item encoded once (the item itself first)", min=1
    )


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


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(handle)
    try:
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _flatten(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return flat, np.concatenate([[0], np.cumsum(lengths)])


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


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

    def items_of(self, layout: CodeLayout, rows: list) -> tuple[list, list[np.ndarray]]:
        """Token rows -> (items, their codes): decoded by the tokenizer, or read off."""
        codes = []
        for row in rows:
            code = layout.codes(np.asarray(row))
            if self.code_shape is not None and code.size == math.prod(self.code_shape):
                code = code.reshape(self.code_shape)
            codes.append(code)
        if self.raw:
            return [self.source.raw_item(c) for c in codes], codes
        return list(self.source.decode(self.model, codes)), codes

    def cache_key(self, copies: int, augment: str, seed: int) -> str:
        digest = hashlib.sha256()
        with open(self.checkpoint, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        settings = json.dumps(
            [
                copies,
                augment,
                seed,
                self.config.data.max_samples,
                self.config.data.max_final_val_samples,
                self.config.prior.part_values,
            ]
        )
        digest.update(settings.encode())
        return digest.hexdigest()[:20]


class PriorData(L.LightningDataModule):
    """Token rows of the training items (augmented copies) and validation items, in memory,
    batched in length buckets by PIPS's stateful sampler (seeded, resumable mid-epoch)."""

    def __init__(self, task: PriorTask, layout_override: dict | None = None):
        super().__init__()
        self.task = task
        self.config = task.config
        self.layout_override = layout_override
        self.train_rows: list[np.ndarray] = []
        self.val_rows: list[np.ndarray] = []

    def setup(self, stage: str | None = None) -> None:
        if self.val_rows:
            return
        prior = self.config.prior
        self.tokenizer = tokenizer = Tokenizer(self.config)
        try:
            train, self.val_items = tokenizer.source.prior_items()
        except (ValueError, OSError) as error:
            raise TaskError(str(error)) from None
        data = self.config.data  # this run's limits apply to the source's items too
        train = spread_evenly(train, data.max_samples)
        self.val_items = spread_evenly(self.val_items, data.max_final_val_samples)
        if not train or not self.val_items:
            raise TaskError(
                f"the prior needs training and validation items; got {len(train)} and "
                f"{len(self.val_items)}"
            )
        self.train_items = train
        copies = prior.augment_copies if prior.augment != "none" else 1
        cached = None
        if not tokenizer.raw:
            run = tokenizer.checkpoint.parent
            run = run.parent if run.name == "checkpoints" else run
            key = tokenizer.cache_key(copies, prior.augment, self.config.seed)
            cached = run / "prior_cache" / f"tokens-{key}.npz"
        if cached is not None and cached.is_file():
            with np.load(cached, allow_pickle=False) as saved:
                self.train_rows = _unflatten(saved["train"], saved["train_offsets"])
                self.val_rows = _unflatten(saved["val"], saved["val_offsets"])
                self.val_codes = [np.asarray(c) for c in json.loads(str(saved["val_codes"]))]
                spec = json.loads(str(saved["layout"]))
                shape = json.loads(str(saved["code_shape"]))
            tokenizer.code_shape = None if shape is None else tuple(shape)
            self.layout = layout_from_spec(spec)
        else:
            augmented = tokenizer.source.augment_items(
                train, copies, prior.augment, self.config.seed
            )
            train_codes = tokenizer.codes(augmented)
            self.val_codes = tokenizer.codes(self.val_items)
            self.layout = (
                layout_from_spec(self.layout_override)
                if self.layout_override
                else tokenizer.layout(train_codes + self.val_codes)
            )
            try:
                self.train_rows = [self.layout.tokens(c) for c in train_codes]
                self.val_rows = [self.layout.tokens(c) for c in self.val_codes]
            except ValueError as error:
                raise TaskError(f"the items do not fit the prior's token layout: {error}") from None
            if cached is not None:
                train_flat, train_offsets = _flatten(self.train_rows)
                val_flat, val_offsets = _flatten(self.val_rows)
                _atomic_savez(
                    cached,
                    train=train_flat,
                    train_offsets=train_offsets,
                    val=val_flat,
                    val_offsets=val_offsets,
                    val_codes=json.dumps([c.tolist() for c in self.val_codes]),
                    layout=json.dumps(layout_spec(self.layout)),
                    code_shape=json.dumps(tokenizer.code_shape),
                )
        if self.layout_override is not None and layout_spec(self.layout) != self.layout_override:
            raise TaskError(
                "the tokenizer's codes no longer fit the layout this prior was trained on; "
                "was prior.tokenizer retrained or replaced?"
            )

    @property
    def train_size(self) -> int:
        return len(self.train_rows)

    @property
    def val_size(self) -> int:
        return len(self.val_rows)

    def describe(self) -> str:
        tokens = np.mean([len(r) for r in self.val_rows])
        return (
            f"training on {self.train_size} token rows ({len(self.train_items)} "
            f"{self.tokenizer.source.unit} x {self.train_size // max(len(self.train_items), 1)} "
            f"versions, {self.tokenizer.describe()}), validating on {self.val_size} "
            f"({tokens:.0f} tokens each on average, vocabulary {self.layout.vocab_size})"
        )

    def collate(self, rows: list[np.ndarray]) -> PriorBatch:
        tokens = self.layout.pad(rows)
        return PriorBatch(tokens, torch.tensor([len(r) for r in rows]))

    def _loader(self, rows, batch_size: int, shuffle: bool, shard=True):
        """Rows in buckets of similar length (less padding), seeded and resumable."""
        lengths = np.array([[len(r), 1] for r in rows], dtype=np.int64).reshape(-1, 2)
        return stateful_loader(self, rows, lengths, batch_size, shuffle, shard, bucket=True)

    def train_dataloader(self):
        return self._loader(self.train_rows, self.config.data.batch_size, True)

    def val_dataloader(self):
        data = self.config.data
        rows = spread_evenly(self.val_rows, data.max_val_samples)  # across all tasks
        return self._loader(rows, data.val_batch_size, False)

    def final_dataloader(self):
        """Every validation item (data.max_final_val_samples already chose them)."""
        return self._loader(self.val_rows, self.config.data.val_batch_size, False, shard=False)


class PriorModule(CodeModule):
    """Teacher-forced cross-entropy of the token rows (nats per real token)."""

    def new_metrics(self, **kwargs) -> PriorQuality:
        return PriorQuality(**kwargs)

    def train_losses(self, batch: PriorBatch, step: int, with_logs: bool = False):
        nats = -self.model.log_prob(batch.tokens).sum() / batch.lengths.sum()
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

    def validation_step(self, batch: PriorBatch, batch_idx: int) -> None:
        score_batch(self.model, batch, self.val_quality)


def score_batch(prior: CodePrior, batch: PriorBatch, quality: PriorQuality) -> torch.Tensor:
    bits = prior.bits(batch.tokens)
    quality.update(bits, prior.layout.capacity_bits(batch.tokens), batch.lengths)
    return bits


@register_task
class PriorTask(Task):
    name = "prior"
    unit = "items"
    section = PriorConfig
    headline = Headline("prior_bits", "prior bits", 1, "min")
    summary_keys = (
        "codelength_bits",
        "prior_bits",
        "decoder_bits",
        "uniform_code_bits",
        "bits_per_token",
    )
    progress_metrics = ("prior_bits", "bits_per_token")
    reconstruction_loss = "prior"
    curve_panels = [
        ("loss (nats per token)", ["train/loss"]),
        ("bits per item", ["val/prior_bits", "val/uniform_code_bits"]),
    ]

    def model_description(self) -> str:
        prior = self.config.prior
        over = "raw tokens" if prior.tokenizer == "raw" else f"codes of {prior.tokenizer}"
        return f"prior: {prior.depth} blocks x {prior.width} over {over}"

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
    def batch_elements(batch: PriorBatch) -> float:
        return float(batch.elements)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def measure(self, prior: CodePrior, data: PriorData, device) -> dict[str, float]:
        """Every final validation item: prior bits, decoder bits, the codelength, and the
        source task's baselines on the same items."""
        was_training = prior.training
        prior.eval()
        quality = PriorQuality(sync_on_compute=False).to(device)
        for batch in data.final_dataloader():
            score_batch(prior, move_data_to_device(batch, device), quality)
        prior.train(was_training)
        metrics = quality.compute()
        count = len(data.final_dataloader().dataset)
        items, codes = data.val_items[:count], data.val_codes[:count]
        tokenizer = data.tokenizer
        if tokenizer.raw:
            decoder = np.zeros(len(items))  # the tokens are the item: nothing left to code
        else:
            decoder = tokenizer.source.decoder_bits(tokenizer.model, items, codes)
        if decoder is not None:
            metrics["decoder_bits"] = float(np.mean(decoder))
            metrics["codelength_bits"] = metrics["prior_bits"] + metrics["decoder_bits"]
        metrics.update(tokenizer.source.baselines(items))
        return metrics

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
        note = f"{count} validation {data.tokenizer.source.unit} ({data.tokenizer.describe()})"
        return self.measure(model, data, device), count, note

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
        """Draw ``count`` token strings, decode them to items, write them into ``out`` and say
        what they are like."""
        if count < 1:
            raise TaskError(f"-n must be at least 1; got {count}")
        try:
            data = self.datamodule(layout_spec(model.layout))
        except TaskError:
            raise
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for start in range(0, count, batch_size):
            tokens = model.sample(
                min(batch_size, count - start),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            lengths = model.layout.lengths(tokens)
            rows.extend(row[: int(n)].numpy() for row, n in zip(tokens, lengths, strict=True))
        source = data.tokenizer.source
        items, codes = data.tokenizer.items_of(model.layout, rows)
        statistics = source.sample_statistics(items, data.train_items, data.val_items)
        if not data.tokenizer.raw:
            statistics.update(source.sample_well_formed(data.tokenizer.model, codes, items))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = source.write_samples(items, out)
        return {"samples": count, "unit": source.unit, "files": files, **statistics}

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


STREAM_FORMAT = "pips-prior-stream-1"
STREAM_MAGIC = b"PIPSRC1\n"


def write_stream(path: Path, header: dict, words: np.ndarray) -> None:
    """magic, the header's length (4 bytes, little-endian), the header (UTF-8 JSON), then the
    range coder's 32-bit words (little-endian); written atomically."""
    body = json.dumps(header).encode()
    data = STREAM_MAGIC + len(body).to_bytes(4, "little") + body
    data += np.asarray(words, dtype="<u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


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
        header = json.loads(data[start : start + size])
        if header.get("format") != STREAM_FORMAT:
            raise ValueError("unknown format")
    except (ValueError, AttributeError):
        raise TaskError(f"{path} has a damaged header; compress the file again") from None
    payload = data[start + size :]
    if len(payload) % 4:
        raise TaskError(f"{path} is cut short (its payload is not whole 32-bit words)")
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)
