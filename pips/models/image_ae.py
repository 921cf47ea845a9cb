"""A discrete image autoencoder: pixels -> encoder -> one code per position -> decoder -> pixels.

Two backbones (``images.backbone``):

- ``conv`` (VQ-VAE, van den Oord et al. 2017; DALL-E's dVAE): a residual conv encoder halves the
  resolution ``images.downsample`` times, each position of the ``S x S`` map
  (``S = size / 2**downsample``) becomes one code, and a mirrored conv decoder upsamples the
  quantized map back to pixels.
- ``vit`` (ViT-VQGAN, Yu et al. 2022, without the adversarial parts): the image is cut into
  ``p x p`` patches (``p = model.patch_size``, ``S = size / p`` per side), each patch's
  ``C * p * p`` pixels are embedded linearly (with ``images.dct``: its per-channel block DCT
  coefficients in zigzag order, low frequencies first), ``model.encoder_layers`` transformer
  blocks with 2D RoPE over patch positions encode them, each patch becomes one code, and
  ``model.decoder_layers`` blocks over the quantized patch vectors feed a linear head that
  predicts each patch's pixels (with ``images.dct``: its zigzag DCT coefficients, turned back
  into pixels by the inverse DCT).

Either way the code string is ``S * S`` codes in row-major order, ``Encoded.latent_positions``
holds their (row, col) on the code map, and no code is padding. The encoder sees pixels mapped
to ``[-1, 1]``; the decoder predicts, per sub-pixel, one map for ``l2``/``l1`` (the pixel value)
or two for ``logit_laplace`` (``mu`` and ``log_scale``, see :mod:`pips.losses.pixels`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pips.config import ImageConfig, ModelConfig
from pips.losses.pixels import logit_laplace_mean
from pips.models.build import (
    block_arguments,
    build_quantizer,
    quantizer_dim,
)
from pips.models.grid_dvae import Encoded, grid_positions
from pips.nn.conv import ConvDecoder, ConvEncoder
from pips.nn.dct import block_dct, block_idct, blocks_to_zigzag, zigzag_to_blocks
from pips.nn.rope import Rope2D
from pips.nn.transformer import Block, init_weights

# The floor of the logit-Laplace log-scale: b >= exp(-7) ~ 1e-3 in logit units, finer than the
# 1/255 steps of 8-bit pixels (PixelCNN++ floors its logistic log-scales at -7 too). Without a
# floor the continuous density of quantised pixels grows without bound as b -> 0.
LOG_SCALE_MIN = -7.0


class ImageAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # [B, C, H, W] in [0, 1], the model's point estimate
    params: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # pixel_loss's params
    encoded: Encoded  # latents [B, N, D], quantizer output, positions [B, N, 2], padding [B, N]


class ImageAutoencoder(nn.Module):
    """Images ``[B, channels, image_size, image_size]`` in ``[0, 1]`` -> ``S * S`` codes -> images.

    Args:
        model: ``model.width`` (the latent width; the transformer width for ``vit``),
            ``model.heads``, ``model.encoder_layers`` / ``model.decoder_layers`` (``vit``),
            ``model.mlp``, ``model.mlp_ratio``, ``model.dropout``, the RoPE bases and
            ``model.quantizer``. The grid options (layout, slots, patch_size) are not used.
        images: the backbone and its options (``conv``: downsample, channels, res_blocks;
            ``vit``: patch_size, dct; each backbone ignores the other's), and
            ``images.reconstruction``, which decides the decoder's outputs: one map for
            ``l2``/``l1``, ``mu`` and ``log_scale`` (floored at ``LOG_SCALE_MIN``) for
            ``logit_laplace``. The dataset options are not used.
        channels: image channels (1 grayscale, 3 RGB).
        image_size: the side of the square images.

    The quantizer is ``build_quantizer(model.quantizer, quantizer_dim(model.quantizer, width))``
    on latents projected from the width to its dimension (and back for the decoder).
    """

    def __init__(self, model: ModelConfig, images: ImageConfig, channels: int, image_size: int):
        super().__init__()
        self.model_config = model
        self.images_config = images
        self.channels = channels
        self.image_size = image_size
        self.backbone = images.backbone
        self.reconstruction_kind = images.reconstruction
        self.maps = 2 if images.reconstruction == "logit_laplace" else 1
        width = model.width
        self.width = width
        code_dim = quantizer_dim(model.quantizer, width)

        if self.backbone == "conv":
            factor = 2**images.downsample
            if image_size % factor:
                raise ValueError(
                    f"images of size {image_size} cannot be halved images.downsample="
                    f"{images.downsample} times; use a size divisible by {factor} "
                    f"(images.size) or fewer halvings"
                )
            self.side = image_size // factor
            self.encoder = ConvEncoder(
                channels, images.channels, width, images.downsample, images.res_blocks
            )
            self.decoder = ConvDecoder(
                width, images.channels, channels * self.maps, images.downsample, images.res_blocks
            )
        elif self.backbone == "vit":
            patch = model.patch_size
            if image_size % patch:
                raise ValueError(
                    f"images of size {image_size} do not split into model.patch_size={patch} "
                    f"patches; use a patch size that divides {image_size} or set images.size"
                )
            self.patch = patch
            self.side = image_size // patch
            self.dct = images.dct
            patch_dim = channels * patch * patch
            block_args = block_arguments(model)
            self.patch_embedding = nn.Linear(patch_dim, width)
            self.encoder_row = nn.Embedding(self.side, width)
            self.encoder_col = nn.Embedding(self.side, width)
            if width % model.heads:
                raise ValueError(
                    f"model.width={width} is not divisible by model.heads={model.heads}; "
                    "pick a width that is a multiple of the heads"
                )
            self.rope = Rope2D(width // model.heads, model.rope_base_row, model.rope_base_col)
            self.encoder = nn.ModuleList(Block(**block_args) for _ in range(model.encoder_layers))
            self.decoder_row = nn.Embedding(self.side, width)
            self.decoder_col = nn.Embedding(self.side, width)
            self.decoder = nn.ModuleList(Block(**block_args) for _ in range(model.decoder_layers))
            self.decoder_norm = nn.RMSNorm(width)
            self.head = nn.Linear(width, self.maps * patch_dim)
        else:
            raise ValueError(f"images.backbone={self.backbone!r} is unknown; use conv or vit")

        self.encoder_norm = nn.RMSNorm(width)
        self.to_latent = nn.Linear(width, code_dim) if code_dim != width else nn.Identity()
        self.code_projection = nn.Linear(code_dim, width)
        self.register_buffer(
            "positions", grid_positions(self.side, self.side, torch.device("cpu")), persistent=False
        )  # [N, 2]
        if self.backbone == "vit":
            init_weights(self, model.encoder_layers + model.decoder_layers)
        # built last: a quantizer keeps its own initialisation (see GridDVAE)
        self.quantizer = build_quantizer(model.quantizer, code_dim, None)

    # ----------------------------------------------------------------------------------------
    @property
    def code_shape(self) -> tuple[int, int]:
        """(rows, cols) of the code map: ``S x S`` codes per image, row-major."""
        return (self.side, self.side)

    @property
    def num_codes(self) -> int:
        return self.side * self.side

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"this autoencoder takes images [B, {', '.join(map(str, expected))}]; got "
                f"{tuple(images.shape)}, so resize them or build the model for this size"
            )

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """vit: ``[B, C, H, W] -> [B, N, C * p * p]``: per patch, each channel's pixels row-major or,
        with dct, its DCT coefficients in zigzag order."""
        batch, p, s = images.shape[0], self.patch, self.side
        blocks = images.view(batch, self.channels, s, p, s, p).permute(0, 2, 4, 1, 3, 5)
        flat = blocks_to_zigzag(block_dct(blocks)) if self.dct else blocks.flatten(-2)
        return flat.reshape(batch, s * s, -1)  # [B, N, C * p * p]

    def unpatchify(self, values: torch.Tensor) -> torch.Tensor:
        """vit: ``[B, N, maps * C * p * p] -> [B, maps, C, H, W]``, the inverse of :meth:`patchify`."""
        batch, p, s = values.shape[0], self.patch, self.side
        flat = values.view(batch, s, s, self.maps, self.channels, p * p)
        blocks = block_idct(zigzag_to_blocks(flat, p)) if self.dct else flat.unflatten(-1, (p, p))
        board = blocks.permute(0, 3, 4, 1, 5, 2, 6)  # [B, maps, C, s, p, s, p]
        return board.reshape(batch, self.maps, self.channels, s * p, s * p)

    def encode(self, images: torch.Tensor, **schedule_values: float) -> Encoded:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` -> :class:`Encoded` with ``N = S * S`` codes."""
        self._check_images(images)
        x = images * 2.0 - 1.0
        batch = images.shape[0]
        if self.backbone == "conv":
            h = self.encoder(x).flatten(2).transpose(1, 2)  # [B, N, width]
        else:
            rows, cols = self.positions.unbind(-1)
            h = self.patch_embedding(self.patchify(x))
            h = h + self.encoder_row(rows) + self.encoder_col(cols)
            rope = self.rope(self.positions.unsqueeze(0))
            for block in self.encoder:
                h = block(h, rope)
        latents = self.to_latent(self.encoder_norm(h))  # [B, N, code_dim]
        quantized = self.quantizer(latents, **schedule_values)
        positions = self.positions.expand(batch, -1, -1)
        padding = torch.zeros(batch, self.num_codes, dtype=torch.bool, device=images.device)
        return Encoded(latents, quantized, positions, padding)

    def decode(
        self, quantized: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Quantized codes ``[B, N, code_dim]`` -> (reconstruction ``[B, C, H, W]`` in
        ``[0, 1]``, the loss's params: the prediction, or ``(mu, log_scale)``)."""
        batch = quantized.shape[0]
        codes = self.code_projection(quantized)  # [B, N, width]
        if self.backbone == "conv":
            board = codes.transpose(1, 2).reshape(batch, self.width, self.side, self.side)
            maps = self.decoder(board).unflatten(1, (self.maps, self.channels))
        else:
            rows, cols = self.positions.unbind(-1)
            h = codes + self.decoder_row(rows) + self.decoder_col(cols)
            rope = self.rope(self.positions.unsqueeze(0))
            for block in self.decoder:
                h = block(h, rope)
            maps = self.unpatchify(self.head(self.decoder_norm(h)))  # [B, maps, C, H, W]
        if self.maps == 2:
            mu, log_scale = maps[:, 0], maps[:, 1].clamp_min(LOG_SCALE_MIN)
            return logit_laplace_mean(mu), (mu, log_scale)
        prediction = maps[:, 0]
        return prediction.clamp(0.0, 1.0), prediction

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, N]`` (or ``[B, N, levels]`` for rvq/gvq) -> images ``[B, C, H, W]``
        in ``[0, 1]``."""
        if indices.shape[1] != self.num_codes:
            raise ValueError(
                f"this autoencoder decodes {self.num_codes} codes per image ({self.side} x "
                f"{self.side}); got indices {tuple(indices.shape)}"
            )
        quantized = self.quantizer.codes_to_quantized(indices)
        return self.decode(quantized.to(self.code_projection.weight.dtype))[0]

    def forward(self, images: torch.Tensor, **schedule_values: float) -> ImageAEOutput:
        """Images ``[B, C, H, W]`` in ``[0, 1]``; ``schedule_values`` (temperature, hardness,
        noise_scale) go to the quantizer."""
        encoded = self.encode(images, **schedule_values)
        reconstruction, params = self.decode(encoded.quantizer.quantized)
        return ImageAEOutput(reconstruction, params, encoded)
