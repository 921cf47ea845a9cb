"""Code-usage metrics that add up over batches and across DDP ranks.

Every task counts its validation codes with :class:`CodeUsage`, a torchmetrics ``Metric``: its
states are the flat (slot, code) ids seen and a few counts, concatenated or summed across ranks
when computed, so validation can be split over the ranks of a distributed run and still give the
numbers one process would give on the same items.

Perplexity is ``2 ** H`` of the empirical code usage (H in bits): per slot (pooled codes: slot n
means the same thing in every item; spatial codes: one slot per level) then averaged, and over
all codes pooled. ``bits_per_item`` is the code string's capacity (codes x log2 K);
``code_entropy_bits`` the empirical entropy of the codes used (per-slot entropies summed over an
item's codes: an upper bound on what the codes carry).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``2 ** entropy_bits`` of the usage distribution(s) in ``counts [..., K]`` -> ``[...]``."""
    counts = counts.double()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1)
    return entropy.exp2()


class CodeUsage(Metric):
    """Usage of the codes of ``indices [B, N]`` (or ``[B, N, S]``: S indices per latent, for
    residual / group quantizers) over the items of a validation set.

    ``slotted``: latent n means the same slot in every item (pooled layout), so usage is counted
    per (slot, level); otherwise (spatial codes) per level over all positions. Counted by sorting
    ids, never as a dense ``[slots, K]`` histogram, so codebooks of 8^8 or 2^48 codes work.
    """

    full_state_update = False

    def __init__(self, codebook_size: int, slotted: bool, **kwargs):
        super().__init__(**kwargs)
        self.codebook_size = int(codebook_size)
        self.slotted = slotted
        self.add_state("ids", default=[], dist_reduce_fx="cat")  # slot * K + code, flat
        self.add_state("items", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("codes", default=torch.tensor(0), dist_reduce_fx="sum")  # indices counted
        self.add_state("slots", default=torch.tensor(0), dist_reduce_fx="max")

    def update(self, indices: torch.Tensor | None, padding: torch.Tensor | None = None) -> None:
        if indices is None or self.codebook_size < 2:
            return
        if indices.dim() == 2:
            indices = indices.unsqueeze(-1)  # [B, N, S]
        batch, num_latents, levels = indices.shape
        keep = torch.ones(batch, num_latents, dtype=torch.bool, device=indices.device)
        if padding is not None:
            keep = ~padding
        slot_count = num_latents * levels if self.slotted else levels
        slot_ids = torch.arange(slot_count, device=indices.device).view(
            1, num_latents if self.slotted else 1, levels
        )
        slot_ids = slot_ids.expand(batch, num_latents, levels)[keep]  # [M, S]
        self.ids.append((slot_ids * self.codebook_size + indices[keep]).reshape(-1).long())
        self.items += batch
        self.codes += keep.sum() * levels
        self.slots = torch.maximum(self.slots, torch.tensor(slot_count, device=self.slots.device))

    def compute(self) -> dict[str, float]:
        items = max(int(self.items), 1)
        bits = float(self.codes) * math.log2(max(self.codebook_size, 1)) / items
        ids = self.ids if isinstance(self.ids, torch.Tensor) else None
        if ids is None and self.ids:
            ids = torch.cat(self.ids)
        if ids is None or ids.numel() == 0:
            return {"bits_per_item": bits, "codebook_perplexity": float("nan"), "codes_used": 0.0}
        num_slots = int(self.slots)
        ids, counts = torch.unique(ids.cpu(), return_counts=True)
        slots, codes = ids // self.codebook_size, ids % self.codebook_size
        counts = counts.double()
        slot_totals = torch.zeros(num_slots, dtype=torch.float64).index_add_(0, slots, counts)
        probs = counts / slot_totals[slots]
        slot_entropy = torch.zeros(num_slots, dtype=torch.float64).index_add_(
            0, slots, -probs * probs.log2()
        )
        # each code index carries at most its slot's entropy; an item has codes / items of them
        mean_entropy = float((slot_entropy * slot_totals).sum() / slot_totals.sum().clamp_min(1))
        distinct, code_of_id = torch.unique(codes, return_inverse=True)
        code_counts = torch.zeros(len(distinct), dtype=torch.float64).index_add_(
            0, code_of_id, counts
        )
        return {
            "bits_per_item": bits,
            "codebook_perplexity": float(slot_entropy.exp2().mean()),
            "code_entropy_bits": mean_entropy * float(self.codes) / items,
            "codebook_perplexity_all": float(perplexity(code_counts)),
            "codes_used": float(len(code_counts)),
            "dead_codes": float(self.codebook_size - len(code_counts)),
        }


def code_metrics(usage: CodeUsage, unit: str) -> dict[str, float]:
    """``usage.compute()`` with ``bits_per_item`` named for the task's unit (bits_per_grid...)."""
    values = usage.compute()
    values[f"bits_per_{unit.removesuffix('s')}"] = values.pop("bits_per_item")
    return values


__all__ = ["CodeUsage", "code_metrics", "perplexity"]
