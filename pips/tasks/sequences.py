"""Task ``sequences``: sequences sampled from a GSSM preset (or read from .npz files) and
:class:`~pips.models.sequence_ae.SequenceAutoencoder`, trained on the tokens' cross-entropy;
validation reports token and whole-sequence accuracy. ``pips probe RUN --target NODE`` then asks
how much of a hidden node's state the codes carry, against the Bayes-optimal posterior."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from pips.config import Config, SequenceConfig
from pips.data.compressors import compressor_baselines
from pips.data.gssm import GSSM, load_sequences
from pips.losses.stablemax import stablemax_cross_entropy
from pips.models.code_tokens import IndexSplit, PooledLayout
from pips.models.sequence_ae import SequenceAutoencoder
from pips.tasks.base import Headline, ProbeData, TaskError, register_task
from pips.tasks.probe import ProbeError, bayes_baselines, hidden_nodes, sequence_features, split
from pips.tasks.tensors import TensorDataModule, TensorTask


@dataclass
class SequenceBatch:
    tokens: torch.Tensor  # [B, T] long

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def elements(self) -> int:
        return self.tokens.numel()


def sequence_splits(config: Config) -> tuple[dict, dict, Any]:
    """The training and validation sequences of a sequences run, and their GSSM (None when both
    come from files). Sampled sequences are seeded: ``sequences.generator_seed`` fixes the
    process, ``seed`` and ``seed + 1`` the training and validation draws."""
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


class SequenceDataModule(TensorDataModule):
    def collate(self, items) -> SequenceBatch:
        return SequenceBatch(torch.stack([item[0] for item in items]))

    def load(self):
        train, val, self.gssm = sequence_splits(self.config)
        train_tokens = torch.as_tensor(np.asarray(train["observations"]), dtype=torch.long)
        val_tokens = torch.as_tensor(np.asarray(val["observations"]), dtype=torch.long)
        vocab = int(max(train_tokens.max(), val_tokens.max())) + 1
        if self.gssm is not None:
            vocab = max(vocab, self.gssm.nodes[self.gssm.spec.observed].states)
        self.sequence_shape = (vocab, max(train_tokens.shape[1], val_tokens.shape[1]))
        return (train_tokens,), (val_tokens,)

    @property
    def shape(self) -> tuple[int, int]:
        return self.sequence_shape

    def describe(self) -> str:
        vocab, length = self.sequence_shape
        source = self.config.sequences.train_file or self.config.sequences.preset
        return (
            f"training on {self.train_size} sequences ({source}, {length} tokens of {vocab}), "
            f"validating on {self.val_size}"
        )


class SequenceQuality(Metric):
    """Tokens right, whole sequences right and the token loss, summed over batches and ranks."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("correct", "tokens", "exact", "sequences"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state(
            "loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, output, batch: SequenceBatch, loss: torch.Tensor) -> None:
        right = output.token_logits.argmax(-1) == batch.tokens
        self.correct += right.sum()
        self.tokens += right.numel()
        self.exact += right.all(-1).sum()
        self.sequences += len(batch)
        self.loss_sum += loss.detach().double() * right.numel()

    def compute(self) -> dict[str, float]:
        return {
            "token_accuracy": float(self.correct) / max(float(self.tokens), 1.0),
            "sequence_accuracy": float(self.exact) / max(float(self.sequences), 1.0),
            "loss_tokens": float(self.loss_sum) / max(float(self.tokens), 1.0),
        }


@register_task
class SequencesTask(TensorTask):
    name = "sequences"
    unit = "sequences"
    section = SequenceConfig
    headline = Headline("token_accuracy", "token acc", 3, "max")
    summary_keys = (
        "token_accuracy",
        "sequence_accuracy",
        "codebook_perplexity",
        "bits_per_sequence",
    )
    progress_metrics = ("token_accuracy", "sequence_accuracy", "codebook_perplexity")
    reconstruction_loss = "tokens"
    curve_panels = [
        ("loss", ["train/loss", "train/loss_tokens", "val/loss_tokens", "train/loss_quantizer"]),
        ("accuracy", ["train/token_accuracy", "val/token_accuracy", "val/sequence_accuracy"]),
    ]
    data_class = SequenceDataModule
    shape_key = "sequence_shape"
    # set by prior_items: the process and the validation draw (kernels included) it sampled
    _gssm: GSSM | None = None
    _val: dict | None = None

    def new_model(self, shape) -> SequenceAutoencoder:
        vocab, length = shape
        return SequenceAutoencoder(self.config.model, int(vocab), int(length))

    def inputs(self, batch: SequenceBatch) -> torch.Tensor:
        return batch.tokens

    def loss(self, output, batch: SequenceBatch) -> torch.Tensor:
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

    def metric(self, **kwargs) -> SequenceQuality:
        return SequenceQuality(**kwargs)

    def train_logs(self, output, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        right = output.token_logits.argmax(-1) == batch.tokens
        return {"train/token_accuracy": right.float().mean()}

    def decode_codes(self, model, indices: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, T]`` (the argmax of the decoder's logits) from code indices."""
        return model.decode_codes(indices, model.max_length).argmax(-1)

    # ------------------------------------------------------------------ a prior over sequences
    def prior_items(self) -> tuple[list, list]:
        """The run's training and validation sequences (observations), regenerated from its
        config; the validation draw is kept for the exact reference of :meth:`baselines`."""
        train, val, self._gssm = sequence_splits(self.config)
        self._val = val
        limit = self.config.data.max_samples
        rows = list(np.asarray(train["observations"], dtype=np.int64))
        return rows[:limit] if limit else rows, list(np.asarray(val["observations"], np.int64))

    def augment_items(self, items: list, copies: int, kind: str, seed: int) -> list:
        """``fresh``: the training sequences, then ``copies - 1`` times as many new draws of
        the same process (seeded apart from the training and validation draws); other kinds
        leave sequences as they are."""
        if kind != "fresh" or copies < 2:
            return list(items)
        if self._gssm is None:
            raise TaskError(
                "prior.augment=fresh draws new sequences from their GSSM; these sequences come "
                "from files: use prior.augment=none"
            )
        extra = self._gssm.sample(
            (copies - 1) * len(items), len(items[0]), seed=1_000_003 + 2 * seed
        )["observations"]
        return list(items) + list(np.asarray(extra, dtype=np.int64))

    def raw_layout(self, items: list) -> PooledLayout:
        """The observations themselves, one token each."""
        lengths = {len(item) for item in items}
        if len(lengths) != 1:
            raise TaskError(f"a raw prior needs sequences of one length; got {sorted(lengths)[:3]}")
        vocab = int(max(int(np.max(item)) for item in items)) + 1
        if self._gssm is not None:
            vocab = max(vocab, self._gssm.nodes[self._gssm.spec.observed].states)
        return PooledLayout(lengths.pop(), IndexSplit([(vocab, 1)]))

    def decoder_bits(self, model, items: list, codes: list) -> np.ndarray:
        tokens = torch.as_tensor(np.stack(items), dtype=torch.long)
        indices = torch.as_tensor(np.stack(codes), dtype=torch.long)
        return model.decoder_bits(tokens, indices).numpy()

    def baselines(self, items: list, model=None) -> dict[str, float]:
        """zlib -9 per sequence, xz -9e over all, each one's order-0 entropy (one byte per
        token), and for sequences drawn from a GSSM the exact ``-log2 p(x)`` of each under its
        own process (its kernels), the entropy a perfect model of that sequence would need."""
        data = [np.asarray(item, dtype=np.uint8).tobytes() for item in items]
        symbols = [np.asarray(item) for item in items]
        values = compressor_baselines(data, symbols, separator=b"")  # one length: no framing
        val = self._val
        if self._gssm is not None and val is not None and len(items) <= len(val["observations"]):
            observations = np.asarray(val["observations"])[: len(items)]
            if np.array_equal(observations, np.stack(items)):
                bits = [
                    -self._gssm.log_likelihood(sequence, kernels) / math.log(2)
                    for sequence, kernels in zip(observations, val["kernels"], strict=False)
                ]
                values["exact_bits"] = float(np.mean(bits))
        return values

    def write_samples(self, samples: list, out: Path) -> list[str]:
        """``samples.npz``: the sampled observations [N, T]."""
        path = Path(out) / "samples.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, observations=np.stack(samples).astype(np.int64))
        return [str(path)]

    @property
    def probe_targets(self) -> tuple[str, ...]:
        _, val, _ = sequence_splits(self.config)
        return tuple(hidden_nodes(val))

    def probe(self, model, target, features, spec, count, layer) -> ProbeData:
        """A hidden GSSM node's state at every position of the run's validation sequences
        (regenerated from its config), split by sequence, beside the Bayes-optimal accuracy of
        the true model."""
        if spec is not None:
            raise TaskError(
                "--data picks ARC grids; a sequences run is probed on the validation sequences "
                "of its own config: leave --data out"
            )
        _, data, gssm = sequence_splits(self.config)
        nodes = hidden_nodes(data)
        if target not in nodes:
            raise ProbeError(
                f"unknown hidden node {target!r}; these sequences record {', '.join(nodes) or 'none'}"
            )
        if count < 2:
            raise ProbeError(f"max_sequences must be at least 2 (train and test); got {count}")
        observations = np.asarray(data["observations"])[:count]
        values = sequence_features(model, observations, features, layer=layer)
        rows, codebook = values if isinstance(values, tuple) else (values, None)
        states = np.asarray(data[f"hidden/{target}"])
        length = states.shape[1]
        used = len(rows) // length
        train_sequences, test_sequences = split(used)
        offsets = np.arange(length)
        return ProbeData(
            features=rows,
            targets=states[:used].reshape(-1),
            train=(train_sequences[:, None] * length + offsets).reshape(-1),
            test=(test_sequences[:, None] * length + offsets).reshape(-1),
            codebook=codebook,
            note=f"validation sequences of {self.config.sequences.preset}",
            baselines=bayes_baselines(data, target, gssm, test_sequences, used, length),
        )
