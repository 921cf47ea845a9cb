"""Reconstruction and codebook metrics, accumulated over a validation set.

Cell accuracy counts the grid's own colour cells only (never PAD or EOS); a grid is exact when its
predicted size is right and every cell is right. Perplexity is ``2 ** H`` of the empirical code
usage (H in bits), per latent slot and over all codes.

Bits: ``bits_per_grid`` is the code string's capacity (codes x log2 K); ``code_entropy_bits``
the empirical entropy of the codes actually used (per-slot entropies summed over a grid's codes:
an upper bound on what the codes carry); ``data_bits_per_grid`` the grids' own zlib size in bits
(a rough estimate of their information). A bottleneck tighter than the data shows as
``code_entropy_bits < data_bits_per_grid``.
"""

from __future__ import annotations

import math

import torch


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``2 ** entropy_bits`` of the usage distribution(s) in ``counts [..., K]`` -> ``[...]``."""
    counts = counts.double()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1)
    return entropy.exp2()


class ReconstructionMetrics:
    """Sums over batches: cells right, grids exact, sizes right, code usage per slot."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.cells_correct = 0
        self.cells_total = 0
        self.grids_exact = 0
        self.sizes_correct = 0
        self.grids_total = 0
        self.code_bits_total = 0.0
        self.code_ids: list[torch.Tensor] = []  # flat (slot * K + code) ids, one tensor a batch
        self.num_slots = 0
        self.codes_total = 0  # code indices over all grids (latents x levels)
        self.data_bits_total = 0.0

    def update(
        self,
        colours: torch.Tensor,  # [B, L] predicted colours
        sizes: torch.Tensor,  # [B, 2] predicted sizes
        targets: torch.Tensor,  # [B, L]
        grid_mask: torch.Tensor,  # [B, L] True on colour cells
        shapes: torch.Tensor,  # [B, 2]
        indices: torch.Tensor | None,  # [B, N] or [B, N, S]
        latent_padding: torch.Tensor | None,  # [B, N]
        slotted: bool,  # True when slot n means the same thing in every grid (pooled layout)
    ) -> None:
        right = (colours == targets) & grid_mask
        cells_right_per_grid = right.sum(-1)
        cells_per_grid = grid_mask.sum(-1)
        size_right = (sizes == shapes).all(-1)
        self.cells_correct += int(cells_right_per_grid.sum())
        self.cells_total += int(cells_per_grid.sum())
        self.sizes_correct += int(size_right.sum())
        self.grids_exact += int((size_right & (cells_right_per_grid == cells_per_grid)).sum())
        self.grids_total += int(targets.shape[0])
        self.data_bits_total += _data_bits(targets, grid_mask, shapes)
        if indices is None or self.codebook_size < 2:
            return
        if indices.dim() == 2:
            indices = indices.unsqueeze(-1)  # [B, N, S]
        batch, num_latents, levels = indices.shape
        keep = torch.ones(batch, num_latents, dtype=torch.bool, device=indices.device)
        if latent_padding is not None:
            keep = ~latent_padding
        self.code_bits_total += float(keep.sum()) * levels * math.log2(self.codebook_size)
        self.codes_total += int(keep.sum()) * levels
        if slotted:
            slot_ids = torch.arange(num_latents * levels, device=indices.device).view(
                1, num_latents, levels
            )
        else:
            slot_ids = torch.arange(levels, device=indices.device).view(1, 1, levels)
        slot_ids = slot_ids.expand(batch, num_latents, levels)[keep]  # [M, S]
        codes = indices[keep]  # [M, S]
        self.num_slots = num_latents * levels if slotted else levels
        self.code_ids.append((slot_ids * self.codebook_size + codes).reshape(-1).cpu())

    def compute(self) -> dict[str, float]:
        out = {
            "cell_accuracy": self.cells_correct / max(self.cells_total, 1),
            "grid_accuracy": self.grids_exact / max(self.grids_total, 1),
            "size_accuracy": self.sizes_correct / max(self.grids_total, 1),
            "bits_per_grid": self.code_bits_total / max(self.grids_total, 1),
            "data_bits_per_grid": self.data_bits_total / max(self.grids_total, 1),
            "grids": float(self.grids_total),
        }
        if self.code_ids:
            # counted by sorting: a dense [slots, K] histogram is too big for K = 8^8 FSQ codes
            ids, counts = torch.unique(torch.cat(self.code_ids), return_counts=True)
            slots, codes = ids // self.codebook_size, ids % self.codebook_size
            slot_totals = torch.zeros(self.num_slots, dtype=torch.float64).index_add_(
                0, slots, counts.double()
            )
            probs = counts.double() / slot_totals[slots]
            slot_entropy = torch.zeros(self.num_slots, dtype=torch.float64).index_add_(
                0, slots, -probs * probs.log2()
            )
            out["codebook_perplexity"] = float(slot_entropy.exp2().mean())
            # each code index carries at most its slot's entropy; a grid has codes_total / G
            slot_uses = slot_totals.clamp_min(1.0)
            mean_entropy = float((slot_entropy * slot_totals).sum() / slot_uses.sum())
            out["code_entropy_bits"] = mean_entropy * self.codes_total / max(self.grids_total, 1)
            distinct_codes, code_of_id = torch.unique(codes, return_inverse=True)
            code_counts = torch.zeros(len(distinct_codes), dtype=torch.float64).index_add_(
                0, code_of_id, counts.double()
            )
            out["codebook_perplexity_all"] = float(perplexity(code_counts))
            out["codes_used"] = float(len(code_counts))
            out["dead_codes"] = float(self.codebook_size - len(code_counts))
        else:
            out["codebook_perplexity"] = float("nan")
        return out


def _data_bits(targets: torch.Tensor, grid_mask: torch.Tensor, shapes: torch.Tensor) -> float:
    """Sum of the grids' zlib sizes in bits (see :func:`pips.data.arc.grid_information_bits`)."""
    from pips.data.arc import grid_information_bits

    total = 0.0
    cells = targets.cpu()
    mask = grid_mask.cpu()
    for row, (height, width) in enumerate(shapes.tolist()):
        total += grid_information_bits(cells[row][mask[row]].view(height, width).numpy())
    return total
