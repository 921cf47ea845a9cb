"""The sequence autoencoder: tokens -> transformer encoder -> discrete codes -> decoder -> tokens.

Encoder: a token embedding and ``model.encoder_layers`` pre-norm blocks with 1D RoPE
(:class:`pips.nn.rope.Rope1D`, base ``model.rope_base_col``: a sequence is one row of columns),
then an RMSNorm; its per-token outputs are the ``activations`` a probe reads. Two latent layouts:

- ``pooled``: ``model.num_latents`` learned slot queries attend to the tokens (LatentPooling,
  ``model.pooling_layers`` blocks) and each slot is quantized. The decoder's queries are learned
  absolute position embeddings; each of its ``model.decoder_layers`` blocks self-attends over the
  positions (1D RoPE) and cross-attends to the slot codes (projected, plus a learned per-slot
  embedding), as in the grid model. With ``model.slots: regions`` the slots are ``N`` contiguous
  segments of the sequence (torch's adaptive-pooling spans): each slot query starts from the mean
  of its segment's encoder outputs, and each position's decoder query gets its segment's code;
  ``model.slots: local`` also restricts each slot's pooling attention to its own segment. The
  encoder input adds a learned absolute position embedding in this layout: the slots read the
  tokens' values, which RoPE leaves unrotated, so without it a slot could not tell which token
  sat where.
- ``spatial``: one code per ``p = model.patch_size`` consecutive tokens, the mean of their encoder
  outputs (the last patch averages the ``T mod p`` tokens it has). The decoder is
  ``model.decoder_layers`` self-attention blocks over the ``ceil(T / p)`` codes (1D RoPE over the
  code index); each output vector is expanded by a linear head into ``p`` token logits.

Shapes: tokens ``[B, T]``, ``T <= max_length``; logits ``[B, T, V]``; ``N`` codes per sequence
(``num_latents``, or ``ceil(T / p)``); latent positions ``(0, slot)`` or ``(0, patch index)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pips.config import ModelConfig
from pips.models.build import (
    block_arguments,
    build_pooling,
    build_quantizer,
    quantizer_dim,
)
from pips.models.grid_dvae import Encoded
from pips.nn.pooling import region_matrix, region_of
from pips.nn.rope import Rope1D
from pips.nn.transformer import Block, init_weights


class SequenceAEOutput(NamedTuple):
    token_logits: torch.Tensor  # [B, T, V]
    encoded: Encoded  # latents [B, N, D], quantizer output, positions [B, N, 2], padding [B, N]
    activations: torch.Tensor  # [B, T, width] encoder outputs per token (before pooling)


class SequenceAutoencoder(nn.Module):
    """A discrete autoencoder of token sequences; see the module docstring for the layouts."""

    def __init__(self, model: ModelConfig, vocab_size: int, max_length: int):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"a sequence vocabulary needs at least 2 tokens; got {vocab_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 token; got {max_length}")
        if model.width % model.heads != 0:
            raise ValueError(
                f"model.width {model.width} must be divisible by model.heads {model.heads}"
            )
        self.config = model
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.spatial = model.layout == "spatial"
        self.patch = model.patch_size if self.spatial else 1
        self.num_slots = None if self.spatial else model.num_latents
        self.regions = not self.spatial and model.slots != "learned"  # regions or local
        width = model.width
        self.width = width
        block_args = block_arguments(model)

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.input_position = None if self.spatial else nn.Embedding(max_length, width)
        self.rope = Rope1D(width // model.heads, model.rope_base_col)
        self.encoder = nn.ModuleList(Block(**block_args) for _ in range(model.encoder_layers))
        self.encoder_norm = nn.RMSNorm(width)
        self.pooling = None if self.spatial else build_pooling(model)
        code_dim = quantizer_dim(model.quantizer, width)
        self.to_latent = nn.Linear(width, code_dim) if code_dim != width else nn.Identity()

        self.code_projection = nn.Linear(code_dim, width)
        if self.spatial:
            self.decoder = nn.ModuleList(Block(**block_args) for _ in range(model.decoder_layers))
        else:
            self.position_embedding = nn.Embedding(max_length, width)
            self.slot_embedding = nn.Parameter(torch.zeros(model.num_latents, width))
            self.decoder = nn.ModuleList(
                Block(**block_args, cross_attention=True) for _ in range(model.decoder_layers)
            )
        self.decoder_norm = nn.RMSNorm(width)
        self.token_head = nn.Linear(width, self.patch * vocab_size)
        init_weights(self, model.encoder_layers + model.decoder_layers + model.pooling_layers)
        if not self.spatial:
            nn.init.normal_(self.slot_embedding, std=0.02)
        # built after the GPT-2 init, which would overwrite the quantizer's own initialisation
        self.quantizer = build_quantizer(model.quantizer, code_dim, self.num_slots)

    # ----------------------------------------------------------------------------------------
    def num_codes(self, length: int) -> int:
        """Codes per sequence of ``length`` tokens: ``num_latents``, or ``ceil(length / p)``."""
        return -(-length // self.patch) if self.spatial else self.config.num_latents

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be a [batch, length] long tensor; got {tuple(tokens.shape)} "
                f"{tokens.dtype}"
            )
        self._check_length(tokens.shape[1])

    def _check_length(self, length: int) -> None:
        if not 1 <= length <= self.max_length:
            raise ValueError(
                f"sequence length {length} is outside [1, max_length={self.max_length}]; build "
                f"the model with a larger max_length"
            )

    def token_activations(self, tokens: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """tokens [B, T] -> encoder outputs [B, T, width] (after the final RMSNorm), or with
        ``layer`` the residual stream after that many encoder blocks (0: the embeddings)."""
        self._check(tokens)
        if layer is not None and not 0 <= layer <= len(self.encoder):
            raise ValueError(
                f"layer must be between 0 (the embeddings) and {len(self.encoder)} (the encoder's "
                f"blocks); got {layer}"
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token_embedding(tokens)
        if self.input_position is not None:
            h = h + self.input_position(positions)
        rope = self.rope(positions)
        for number, block in enumerate(self.encoder):
            if number == layer:
                return h
            h = block(h, rope)
        return h if layer is not None else self.encoder_norm(h)

    def _segments(self, length: int, device: torch.device) -> torch.Tensor:
        """Pooled ``regions``: [N, T] averaging weights of the N contiguous segments."""
        lengths = torch.tensor([length], device=device)
        return region_matrix(lengths, length, self.config.num_latents)[0].float()

    def encode_activations(self, h: torch.Tensor, **schedule_values: float) -> Encoded:
        """Encoder outputs [B, T, width] -> codes (:class:`Encoded`, N codes per sequence)."""
        batch, length, _ = h.shape
        device = h.device
        if self.spatial:
            pad = (-length) % self.patch
            keep = F.pad(torch.ones(length, device=device, dtype=h.dtype), (0, pad))
            sums = F.pad(h, (0, 0, 0, pad)).view(batch, -1, self.patch, h.shape[-1]).sum(2)
            counts = keep.view(-1, self.patch).sum(1)  # [N] real tokens per patch
            latents = sums / counts[None, :, None]
        else:
            rope = self.rope(torch.arange(length, device=device))
            initial, mask = None, None
            if self.regions:
                segments = self._segments(length, device).to(h)  # [N, T]
                initial = torch.einsum("nt,btd->bnd", segments, h)
                if self.config.slots == "local":  # True = outside the slot's own segment
                    mask = (segments == 0).expand(batch, -1, -1)  # [B, N, T]
            latents = self.pooling(h, rope, mask, initial)  # [B, N, width]
        count = latents.shape[1]
        positions = torch.stack(
            [
                torch.zeros(count, dtype=torch.long, device=device),
                torch.arange(count, device=device),
            ],
            dim=-1,
        ).expand(batch, -1, -1)  # [B, N, 2] (0, slot or patch index)
        padding = torch.zeros(batch, count, dtype=torch.bool, device=device)
        latents = self.to_latent(latents)
        quantized = self.quantizer(latents, **schedule_values)
        return Encoded(latents, quantized, positions, padding)

    def encode(self, tokens: torch.Tensor, **schedule_values: float) -> Encoded:
        """tokens [B, T] -> :class:`Encoded` (latents [B, N, D] before the quantizer, ...)."""
        return self.encode_activations(self.token_activations(tokens), **schedule_values)

    def decode(self, quantized: torch.Tensor, length: int) -> torch.Tensor:
        """Quantized codes [B, N, D] -> token logits [B, length, V]."""
        self._check_length(length)
        expected = self.num_codes(length)
        if quantized.dim() != 3 or quantized.shape[1] != expected:
            raise ValueError(
                f"a sequence of {length} tokens has {expected} codes; got quantized of shape "
                f"{tuple(quantized.shape)}"
            )
        codes = self.code_projection(quantized)  # [B, N, width]
        batch, device = codes.shape[0], codes.device
        if self.spatial:
            h = codes
            rope = self.rope(torch.arange(codes.shape[1], device=device))
            for block in self.decoder:
                h = block(h, rope)
        else:
            positions = torch.arange(length, device=device)
            h = self.position_embedding(positions).expand(batch, -1, -1)  # [B, T, width]
            if self.regions:
                owner = region_of(torch.tensor([length], device=device), length, codes.shape[1])
                h = h + torch.einsum("tn,bnd->btd", owner[0].to(codes), codes)
            context = codes + self.slot_embedding
            rope = self.rope(positions)
            for block in self.decoder:
                h = block(h, rope, context=context)
        h = self.decoder_norm(h)
        logits = self.token_head(h).view(batch, -1, self.vocab_size)  # [B, N * p or T, V]
        return logits[:, :length]

    def decode_codes(self, indices: torch.Tensor, length: int) -> torch.Tensor:
        """Code indices [B, N] (or [B, N, levels]) -> token logits [B, length, V]."""
        return self.decode(self.quantizer.codes_to_quantized(indices), length)

    @torch.no_grad()
    def decoder_bits(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``-log2 p(tokens | codes)`` per sequence, in bits ([B] float64): the decoder part of a
        two-part lossless code. Every position ``t < T`` of ``tokens`` [B, T] is charged
        ``-log2 softmax(logits[t])[tokens[t]]`` (float64 log-softmax over the ``V`` tokens) under
        the logits :meth:`decode_codes` gives the code indices ``indices`` [B, N] (or
        [B, N, levels]) for length ``T``; eval mode, no grad. The length ``T`` is not charged: a
        receiver is assumed to know it (the spatial layout's code count gives it up to ``p``)."""
        self._check(tokens)
        if indices.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"{tokens.shape[0]} token sequences but code indices for {indices.shape[0]}"
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"tokens must lie in 0..{self.vocab_size - 1}; got "
                f"{int(tokens.min())}..{int(tokens.max())}"
            )
        log_probs = self._log_probs(indices, tokens.shape[1])  # [B, T, V]
        log_probs = log_probs.gather(-1, tokens.to(log_probs.device).unsqueeze(-1)).squeeze(-1)
        return -log_probs.sum(dim=1) / math.log(2.0)

    @torch.no_grad()
    def decoder_distribution(self, indices, length: int) -> np.ndarray:
        """One sequence's code indices [N] (or [N, levels]) -> the decoder's float64 token
        log-probabilities [length, V], the ones :meth:`decoder_bits` charges, computed for this
        sequence alone (batch of one; eval mode, no grad), so that a range coder's sender and
        its receiver, holding only the codes and the length, get them bit for bit alike."""
        indices = torch.as_tensor(np.asarray(indices)).long()
        if indices.dim() not in (1, 2):
            raise ValueError(
                f"one sequence's code indices are [N] or [N, levels]; got {tuple(indices.shape)}"
            )
        return self._log_probs(indices[None], int(length))[0].cpu().numpy()

    def _log_probs(self, indices: torch.Tensor, length: int) -> torch.Tensor:
        """Code indices [B, N(, levels)] -> float64 token log-probabilities [B, length, V] in
        eval mode (the mode restored after)."""
        was_training = self.training
        self.eval()
        try:
            device = self.token_head.weight.device
            logits = self.decode_codes(indices.to(device), length)  # [B, T, V]
        finally:
            self.train(was_training)
        return F.log_softmax(logits.double(), dim=-1)

    def forward(self, tokens: torch.Tensor, **schedule_values: float) -> SequenceAEOutput:
        activations = self.token_activations(tokens)
        encoded = self.encode_activations(activations, **schedule_values)
        logits = self.decode(encoded.quantizer.quantized, tokens.shape[1])
        return SequenceAEOutput(logits, encoded, activations)
