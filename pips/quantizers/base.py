"""The Quantizer contract shared by every quantizer in this package.

A quantizer is an ``nn.Module`` whose ``forward(z, **schedule_values)`` takes ``z: [..., dim]`` and
returns a :class:`QuantizerOutput`. Scheduled values (temperature, hardness, noise scale) are keyword
arguments, never hidden step counters: the trainer owns time. A trainer may pass every value of
:data:`SCHEDULE_VALUES` to whichever quantizer it holds (each uses those it knows); any other
keyword is refused, so a misspelled schedule name fails instead of being silently ignored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

DEAD_CODES_STAT_THRESHOLD = 1e-2  # share of the uniform usage below which stats call a code dead


class QuantizerOutput(NamedTuple):
    """What every quantizer returns (a NamedTuple, so tuple unpacking works)."""

    quantized: torch.Tensor  # same shape as z: [..., dim]
    indices: torch.Tensor | None  # [...] or [..., levels] for residual/group; None for identity
    loss: torch.Tensor  # scalar, the weighted auxiliary loss (0 when there is none)
    logits: torch.Tensor | None  # [..., codebook_size] for the probabilistic quantizers, else None
    stats: dict[str, torch.Tensor]  # detached scalars for logging: perplexity, used_codes, ...


#: the scheduled values any quantizer's forward accepts as keyword arguments
SCHEDULE_VALUES = frozenset({"temperature", "hardness", "noise_scale"})


class Quantizer(nn.Module):
    """Base class: subclasses set ``codebook_size`` and implement ``forward`` and
    ``codes_to_quantized``."""

    codebook_size: int = 0

    def __call__(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        unknown = schedule_values.keys() - SCHEDULE_VALUES
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown schedule value(s) "
                f"{', '.join(sorted(unknown))}; quantizers take {', '.join(sorted(SCHEDULE_VALUES))}"
            )
        return super().__call__(z, **schedule_values)

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        raise NotImplementedError

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        """Map code indices back to the quantized vectors ``[..., dim]`` that ``forward`` returns."""
        raise NotImplementedError

    @property
    def bits_per_code(self) -> float:
        """Bits carried by one index: log2 of the number of distinct codes."""
        return math.log2(self.codebook_size) if self.codebook_size > 1 else 0.0

    @property
    def index_factors(self) -> list[tuple[int, int]]:
        """How an index is made of digits: ``(radix, weight)`` pairs with ``index = sum(digit *
        weight)``, ``0 <= digit < radix``, in the quantizer's own factor order. One factor (the
        whole codebook) unless the codebook is a product (FSQ channels, LFQ bits, Gumbel
        factors); a code prior splits large indices along these factors without loss."""
        return [(int(self.codebook_size), 1)]


def check_code_indices(indices, codebook_size: int, where: str):
    """``indices`` (a numpy array) as integer code indices inside a codebook of
    ``codebook_size`` codes, or a ValueError that names the first bad one."""
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{where}: codes must be integers; got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= codebook_size):
        bad = int(indices.min()) if indices.min() < 0 else int(indices.max())
        raise ValueError(
            f"{where}: code index {bad} is out of range; this model's codebook has "
            f"{codebook_size} codes (0 to {codebook_size - 1})"
        )
    return indices


def usage_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Perplexity (2 ** entropy in bits) and number of distinct codes of a batch of indices.

    Counts by sorting when the codebook is much larger than the batch (FSQ with 8^8 codes): a
    histogram over every code would cost more than the model's step.
    """
    # the indices of non-finite latents are garbage (NaN cast to long): clamped, so counting
    # cannot crash and the NaN reaches the loss, where the run's guard stops it with a sentence
    flat = indices.reshape(-1).clamp(0, max(codebook_size - 1, 0))
    if codebook_size > 4 * flat.numel():
        counts = torch.unique(flat, return_counts=True)[1].float()
    else:
        counts = torch.bincount(flat, minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy_bits = -(probs * torch.log2(probs.clamp_min(1e-12))).sum()
    return {
        "perplexity": entropy_bits.exp2().detach(),
        "used_codes": (counts > 0).sum().float().detach(),
    }


def perplexity_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """Perplexity of the distribution ``counts / counts.sum(-1)``, ``counts: [..., K]`` -> ``[...]``."""
    counts = counts.float()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
    return (-(probs * torch.log2(probs.clamp_min(1e-12))).sum(-1)).exp2()


def counts_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`usage_stats` from code counts ``[H, K]`` (H codebooks), averaged over codebooks."""
    return {
        "perplexity": perplexity_of_counts(counts).mean().detach(),
        "used_codes": (counts > 0).sum(-1).float().mean().detach(),
    }


def linear_projections(dim: int, channels: int) -> tuple[nn.Module, nn.Module]:
    """Linear maps ``dim -> channels`` and back, for quantizers whose codes have ``channels``
    entries in a model of ``dim`` features; two identities when the sizes agree."""
    if dim == channels:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, channels), nn.Linear(channels, dim)


@torch.no_grad()
def nearest_code_indices(
    flat: torch.Tensor, codebook: torch.Tensor, owner: nn.Module | None = None
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for each input, ``[N, dim]``, ``[K, dim]`` -> ``[N]``.

    ``argmin_k ||z - e_k||^2 = argmax_k (z.e_k - ||e_k||^2 / 2)``, computed as one matrix product of
    ``[z, 1]`` with ``[e_k, -||e_k||^2 / 2]``: the norms ride in the GEMM, so there is neither an
    ``[N, K, dim]`` difference nor a separate pass over the ``[N, K]`` scores to add them. With an
    ``owner`` module the ``[N, K]`` scores on CPU go to a buffer it keeps between calls: a fresh
    32 MiB tensor each step (N = 16k, K = 512) costs page faults worth a third of the search.
    """
    ones = flat.new_ones(flat.shape[0], 1)
    half_sq_norms = codebook.pow(2).sum(-1, keepdim=True) / 2  # [K, 1]
    augmented = torch.cat([flat, ones], -1)  # [N, dim + 1]
    codes = torch.cat([codebook, -half_sq_norms], -1).t()  # [dim + 1, K]
    if owner is None or flat.device.type != "cpu":
        return (augmented @ codes).argmax(-1)  # [N, K] -> [N]
    return torch.mm(augmented, codes, out=_scores_buffer(owner, flat.shape[0], codes)).argmax(-1)


def _scores_buffer(owner: nn.Module, rows: int, codes: torch.Tensor) -> torch.Tensor:
    """A ``[rows, K]`` view of a buffer ``owner`` keeps (grown when a batch is larger)."""
    size = rows * codes.shape[1]
    buffer = getattr(owner, "_scores_buffer", None)
    if buffer is None or buffer.dtype != codes.dtype or buffer.numel() < size:
        buffer = torch.empty(size, dtype=codes.dtype)
        owner._scores_buffer = buffer  # a plain attribute: not state, not saved
    return buffer[:size].view(rows, codes.shape[1])


@torch.no_grad()
def sample_codes(data: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct rows of each ``data[h]`` (with repeats when there are fewer), as initial
    codes: ``[H, N, dim]`` -> ``[H, size, dim]``.

    The draws depend on ``N``, which may differ across ranks, so they come from a child generator:
    ``generator`` advances by one fixed draw and stays in step on every rank.
    """
    heads, num_inputs, _ = data.shape
    seed = int(torch.randint(2**62, (1,), generator=generator))
    child = torch.Generator().manual_seed(seed)
    if num_inputs >= size:
        picks = torch.rand(heads, num_inputs, generator=child).argsort(-1)[:, :size]  # [H, K]
    else:
        picks = torch.randint(num_inputs, (heads, size), generator=child)
    head_index = torch.arange(heads).unsqueeze(1)  # [H, 1]
    return data[head_index.to(data.device), picks.to(data.device)]  # [H, K, dim]


def broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    """Overwrite ``tensors`` in place with rank 0's values when torch.distributed runs."""
    if distributed_world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def update_usage_ema(ema_count: torch.Tensor, counts: torch.Tensor, decay: float) -> None:
    """``ema_count <- decay * ema_count + (1 - decay) * counts``, in place (code usage per batch)."""
    ema_count.mul_(decay).add_(counts, alpha=1 - decay)


def dead_code_mask(ema_count: torch.Tensor, threshold: float) -> torch.Tensor:
    """Codes used less than ``threshold`` times the uniform share ``sum / K`` of the EMA counts
    ``[..., K]``: the same codes are dead at any batch size."""
    uniform_share = ema_count.sum(-1, keepdim=True) / ema_count.shape[-1]
    return ema_count < threshold * uniform_share


# --- torch.distributed helpers: the decision to communicate is made at call time ---------------


def distributed_world_size() -> int:
    """World size of the default process group, or 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_stack(tensor: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` (same shape on every rank) from all ranks: ``[...]`` -> ``[world, ...]``."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


# --- straight-through estimator fused with the commitment loss ------------------------------


class _StraightThroughCommitment(torch.autograd.Function):
    """Forward: ``(codes, mean((inputs - codes)^2))``; backward: identity from the first output to
    ``inputs`` plus ``2 (inputs - codes) / numel`` from the second. ``codes`` gets no gradient."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, codes: torch.Tensor):
        difference = inputs - codes
        ctx.save_for_backward(difference)
        flat_difference = difference.reshape(-1)
        commitment = torch.dot(flat_difference, flat_difference) / flat_difference.numel()
        return codes.view_as(codes), commitment

    @staticmethod
    def backward(ctx, grad_quantized: torch.Tensor | None, grad_commitment: torch.Tensor | None):
        (difference,) = ctx.saved_tensors
        if grad_quantized is None:
            grad_quantized = torch.zeros_like(difference)
        if grad_commitment is None:
            return grad_quantized, None
        scale = grad_commitment * (2.0 / difference.numel())
        return torch.addcmul(grad_quantized, difference, scale), None


def straight_through_with_commitment(
    inputs: torch.Tensor, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantized, commitment)``: ``quantized`` has exactly the value of ``codes`` and the gradient
    of ``inputs`` (straight-through, van den Oord et al. 2017, Eq. 3); ``commitment`` is
    ``mean((inputs - sg[codes])^2)``. Same result as ``codes + (inputs - inputs.detach())`` and
    ``F.mse_loss(inputs, codes.detach())``, in one pass over the tensors forward and backward."""
    return _StraightThroughCommitment.apply(inputs, codes.detach())
