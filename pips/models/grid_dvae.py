"""The grid discrete VAE: grid cells -> transformer encoder -> latent codes -> decoder -> cells.

Two latent layouts:

- ``pooled``: ``num_latents`` learned queries attend to the encoded grid (LatentPooling), each slot
  is quantized, and the decoder's cell queries cross-attend to the slot codes. The code string has
  the same length whatever the grid's size. With ``slots: regions`` the slots form a
  ``sqrt(N) x sqrt(N)`` grid stretched over the grid whatever its size: each starts from the mean
  of its region's encoder tokens, and its code is added to the decoder queries of that region's
  cells before they attend to all codes.
- ``spatial``: one code per ``patch_size x patch_size`` patch of cells (as in VQ-VAE); the decoder
  is a transformer over the patch codes whose outputs are un-patchified back into cells.

Encoder tokens are cells, or ``p x p`` patches of cells when ``patch_tokens`` is on (``p`` =
``patch_size``), which cuts attention cost by ``p**4``. Height and width are predicted from the
codes alone, so a grid can be rebuilt from its code string: first its size, then its cells.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pips.config import ModelConfig
from pips.data.batch import Batch, collate_grids
from pips.data.vocab import MAX_GRID_SIZE, VOCAB, Vocabulary
from pips.models.build import (
    block_arguments,
    build_pooling,
    build_quantizer,
    quantizer_dim,
)
from pips.nn.pooling import region_matrix, region_of
from pips.nn.rope import Rope2D
from pips.nn.transformer import Block, init_weights
from pips.quantizers import QuantizerOutput
from pips.quantizers.base import check_code_indices


class Encoded(NamedTuple):
    latents: torch.Tensor  # [B, N, D] continuous encoder outputs, before the quantizer
    quantizer: QuantizerOutput  # quantized [B, N, D], indices [B, N, ...]
    latent_positions: torch.Tensor  # [B, N, 2] (row, col) of each latent (patch coords; 0 pooled)
    latent_padding: torch.Tensor  # [B, N] True where the latent covers no grid cell


class GridCoding(NamedTuple):
    """One grid's decoder distributions for a range coder (:meth:`GridDVAE.decoder_distribution`),
    float64 natural-log probabilities."""

    height: np.ndarray | None  # [30] size head, class h-1 = height h; None with size_from=cells
    width: np.ndarray | None  # [30]
    cells: np.ndarray | None  # [H, W, V] on the canvas; None until the size is known (heads)
    charged: np.ndarray | None  # [H, W] bool: the cells coded, row-major


class GridDVAEOutput(NamedTuple):
    cell_logits: torch.Tensor  # [B, L, V] over the batch's canvas
    height_logits: torch.Tensor  # [B, MAX_GRID_SIZE], class h-1 = height h
    width_logits: torch.Tensor  # [B, MAX_GRID_SIZE]
    encoded: Encoded
    covered: torch.Tensor  # [B, L] bool, canvas cells decoded from this grid's own codes


def patchify(tokens: torch.Tensor, height: int, width: int, patch: int, pad_id: int):
    """[B, H*W] canvas tokens -> [B, Hp, Wp, patch*patch] patches (canvas padded with PAD)."""
    batch = tokens.shape[0]
    board = tokens.view(batch, height, width)
    pad_h, pad_w = (-height) % patch, (-width) % patch
    if pad_h or pad_w:
        board = F.pad(board, (0, pad_w, 0, pad_h), value=pad_id)
    hp, wp = board.shape[1] // patch, board.shape[2] // patch
    patches = board.view(batch, hp, patch, wp, patch).permute(0, 1, 3, 2, 4)
    return patches.reshape(batch, hp, wp, patch * patch)


def unpatchify(values: torch.Tensor, hp: int, wp: int, patch: int, height: int, width: int):
    """[B, Hp*Wp, patch*patch, C] -> [B, height*width, C], cropping the canvas padding."""
    batch, channels = values.shape[0], values.shape[-1]
    board = values.view(batch, hp, wp, patch, patch, channels).permute(0, 1, 3, 2, 4, 5)
    board = board.reshape(batch, hp * patch, wp * patch, channels)[:, :height, :width]
    return board.reshape(batch, height * width, channels)


def predict_grids(cell_logits, height_logits, width_logits, num_colours: int):
    """Colour predictions [B, L] (argmax over colours only) and head sizes [B, 2] (1-based)."""
    colours = cell_logits[..., :num_colours].argmax(-1)
    sizes = torch.stack([height_logits.argmax(-1), width_logits.argmax(-1)], dim=-1) + 1
    return colours, sizes


def grid_positions(hp: int, wp: int, device: torch.device) -> torch.Tensor:
    """[Hp*Wp, 2] (row, col) coordinates of a Hp x Wp board, row-major."""
    rows, cols = torch.meshgrid(
        torch.arange(hp, device=device), torch.arange(wp, device=device), indexing="ij"
    )
    return torch.stack([rows, cols], dim=-1).view(-1, 2)


class GridDVAE(nn.Module):
    def __init__(self, config: ModelConfig, vocab: Vocabulary = VOCAB, eos: bool = True):
        super().__init__()
        self.config = config
        self.vocab = vocab
        self.eos = eos
        width = config.width
        self.width = width
        self.token_patch = config.patch_size if config.patch_tokens else 1
        self.spatial = config.layout == "spatial"
        if config.size_from == "cells" and not self.spatial:
            raise ValueError(
                "model.size_from=cells reads a grid's size off its decoded PAD/EOS cells, which "
                "only the spatial layout decodes; use model.size_from=heads with layout pooled"
            )
        # how a decoded grid's size is read: off the PAD/EOS cells, or by the size heads
        self.sizes_from_cells = config.size_from == "cells"
        self.region_side = (
            math.isqrt(config.num_latents) if not self.spatial and config.slots != "learned" else 0
        )
        head_dim = width // config.heads
        block_args = block_arguments(config)

        # encoder: one embedding row per (position in patch, token), summed over the patch
        self.token_embedding = nn.Embedding(self.token_patch**2 * vocab.size, width)
        self.rope = Rope2D(head_dim, config.rope_base_row, config.rope_base_col)
        self.encoder = nn.ModuleList(Block(**block_args) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.RMSNorm(width)

        self.pooling = None if self.spatial else build_pooling(config)
        code_dim = quantizer_dim(config.quantizer, width)
        self.to_latent = nn.Linear(width, code_dim) if code_dim != width else nn.Identity()

        # decoder
        self.code_projection = nn.Linear(code_dim, width)
        self.row_embedding = nn.Embedding(MAX_GRID_SIZE + 2, width)
        self.col_embedding = nn.Embedding(MAX_GRID_SIZE + 2, width)
        if self.spatial:
            self.decoder = nn.ModuleList(Block(**block_args) for _ in range(config.decoder_layers))
            self.output_patch = config.patch_size
        else:
            self.slot_embedding = nn.Parameter(torch.zeros(config.num_latents, width))
            self.decoder = nn.ModuleList(
                Block(**block_args, cross_attention=True) for _ in range(config.decoder_layers)
            )
            self.output_patch = self.token_patch
        self.place_embedding = (
            nn.Embedding(4 * (MAX_GRID_SIZE + 1), width)
            if self.region_side and config.region_offsets
            else None
        )
        self.decoder_norm = nn.RMSNorm(width)
        self.cell_head = nn.Linear(width, self.output_patch**2 * vocab.size)
        self.shape_head = nn.Sequential(
            nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 2 * MAX_GRID_SIZE)
        )
        init_weights(self, config.encoder_layers + config.decoder_layers + config.pooling_layers)
        if not self.spatial:
            nn.init.normal_(self.slot_embedding, std=0.02)
        # built after the GPT-2 init: a quantizer keeps its own initialisation, which its
        # rounding or codebook scale depends on (an FSQ projection at std 0.02 rounds to 0)
        num_slots = None if self.spatial else config.num_latents
        self.quantizer = build_quantizer(config.quantizer, code_dim, num_slots)

    # ----------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor, height: int, width: int):
        """Canvas tokens -> encoder tokens [B, P, D], their positions [P, 2] and padding [B, P]."""
        p = self.token_patch
        patches = patchify(tokens, height, width, p, self.vocab.pad_id)  # [B, Hp, Wp, p*p]
        batch, hp, wp, _ = patches.shape
        offsets = torch.arange(p * p, device=tokens.device) * self.vocab.size
        embedded = self.token_embedding(patches + offsets).sum(dim=3)  # [B, Hp, Wp, D]
        padding = (patches == self.vocab.pad_id).all(dim=-1)  # [B, Hp, Wp]
        positions = grid_positions(hp, wp, tokens.device)
        return embedded.view(batch, hp * wp, -1), positions, padding.view(batch, -1), (hp, wp)

    def encode(self, batch: Batch, **schedule_values: float) -> Encoded:
        tokens = batch.tokens
        h, positions, padding, (hp, wp) = self.embed_tokens(
            tokens, batch.canvas_height, batch.canvas_width
        )
        rope = self.rope(positions.unsqueeze(0))
        if self.place_embedding is not None:
            h = h + self._region_place(self._region_members(padding, hp, wp))
        for block in self.encoder:
            h = block(h, rope, padding)
        h = self.encoder_norm(h)  # [B, P, D]

        if self.spatial:
            latents, latent_positions, latent_padding = self._pool_patches(h, padding, hp, wp)
        else:
            initial, pool_mask = None, padding
            if self.region_side:
                initial, inside = self._region_means(h, padding, hp, wp)
                if self.config.slots == "local":  # each slot attends to its own region only
                    pool_mask = ~inside | padding.unsqueeze(1)  # [B, N, P]
            latents = self.pooling(h, rope, pool_mask, initial)  # [B, N, D]
            latent_positions = torch.zeros(
                latents.shape[0], latents.shape[1], 2, dtype=torch.long, device=h.device
            )
            latent_padding = torch.zeros(latents.shape[:2], dtype=torch.bool, device=h.device)
        latents = self.to_latent(latents)
        quantized = self.quantizer(latents, **schedule_values)
        return Encoded(latents, quantized, latent_positions, latent_padding)

    def _pool_patches(self, h: torch.Tensor, padding: torch.Tensor, hp: int, wp: int):
        """Spatial layout: average encoder tokens inside each code patch (masked to real cells)."""
        batch = h.shape[0]
        if self.token_patch == self.config.patch_size:  # encoder tokens already are the patches
            positions = grid_positions(hp, wp, h.device).expand(batch, -1, -1)
            return h, positions, padding
        ratio = self.config.patch_size
        board = h.view(batch, hp, wp, -1)
        keep = (~padding).view(batch, hp, wp, 1).to(h.dtype)
        pad_h, pad_w = (-hp) % ratio, (-wp) % ratio
        board = F.pad(board * keep, (0, 0, 0, pad_w, 0, pad_h))
        keep = F.pad(keep, (0, 0, 0, pad_w, 0, pad_h))
        qh, qw = board.shape[1] // ratio, board.shape[2] // ratio
        sums = board.view(batch, qh, ratio, qw, ratio, -1).sum(dim=(2, 4))  # [B, Qh, Qw, D]
        counts = keep.view(batch, qh, ratio, qw, ratio, 1).sum(dim=(2, 4))
        latents = (sums / counts.clamp_min(1.0)).view(batch, qh * qw, -1)
        latent_padding = (counts == 0).view(batch, qh * qw)
        positions = grid_positions(qh, qw, h.device).expand(batch, -1, -1)
        return latents, positions, latent_padding

    def _region_sizes(self, padding: torch.Tensor, hp: int, wp: int):
        """Rows and columns of real patches per grid, from the patch padding [B, hp * wp]."""
        inside = ~padding.view(-1, hp, wp)
        return inside.any(2).sum(1), inside.any(1).sum(1)  # [B], [B]

    def _region_means(self, h: torch.Tensor, padding: torch.Tensor, hp: int, wp: int):
        """Pooled ``regions`` slots: mean encoder token of each of the side x side regions [B, N, D],
        and which tokens each region holds [B, N, hp * wp]."""
        rows, cols = self._region_sizes(padding, hp, wp)
        side = self.region_side
        row_weights = region_matrix(rows, hp, side).to(h.dtype)  # [B, S, hp]
        col_weights = region_matrix(cols, wp, side).to(h.dtype)  # [B, S, wp]
        board = h.view(h.shape[0], hp, wp, -1)
        means = torch.einsum("bri,bcj,bijd->brcd", row_weights, col_weights, board)
        inside = (row_weights > 0).unsqueeze(2).unsqueeze(4) & (col_weights > 0)[:, None, :, None]
        inside = inside.reshape(h.shape[0], side * side, hp * wp)  # [B, N, hp * wp]
        return means.reshape(h.shape[0], side * side, -1), inside

    def _region_members(self, padding: torch.Tensor, hp: int, wp: int):
        """One-hot region of each patch row [B, hp, S] and column [B, wp, S] (zero at padding)."""
        rows, cols = self._region_sizes(padding, hp, wp)
        return region_of(rows, hp, self.region_side), region_of(cols, wp, self.region_side)

    def _region_codes(self, codes: torch.Tensor, members) -> torch.Tensor:
        """[B, hp * wp, D]: each patch's own region code (zero outside the grid)."""
        row_of, col_of = (member.to(codes.dtype) for member in members)  # [B, hp|wp, S]
        side = self.region_side
        board = codes.view(codes.shape[0], side, side, -1)
        spread = torch.einsum("bir,bjc,brcd->bijd", row_of, col_of, board)
        return spread.reshape(codes.shape[0], -1, codes.shape[-1])

    def _region_place(self, members) -> torch.Tensor:
        """[B, hp * wp, D]: embeddings of each patch's row and column offset inside its region
        and of its region's height and width (in patches; zero rows at padding)."""
        table = self.place_embedding.weight.view(4, MAX_GRID_SIZE + 1, -1)
        along = []
        for axis, member in enumerate(members):  # [B, size, S] one-hot
            offset = ((member.cumsum(1) * member).sum(-1) - 1).clamp_min(0).long()  # [B, size]
            extent = (member * member.sum(1, keepdim=True)).sum(-1).long()  # [B, size]
            along.append(table[2 * axis][offset] + table[2 * axis + 1][extent])  # [B, size, D]
        place = along[0].unsqueeze(2) + along[1].unsqueeze(1)  # [B, hp, wp, D]
        return place.flatten(1, 2)

    # ----------------------------------------------------------------------------------------
    def predict_shape(self, codes: torch.Tensor, latent_padding: torch.Tensor):
        """Height and width logits [B, 30] each, from the projected codes alone."""
        keep = (~latent_padding).unsqueeze(-1).to(codes.dtype)  # [B, N, 1]
        mean = (codes * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        maximum = codes.masked_fill(latent_padding.unsqueeze(-1), float("-inf")).amax(1)
        logits = self.shape_head(torch.cat([mean, maximum], dim=-1))
        return logits.split(MAX_GRID_SIZE, dim=-1)

    def decode(
        self,
        quantized: torch.Tensor,  # [B, N, D]
        latent_positions: torch.Tensor,  # [B, N, 2]
        latent_padding: torch.Tensor,  # [B, N]
        canvas_height: int,
        canvas_width: int,
        canvas_padding: torch.Tensor,  # [B, canvas_height * canvas_width] True outside the grid
    ):
        """Codes -> (cell logits [B, L, V], height logits, width logits) on the given canvas."""
        codes = self.code_projection(quantized)  # [B, N, D]
        height_logits, width_logits = self.predict_shape(codes, latent_padding)
        if self.spatial:
            hp = -(-canvas_height // self.output_patch)
            wp = -(-canvas_width // self.output_patch)
            rows, cols = latent_positions.unbind(-1)
            h = codes + self.row_embedding(rows) + self.col_embedding(cols)
            rope = self.rope(latent_positions)
            for block in self.decoder:
                h = block(h, rope, latent_padding)
        else:
            p = self.output_patch
            hp, wp = -(-canvas_height // p), -(-canvas_width // p)
            positions = grid_positions(hp, wp, codes.device)  # [P, 2]
            rows, cols = positions.unbind(-1)
            queries = (self.row_embedding(rows) + self.col_embedding(cols)).expand(
                codes.shape[0], -1, -1
            )
            padding = patchify(canvas_padding.long(), canvas_height, canvas_width, p, 1)
            padding = padding.bool().all(-1).view(codes.shape[0], -1)  # [B, P]
            context = codes + self.slot_embedding
            rope = self.rope(positions.unsqueeze(0))
            h = queries
            if self.region_side:
                members = self._region_members(padding, hp, wp)
                h = h + self._region_codes(codes, members)
                if self.place_embedding is not None:
                    h = h + self._region_place(members)
            for block in self.decoder:
                h = block(h, rope, padding, context=context)
        h = self.decoder_norm(h)
        logits = self.cell_head(h).view(h.shape[0], hp * wp, self.output_patch**2, -1)
        cell_logits = unpatchify(logits, hp, wp, self.output_patch, canvas_height, canvas_width)
        return cell_logits, height_logits, width_logits

    def covered_cells(self, encoded: Encoded, canvas_height: int, canvas_width: int):
        """[B, L] True at canvas cells that lie in one of the grid's own code patches (spatial);
        every cell for the pooled layout, whose decoder can be queried anywhere."""
        batch = encoded.latent_padding.shape[0]
        if not self.spatial:
            return torch.ones(
                batch,
                canvas_height * canvas_width,
                dtype=torch.bool,
                device=encoded.latent_padding.device,
            )
        p = self.output_patch
        hp, wp = -(-canvas_height // p), -(-canvas_width // p)
        inside = (~encoded.latent_padding).view(batch, hp * wp, 1, 1).expand(-1, -1, p * p, 1)
        return unpatchify(inside, hp, wp, p, canvas_height, canvas_width).squeeze(-1)

    def predict(self, output: GridDVAEOutput, canvas_width: int):
        """Colours [B, L] (argmax over the ten colours) and sizes [B, 2] of the decoded grids.

        With ``model.size_from=cells`` (spatial layout, trained with PAD/EOS weight > 0) a grid's
        size is read off its decoded cells: the rows whose first cell is not PAD, and the column of
        the first EOS in row 0 (the first PAD without EOS). Otherwise the size heads decide.
        """
        colours, head_sizes = predict_grids(
            output.cell_logits, output.height_logits, output.width_logits, self.vocab.num_colours
        )
        if not self.sizes_from_cells:
            return colours, head_sizes
        batch = colours.shape[0]
        tokens = output.cell_logits.argmax(-1).view(batch, -1, canvas_width)  # [B, H, W]
        return colours, self.sizes_from_tokens(tokens, output.covered.view(batch, -1, canvas_width))

    def sizes_from_tokens(self, tokens: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
        """The ``size_from=cells`` rule: canvas tokens [B, H, W] (``covered`` [B, H, W] True at
        cells the grid's own codes decode) -> sizes [B, 2]: the leading rows whose first cell is
        not PAD, and the cells of row 0 before its first EOS (the first PAD without EOS)."""
        inside = (tokens != self.vocab.pad_id) & covered  # [B, H, W]
        height = inside[:, :, 0].long().cumprod(dim=1).sum(dim=1)  # leading non-PAD rows
        end = self.vocab.eos_id if self.eos else self.vocab.pad_id
        row_open = ((tokens[:, 0] != end) & inside[:, 0]).long().cumprod(dim=1)  # [B, W]
        width = row_open.sum(dim=1)
        return torch.stack([height, width], dim=-1).clamp(1, MAX_GRID_SIZE)

    def forward(self, batch: Batch, **schedule_values: float) -> GridDVAEOutput:
        encoded = self.encode(batch, **schedule_values)
        cell_logits, height_logits, width_logits = self.decode(
            encoded.quantizer.quantized,
            encoded.latent_positions,
            encoded.latent_padding,
            batch.canvas_height,
            batch.canvas_width,
            batch.pad_mask,
        )
        covered = self.covered_cells(encoded, batch.canvas_height, batch.canvas_width)
        return GridDVAEOutput(cell_logits, height_logits, width_logits, encoded, covered)

    # ---------------------------------------------------------------------------- inference
    # A grid's codes are an integer array: [N] (pooled; [N, S] for residual / grouped
    # quantizers with S indices per latent) or [rows, cols] of patches (spatial; [rows, cols, S]).
    # Decoding needs nothing else: the size comes from the codes by the model's own size rule.

    @property
    def code_levels(self) -> int:
        """Indices per latent: a residual quantizer's stages, a grouped one's groups, else 1."""
        quantizer = self.quantizer
        for name in ("indices_per_code", "num_stages", "groups"):
            value = getattr(quantizer, name, None)
            if isinstance(value, int):
                return value
        return 1

    @torch.no_grad()
    def reconstruct(self, batch: Batch, **schedule_values: float) -> list:
        """Each grid of ``batch`` rebuilt from its codes alone: size first, then cells."""
        encoded = self.encode(batch, **schedule_values)
        quantized = encoded.quantizer.quantized
        if self.spatial:  # every patch of the grid's own codes, whatever the batch's canvas
            p = self.output_patch
            rows, cols = -(-batch.canvas_height // p), -(-batch.canvas_width // p)
            return self._decode_patches(quantized, encoded.latent_padding, rows, cols)
        return self._decode_slots(quantized, encoded.latent_positions, encoded.latent_padding)

    @torch.no_grad()
    def encode_grids(self, grids: list, batch_size: int = 128) -> list:
        """Each grid's code indices (argmax codes, eval mode), in the order of ``grids``:
        numpy arrays [N] / [N, S] (pooled) or [rows, cols] / [rows, cols, S] (spatial)."""
        self.eval()
        out: list = [None] * len(grids)
        device = next(self.parameters()).device
        for chosen in _similar_sizes([g.shape for g in grids], batch_size):
            batch = collate_grids([grids[i] for i in chosen], eos=self.eos).to(device)
            indices = self.encode(batch).quantizer.indices  # [B, N] or [B, N, S]
            if indices.dim() == 2:
                indices = indices.unsqueeze(-1)
            indices = indices.cpu().numpy()
            for row, i in enumerate(chosen):
                if self.spatial:
                    p = self.output_patch
                    height, width = grids[i].shape
                    rows, cols = -(-height // p), -(-(width + int(self.eos)) // p)
                    board = indices[row].reshape(-1, -(-batch.canvas_width // p), indices.shape[-1])
                    out[i] = board[:rows, :cols]  # [rows, cols, S]
                else:
                    out[i] = indices[row]  # [N, S]
        return [codes if codes.shape[-1] > 1 else codes[..., 0] for codes in out]

    def check_codes(self, codes, where: str):
        """``codes`` as an integer array ``[rows, cols, S]`` (spatial) or ``[N, S]`` (pooled), or
        a ValueError saying why they do not fit this model."""
        codes = np.asarray(codes)
        levels, dims = self.code_levels, 3 if self.spatial else 2
        array = codes if codes.ndim == dims else codes[..., None]
        expected = "[rows, cols]" if self.spatial else f"[{self.config.num_latents}]"
        if array.ndim != dims or array.shape[-1] != levels:
            raise ValueError(
                f"{where}: codes of shape {codes.shape} do not fit this model, which takes "
                f"{expected} codes{'' if levels == 1 else f' with {levels} indices each'}"
            )
        if not self.spatial and array.shape[0] != self.config.num_latents:
            raise ValueError(
                f"{where}: {array.shape[0]} codes, but this model has "
                f"{self.config.num_latents} latent slots per grid"
            )
        if self.spatial:
            limit = -(-MAX_GRID_SIZE // self.output_patch)
            limit_cols = -(-(MAX_GRID_SIZE + int(self.eos)) // self.output_patch)
            if array.shape[0] > limit or array.shape[1] > limit_cols or 0 in array.shape:
                raise ValueError(
                    f"{where}: a {array.shape[0]} x {array.shape[1]} board of patch codes does "
                    f"not describe a grid of at most {MAX_GRID_SIZE} x {MAX_GRID_SIZE} cells"
                )
        return check_code_indices(array, self.quantizer.codebook_size, where)

    @torch.no_grad()
    def decode_codes(self, codes: list, batch_size: int = 128) -> list:
        """Grids (numpy [H, W]) rebuilt from code arrays alone (shapes as :meth:`encode_grids`
        returns them); a ValueError names any code array that does not fit this model."""
        self.eval()
        arrays = [self.check_codes(c, f"grid {i}") for i, c in enumerate(codes)]
        device = next(self.parameters()).device
        out: list = [None] * len(arrays)
        for chosen in _similar_sizes([a.shape for a in arrays], batch_size):
            chunk = [arrays[i] for i in chosen]
            grids = (
                self._decode_board(chunk, device)
                if self.spatial
                else self._decode_pooled(chunk, device)
            )
            for i, grid in zip(chosen, grids, strict=True):
                out[i] = grid
        return out

    def _decode_pooled(self, chunk: list, device) -> list:
        return self._decode_slots(*self._slot_inputs(chunk, device))

    def _slot_inputs(self, chunk: list, device):
        """Pooled layout: code arrays ``[N, S]`` -> quantized [B, N, D], positions, padding."""
        indices = _squeeze(torch.as_tensor(np.stack(chunk), device=device).long())  # [B, N(, S)]
        quantized = self.quantizer.codes_to_quantized(indices)  # [B, N, D]
        batch, slots = quantized.shape[:2]
        positions = torch.zeros(batch, slots, 2, dtype=torch.long, device=device)
        padding = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        return quantized, positions, padding

    def _decode_board(self, chunk: list, device) -> list:
        return self._decode_patches(*self._board(chunk, device))

    def _board(self, chunk: list, device):
        """Spatial layout: the patch codes ``[rows, cols, S]`` on one board (top-left aligned),
        padding elsewhere -> quantized [B, rows * cols, D], padding [B, rows * cols], rows, cols."""
        rows = max(a.shape[0] for a in chunk)
        cols = max(a.shape[1] for a in chunk)
        levels = chunk[0].shape[-1]
        board = torch.zeros(len(chunk), rows, cols, levels, dtype=torch.long)
        padding = torch.ones(len(chunk), rows, cols, dtype=torch.bool)
        for b, array in enumerate(chunk):
            board[b, : array.shape[0], : array.shape[1]] = torch.as_tensor(array)
            padding[b, : array.shape[0], : array.shape[1]] = False
        indices = _squeeze(board.view(len(chunk), rows * cols, levels).to(device))
        quantized = self.quantizer.codes_to_quantized(indices)  # [B, rows * cols, D]
        return quantized, padding.view(len(chunk), -1).to(device), rows, cols

    def _patch_logits(self, quantized, padding, rows: int, cols: int):
        """Spatial layout: cell logits [B, (rows * p) * (cols * p), V] on the board's canvas,
        height and width logits, and the cell padding [B, L] (True outside a grid's patches)."""
        batch, p = quantized.shape[0], self.output_patch
        positions = grid_positions(rows, cols, quantized.device).expand(batch, -1, -1)
        cell_padding = padding.view(batch, rows, 1, cols, 1).expand(-1, -1, p, -1, p)
        cell_padding = cell_padding.reshape(batch, -1)
        cell_logits, height_logits, width_logits = self.decode(
            quantized, positions, padding, rows * p, cols * p, cell_padding
        )
        return cell_logits, height_logits, width_logits, cell_padding

    def _decode_patches(self, quantized, padding, rows: int, cols: int) -> list:
        """Spatial layout: decode each grid's patch codes ``[B, rows * cols, D]`` (``padding``
        True outside a grid), read its size by the model's rule, and crop. Cells of the predicted
        size that no patch of the grid covers are 0."""
        batch, p = quantized.shape[0], self.output_patch
        canvas_height, canvas_width = rows * p, cols * p
        cell_logits, height_logits, width_logits, cell_padding = self._patch_logits(
            quantized, padding, rows, cols
        )
        output = GridDVAEOutput(cell_logits, height_logits, width_logits, None, ~cell_padding)
        colours, sizes = self.predict(output, canvas_width)
        colours = colours.masked_fill(cell_padding, 0)
        return crop_grids(colours.view(batch, canvas_height, canvas_width), sizes)

    def _slot_logits(self, quantized, positions, padding, sizes: torch.Tensor):
        """Pooled layout: decode on the canvas of grids of ``sizes`` [B, 2] (the largest height x
        the largest width + EOS) -> cell logits [B, L, V], height and width logits, the canvas's
        height and width, and ``inside`` [B, L] (True at each grid's cells and EOS column)."""
        batch, eos = sizes.shape[0], int(self.eos)
        canvas_height, canvas_width = int(sizes[:, 0].max()), int(sizes[:, 1].max()) + eos
        rows = torch.arange(canvas_height, device=sizes.device).view(1, -1, 1)
        cols = torch.arange(canvas_width, device=sizes.device).view(1, 1, -1)
        inside = (rows < sizes[:, 0, None, None]) & (cols < sizes[:, 1, None, None] + eos)
        inside = inside.view(batch, -1)
        cell_logits, height_logits, width_logits = self.decode(
            quantized, positions, padding, canvas_height, canvas_width, ~inside
        )
        return cell_logits, height_logits, width_logits, canvas_height, canvas_width, inside

    def _decode_slots(self, quantized, positions, padding) -> list:
        """Pooled layout: the size heads read each grid's size off its codes; decode on a
        canvas of those sizes, then crop each grid."""
        height_logits, width_logits = self.predict_shape(self.code_projection(quantized), padding)
        sizes = torch.stack([height_logits.argmax(-1), width_logits.argmax(-1)], dim=-1) + 1
        cell_logits, _, _, canvas_height, canvas_width, _ = self._slot_logits(
            quantized, positions, padding, sizes
        )
        colours = cell_logits[..., : self.vocab.num_colours].argmax(-1)
        return crop_grids(colours.view(sizes.shape[0], canvas_height, canvas_width), sizes)

    # ------------------------------------------------------------------------- code lengths
    @torch.no_grad()
    def decoder_bits(
        self, grids: list[np.ndarray], codes: list[np.ndarray], batch_size: int = 128
    ) -> np.ndarray:
        """Per grid, ``-log2 p(grid | codes)`` in bits (float64 [N]): the decoder part of a
        two-part lossless code, under the decoder's own output distributions (softmax over all
        ``V`` tokens for a cell, over the 30 sizes for a size head) given the codes ``codes``
        (shapes as :meth:`encode_grids` returns them). Eval mode, no grad, float64 log-softmax.

        Every charged symbol is one a receiver holding only the codes can decode in turn with
        these same probabilities, so this is the length of a real code (up to the coder's few
        bits of overhead). The *true canvas* of a grid is its training target
        (:func:`~pips.data.batch.collate_grids`): its colours top-left, an EOS token closing
        each of its rows when ``self.eos``, PAD everywhere else. What is charged:

        - spatial layout, ``model.size_from=cells``: every cell of the ``rows * p x cols * p``
          canvas that :meth:`decode_codes` decodes a ``[rows, cols]`` code map on (``p`` =
          ``self.output_patch``), at its true-canvas token, PAD and EOS cells included; no size
          head. The model's size rule (:meth:`predict`) reads the true size back off the true
          canvas tokens (the rows whose first cell is not PAD; the first EOS, or PAD without
          EOS, in row 0), so the grid is recovered exactly.
        - spatial layout, size heads: ``-log2 p(height)`` and ``-log2 p(width)`` under the
          height and width heads, then only the ``height x (width + eos)`` cells of the grid's
          own rectangle and its EOS column (when ``self.eos``) on that same canvas.
        - pooled layout: the two size heads' ``-log2 p(height) - log2 p(width)``, then the cells
          of the ``height x (width + eos)`` canvas that :meth:`_decode_slots` decodes on, with
          the true size in place of the argmax size, EOS column included when ``self.eos``.

        A grid that its code map cannot hold (spatial: ``height > rows * p`` or
        ``width + eos > cols * p``) has no such code and raises a ValueError.
        """
        if len(grids) != len(codes):
            raise ValueError(f"{len(grids)} grids but {len(codes)} code arrays")
        was_training = self.training
        self.eval()
        try:
            return self._decoder_bits(grids, codes, batch_size)
        finally:
            self.train(was_training)

    def _decoder_bits(self, grids: list, codes: list, batch_size: int) -> np.ndarray:
        arrays = [self.check_codes(c, f"grid {i}") for i, c in enumerate(codes)]
        grids = [self._check_grid(g, f"grid {i}") for i, g in enumerate(grids)]
        if self.spatial:
            for i, (grid, array) in enumerate(zip(grids, arrays, strict=True)):
                self._check_fit(grid.shape, array, f"grid {i}")
            keys = [(*a.shape[:2], *g.shape) for a, g in zip(arrays, grids, strict=True)]
        else:
            keys = [g.shape for g in grids]
        device = next(self.parameters()).device
        bits = np.zeros(len(grids), dtype=np.float64)
        for chosen in _similar_sizes(keys, batch_size):
            chunk = [grids[i] for i in chosen]
            sizes = torch.tensor([g.shape for g in chunk], dtype=torch.long, device=device)
            log_probs, height_logits, width_logits, charged = self._charged_log_probs(
                [arrays[i] for i in chosen], sizes, device
            )
            # the training targets on this canvas: colours, EOS closing each row, PAD elsewhere
            targets = self.true_canvas(chunk, log_probs.shape[1:3]).view(len(chosen), -1)
            log_probs = log_probs.flatten(1, 2).gather(-1, targets.to(device).unsqueeze(-1))
            log_probs = log_probs.squeeze(-1)  # [B, L]
            charged = charged.flatten(1)
            nats = -torch.where(charged, log_probs, torch.zeros_like(log_probs)).sum(dim=1)
            if not self.sizes_from_cells:
                for axis, logits in enumerate((height_logits, width_logits)):
                    head = F.log_softmax(logits.double(), dim=-1)
                    nats = nats - head.gather(1, sizes[:, axis : axis + 1] - 1).squeeze(1)
            bits[chosen] = (nats / math.log(2.0)).cpu().numpy()
        return bits

    def _charged_log_probs(self, arrays: list, sizes: torch.Tensor | None, device):
        """Code arrays (checked) of one batch and the grids' sizes [B, 2] (unused, may be None,
        with ``size_from=cells``) -> the decoder's float64 cell log-probabilities [B, H, W, V] on
        the batch's canvas, its height and width logits [B, 30], and ``charged`` [B, H, W]: the
        cells the decoder part codes (see :meth:`decoder_bits`)."""
        eos = int(self.eos)
        if self.spatial:
            quantized, padding, rows, cols = self._board(arrays, device)
            cell_logits, height_logits, width_logits, cell_padding = self._patch_logits(
                quantized, padding, rows, cols
            )
            canvas_height, canvas_width = rows * self.output_patch, cols * self.output_patch
            if self.sizes_from_cells:  # every cell of the grid's own code patches
                charged = ~cell_padding
            else:  # the grid's rectangle and its EOS column
                row = torch.arange(canvas_height, device=device).view(1, -1, 1)
                col = torch.arange(canvas_width, device=device).view(1, 1, -1)
                charged = (row < sizes[:, 0, None, None]) & (col < sizes[:, 1, None, None] + eos)
        else:
            inputs = self._slot_inputs(arrays, device)
            cell_logits, height_logits, width_logits, canvas_height, canvas_width, charged = (
                self._slot_logits(*inputs, sizes)
            )
        shape = (len(arrays), canvas_height, canvas_width, -1)
        log_probs = F.log_softmax(cell_logits.double(), dim=-1).view(shape)
        return log_probs, height_logits, width_logits, charged.reshape(shape[:3])

    def true_canvas(self, grids: list, canvas: tuple[int, int]) -> torch.Tensor:
        """The decoder's targets for ``grids`` on a ``canvas = (height, width)`` canvas (width
        counting the EOS column): [B, height, width] long, as the training batch has them
        (:func:`~pips.data.batch.collate_grids`): colours top-left, EOS closing each grid row
        when ``self.eos``, PAD elsewhere."""
        height, width = int(canvas[0]), int(canvas[1])
        tokens = collate_grids(
            grids, eos=self.eos, vocab=self.vocab, canvas_size=(height, width - int(self.eos))
        ).tokens
        return tokens.view(len(grids), height, width)

    def _check_fit(self, shape, array: np.ndarray, where: str) -> None:
        """Spatial layout: a ValueError unless a grid of ``shape`` fits its code map's canvas."""
        p, eos = self.output_patch, int(self.eos)
        height, width = shape
        if height > array.shape[0] * p or width + eos > array.shape[1] * p:
            raise ValueError(
                f"{where}: a {height} x {width} grid does not fit the "
                f"{array.shape[0] * p} x {array.shape[1] * p} canvas of its "
                f"{array.shape[0]} x {array.shape[1]} code map"
            )

    # -------------------------------------------------------------------- range coding
    # The pieces a range coder needs (pips.models.range_coding): the receiver, holding one
    # grid's codes, computes the same float64 distributions as the sender, one grid at a time.

    @torch.no_grad()
    def decoder_distribution(self, codes, size: tuple[int, int] | None = None) -> GridCoding:
        """The decoder's distributions for one grid's ``codes`` (shapes as :meth:`encode_grids`
        gives them), the ones :meth:`decoder_bits` charges, computed for this grid alone (batch
        of one; eval mode, no grad, float64 log-softmax), so a sender and a receiver holding only
        the codes get them bit for bit alike:

        - ``size_from=cells``: ``cells`` on the code map's whole canvas, all charged; no heads
          (``size`` is not needed and is ignored).
        - size heads: the height and width heads' log-probabilities (class ``h - 1`` = ``h``),
          always computed the same way (code projection, then the size head) whatever ``size``
          is; with ``size = (height, width)`` also ``cells`` and ``charged`` (the grid's
          rectangle and its EOS column), which the receiver builds after decoding the size.
        """
        was_training = self.training
        self.eval()
        try:
            array = self.check_codes(codes, "codes")
            device = next(self.parameters()).device
            if self.sizes_from_cells:
                log_probs, _, _, charged = self._charged_log_probs([array], None, device)
                return GridCoding(None, None, log_probs[0].cpu().numpy(), charged[0].cpu().numpy())
            if self.spatial:
                quantized, padding, _, _ = self._board([array], device)
            else:
                quantized, _, padding = self._slot_inputs([array], device)
            heads = self.predict_shape(self.code_projection(quantized), padding)
            height, width = (F.log_softmax(h[0].double(), -1).cpu().numpy() for h in heads)
            if size is None:
                return GridCoding(height, width, None, None)
            size = (int(size[0]), int(size[1]))
            if not all(1 <= v <= MAX_GRID_SIZE for v in size):
                raise ValueError(f"a grid size must lie in 1..{MAX_GRID_SIZE}; got {size}")
            if self.spatial:
                self._check_fit(size, array, "codes")
            sizes = torch.tensor([size], dtype=torch.long, device=device)
            log_probs, _, _, charged = self._charged_log_probs([array], sizes, device)
            return GridCoding(height, width, log_probs[0].cpu().numpy(), charged[0].cpu().numpy())
        finally:
            self.train(was_training)

    def grid_from_canvas(self, tokens, size: tuple[int, int] | None = None) -> np.ndarray:
        """A receiver's grid from the decoded canvas ``tokens`` [H, W] (PAD at cells not coded):
        with ``size_from=cells`` the size by the model's own rule (:meth:`sizes_from_tokens`,
        every canvas cell covered), else the decoded head ``size``; then the top-left crop."""
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        if self.sizes_from_cells:
            covered = torch.ones_like(tokens, dtype=torch.bool)
            sizes = self.sizes_from_tokens(tokens[None], covered[None])
        elif size is None:
            raise ValueError("the size heads' decoded size is needed to crop the canvas")
        else:
            sizes = torch.tensor([[int(size[0]), int(size[1])]])
        return crop_grids(tokens[None], sizes)[0]

    def _check_grid(self, grid, where: str) -> np.ndarray:
        """``grid`` as an [H, W] int64 array of colours, at most 30 x 30, or a ValueError."""
        grid = np.asarray(grid)
        if grid.ndim != 2 or 0 in grid.shape or max(grid.shape) > MAX_GRID_SIZE:
            raise ValueError(
                f"{where}: a grid must be a 2-D array of 1 to {MAX_GRID_SIZE} cells per side; "
                f"got shape {grid.shape}"
            )
        if not np.issubdtype(grid.dtype, np.integer):
            raise ValueError(f"{where}: grid cells must be integer colours; got {grid.dtype}")
        if grid.min() < 0 or grid.max() >= self.vocab.num_colours:
            raise ValueError(
                f"{where}: colours must lie in 0..{self.vocab.num_colours - 1}; got "
                f"{int(grid.min())}..{int(grid.max())}"
            )
        return grid.astype(np.int64)


def _squeeze(indices: torch.Tensor) -> torch.Tensor:
    return indices[..., 0] if indices.shape[-1] == 1 else indices


def _similar_sizes(shapes: list, batch_size: int):
    """Indices of items in batches of similar shape (less padding), every item once."""
    order = sorted(range(len(shapes)), key=lambda i: (tuple(shapes[i]), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def crop_grids(boards: torch.Tensor, sizes: torch.Tensor) -> list:
    """Boards [B, H, W] of colours -> each grid (numpy) at its size [B, 2] (zeros past the
    board)."""
    grids = []
    for board, (height, width) in zip(boards.cpu().numpy(), sizes.tolist(), strict=True):
        grid = np.zeros((height, width), dtype=np.int64)
        h, w = min(height, board.shape[0]), min(width, board.shape[1])
        grid[:h, :w] = board[:h, :w]
        grids.append(grid)
    return grids
