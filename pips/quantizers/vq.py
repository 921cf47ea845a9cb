"""Vector quantization with an EMA codebook, codes initialised from data and dead-code resets.

van den Oord et al. 2017, "Neural Discrete Representation Learning" (VQ-VAE): nearest code by squared
L2, straight-through gradient (Eq. 3), codebook trained by EMA (Appendix A.1, Eq. 6-8, with Laplace
smoothing of the counts as in Sonnet) or by the codebook loss ``||sg[z] - e||^2``, plus the
commitment loss ``beta ||z - sg[e]||^2``. Dead codes are re-initialised from current inputs as in
Dhariwal et al. 2020 (Jukebox). ``cosine=True`` uses l2-normalised inputs and codes (Yu et al.
2022, ViT-VQGAN). ``rotation_trick=True`` replaces the straight-through gradient by the rotation
trick (Fifty et al. 2024; :mod:`pips.quantizers.rotation`).

The defaults work as a drop-in for features of any scale: the codes start as samples of the first
training batch (a Gaussian codebook far from small features collapses to a few codes that win every
input) and codes used less than 0.3 times the uniform share are re-seeded from current inputs
(0.1 took ~230 steps at decay 0.99 to notice codes the encoder left behind: 7-16% of 256 codes were
in use after 200 steps of ``benchmarks/dropin.py``, against 92-94% at 0.3, and the same 97-99% at
600 steps).

``num_codebooks=H`` holds ``H`` independent codebooks applied to ``z: [..., H, dim]`` in one batched
computation (used by :class:`~pips.quantizers.group.GroupVQ`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pips.quantizers.base import (
    DEAD_CODES_STAT_THRESHOLD,
    Quantizer,
    QuantizerOutput,
    all_gather_stack,
    counts_stats,
    dead_code_mask,
    distributed_world_size,
    nearest_code_indices,
    perplexity_of_counts,
    sample_codes,
    straight_through_with_commitment,
    update_usage_ema,
)
from pips.quantizers.rotation import rotation_trick_with_commitment

RESET_STRATEGIES = ("usage", "distance")
CODEBOOK_INITS = ("sample", "kmeans", "gaussian")


class VectorQuantizer(Quantizer):
    """Nearest-neighbour vector quantizer with a straight-through gradient.

    Args:
        dim: feature size of ``z``.
        codebook_size: number of codes ``K`` (per codebook).
        ema_decay: EMA decay of the codebook statistics; ``None`` trains the codebook by gradient
            through the codebook loss instead (the codebook is then an ``nn.Parameter``).
        commitment_weight: ``beta`` of the commitment loss.
        codebook_weight: weight of the codebook loss (only when ``ema_decay is None``).
        cosine: l2-normalise inputs and codes and match by cosine similarity.
        num_codebooks: ``H`` independent codebooks; ``forward`` then expects ``z: [..., H, dim]``.
        epsilon: Laplace smoothing of the EMA counts.
        codebook_init: where the codes start, on the first training batch: ``"sample"`` (default)
            draws ``K`` of its vectors, ``"kmeans"`` runs k-means on it (k-means++ seeding, then
            Lloyd; better codes, but seconds for K in the thousands on CPU), ``"gaussian"`` keeps the
            unit-Gaussian draw (far from features of another scale: the codebook collapses).
        kmeans_iters: Lloyd iterations of that k-means.
        dead_code_threshold: a code is dead when its EMA usage falls below this fraction of the
            uniform share (``ema_count[k] < threshold * sum(ema_count) / K``, the same at any batch
            size); dead codes are re-initialised from current inputs (``None``: off). It also
            defines ``stats["dead_codes"]`` (``1e-2`` when resets are off).
        reset_strategy: ``"usage"`` replaces them by random current inputs, ``"distance"`` by the
            current inputs with the largest quantisation error.
        overused_threshold: codes whose EMA usage exceeds this multiple of the uniform share ``1/K``
            are re-initialised the same way (``None``: off).
        rotation_trick: pass the gradient to ``z`` by the rotation trick (Fifty et al. 2024)
            instead of straight-through; the forward value is the code either way.
        sync_distributed: reduce EMA statistics and reset candidates across ranks when
            ``torch.distributed`` is initialised at call time (training only).
        seed: seeds the codebook initialisation, k-means and random resets.

    Buffers ``ema_count [H, K]`` and ``ema_sum [H, K, dim]`` hold the EMA statistics; under DDP
    every rank computes the same update, so the codebooks stay identical without broadcasting.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        ema_decay: float | None = 0.99,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        cosine: bool = False,
        num_codebooks: int = 1,
        epsilon: float = 1e-5,
        codebook_init: str = "sample",
        kmeans_iters: int = 10,
        dead_code_threshold: float | None = 0.3,
        reset_strategy: str = "usage",
        overused_threshold: float | None = None,
        rotation_trick: bool = False,
        sync_distributed: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"VectorQuantizer codebook_size must be >= 1; got {codebook_size}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(
                f"VectorQuantizer ema_decay must be in [0, 1), or None for a codebook loss; got {ema_decay}"
            )
        if reset_strategy not in RESET_STRATEGIES:
            raise ValueError(
                f"VectorQuantizer reset_strategy must be one of {', '.join(RESET_STRATEGIES)}; "
                f"got {reset_strategy!r}"
            )
        if codebook_init not in CODEBOOK_INITS:
            raise ValueError(
                f"VectorQuantizer codebook_init must be one of {', '.join(CODEBOOK_INITS)}; "
                f"got {codebook_init!r}"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.codebook_init = codebook_init
        self.ema_decay = ema_decay
        self.usage_decay = ema_decay if ema_decay is not None else 0.99
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.cosine = cosine
        self.epsilon = epsilon
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.reset_strategy = reset_strategy
        self.overused_threshold = overused_threshold
        self.rotation_trick = rotation_trick
        self.sync_distributed = sync_distributed

        self.generator = torch.Generator().manual_seed(seed)
        codebooks = torch.randn(num_codebooks, codebook_size, dim, generator=self.generator)
        if cosine:
            codebooks = F.normalize(codebooks, dim=-1)
        if ema_decay is None:
            self.codebooks = nn.Parameter(codebooks)  # [H, K, dim]
        else:
            self.register_buffer("codebooks", codebooks)  # [H, K, dim]
            self.register_buffer("ema_sum", codebooks.clone())  # [H, K, dim]
        self.register_buffer("ema_count", torch.ones(num_codebooks, codebook_size))  # [H, K]
        from_data = codebook_init != "gaussian"
        self.register_buffer("initialized", torch.tensor(not from_data))
        offsets = torch.arange(num_codebooks) * codebook_size
        self.register_buffer("_offsets", offsets, persistent=False)  # [H]
        self._initialized_known = not from_data  # Python mirror of `initialized`, avoids a sync

    @property
    def codebook(self) -> torch.Tensor:
        """The codes: ``[K, dim]``, or ``[H, K, dim]`` with several codebooks."""
        return self.codebooks[0] if self.num_codebooks == 1 else self.codebooks

    # --- forward -------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        batch_shape = self._check_shape(z)
        heads, dim = self.num_codebooks, self.dim
        with torch.autocast(device_type=z.device.type, enabled=False):
            inputs = z.float()
            if self.cosine:
                inputs = F.normalize(inputs, dim=-1)
            flat = inputs.reshape(-1, heads, dim)  # [N, H, dim]
            if self.training and not self._initialized_known:
                self._maybe_init_from_data(flat.detach())
            indices = self.nearest_codes(flat.detach())  # [N, H]
            codes = self._lookup(indices)  # [N, H, dim]

            # Straight-through (Eq. 3) or the rotation trick: forward value exactly the code.
            estimator = (
                rotation_trick_with_commitment
                if self.rotation_trick
                else straight_through_with_commitment
            )
            quantized, commitment = estimator(flat, codes)
            loss = self.commitment_weight * commitment
            if self.ema_decay is None:
                loss = loss + self.codebook_weight * F.mse_loss(codes, flat.detach())

            if self.training:
                counts = self._update(flat.detach(), indices, codes.detach())
            else:
                counts = self._count(indices)
        stats = self._stats(counts)
        quantized = quantized.reshape(z.shape).to(z.dtype)
        indices = (
            indices.reshape(*batch_shape) if heads == 1 else indices.reshape(*batch_shape, heads)
        )
        return QuantizerOutput(quantized, indices, loss, None, stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        """``[...]`` (or ``[..., H]``) code indices -> ``[..., dim]`` (or ``[..., H, dim]``) codes."""
        codebooks = self._codebooks_in_use()  # [H, K, dim]
        if self.num_codebooks == 1:
            return F.embedding(indices, codebooks[0])
        return F.embedding(indices + self._offsets, codebooks.reshape(-1, self.dim))

    def _codebooks_in_use(self) -> torch.Tensor:
        """The codebooks in float32, unit-normalised when ``cosine`` (a Parameter may drift)."""
        codebooks = self.codebooks.float()
        return (
            F.normalize(codebooks, dim=-1) if self.cosine and self.ema_decay is None else codebooks
        )

    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each input, ``[N, H, dim]`` -> ``[N, H]``.

        Squared L2 as in :func:`~pips.quantizers.base.nearest_code_indices` (the code norms ride
        in the GEMM; ``addmm``'s broadcast bias would cost a pass over the ``[N, K]`` scores on
        CPU), batched over codebooks. Cosine: the largest dot product.
        """
        codebooks = self._codebooks_in_use().detach()  # [H, K, dim]
        if self.num_codebooks == 1 and not self.cosine:
            return nearest_code_indices(flat[:, 0], codebooks[0], owner=self).unsqueeze(-1)
        if not self.cosine:
            ones = flat.new_ones(flat.shape[0], self.num_codebooks, 1)
            flat = torch.cat([flat, ones], dim=-1)  # [N, H, dim + 1]
            half_sq_norms = codebooks.pow(2).sum(-1, keepdim=True) / 2  # [H, K, 1]
            codebooks = torch.cat([codebooks, -half_sq_norms], dim=-1)  # [H, K, dim + 1]
        if self.num_codebooks == 1:
            return (flat[:, 0] @ codebooks[0].t()).argmax(-1, keepdim=True)  # [N, K] -> [N, 1]
        scores = torch.bmm(flat.transpose(0, 1), codebooks.transpose(1, 2))  # [H, N, K]
        return scores.argmax(-1).t()  # [N, H]

    def _lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` indices -> ``[N, H, dim]`` codes (float32, differentiable for a Parameter)."""
        codebooks = self._codebooks_in_use()  # [H, K, dim]
        if self.num_codebooks == 1:
            return F.embedding(indices, codebooks[0])
        return F.embedding(indices + self._offsets, codebooks.reshape(-1, self.dim))

    def _count(self, indices: torch.Tensor) -> torch.Tensor:
        """Code counts ``[H, K]`` of a batch of ``[N, H]`` indices."""
        flat_indices = (indices + self._offsets).reshape(-1)
        size = self.num_codebooks * self.codebook_size
        return torch.bincount(flat_indices, minlength=size).view(self.num_codebooks, -1).float()

    def _stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        stats = counts_stats(counts)  # batch perplexity and used codes, mean over codebooks
        threshold = self.dead_code_threshold
        dead = self._dead(threshold if threshold is not None else DEAD_CODES_STAT_THRESHOLD)
        stats["dead_codes"] = dead.sum(-1).float().mean().detach()
        stats["ema_perplexity"] = perplexity_of_counts(self.ema_count).mean().detach()
        return stats

    def _dead(self, threshold: float) -> torch.Tensor:
        """Codes used less than ``threshold`` times the uniform share of the EMA counts: ``[H, K]``."""
        return dead_code_mask(self.ema_count, threshold)

    # --- codebook updates (training only) ------------------------------------------------------

    def _world_size(self) -> int:
        return distributed_world_size() if self.sync_distributed else 1

    @torch.no_grad()
    def _update(
        self, flat: torch.Tensor, indices: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        """EMA update (van den Oord et al. 2017, Eq. 6-8) and resets; returns global counts [H, K]."""
        heads, size, dim = self.num_codebooks, self.codebook_size, self.dim
        flat_indices = (indices + self._offsets).reshape(-1)  # [N*H]
        counts = torch.bincount(flat_indices, minlength=heads * size).float()  # [H*K]
        if self.ema_decay is not None:
            sums = torch.zeros(heads * size, dim, device=flat.device)
            sums.index_add_(0, flat_indices, flat.reshape(-1, dim))  # [H*K, dim]
            if self._world_size() > 1:
                packed = torch.cat([counts, sums.reshape(-1)])
                dist.all_reduce(packed)
                counts, sums = packed[: heads * size], packed[heads * size :].view(-1, dim)
        elif self._world_size() > 1:
            dist.all_reduce(counts)
        counts = counts.view(heads, size)  # [H, K]

        decay = self.usage_decay
        update_usage_ema(self.ema_count, counts, decay)
        if self.ema_decay is not None:
            self.ema_sum.mul_(decay).add_(sums.view(heads, size, dim), alpha=1 - decay)
            total = self.ema_count.sum(-1, keepdim=True)  # [H, 1]
            smoothed = (self.ema_count + self.epsilon) / (total + size * self.epsilon) * total
            new_codebooks = self.ema_sum / smoothed.unsqueeze(-1)  # [H, K, dim]
            if self.cosine:
                new_codebooks = F.normalize(new_codebooks, dim=-1)
            self.codebooks.copy_(new_codebooks)

        if self.dead_code_threshold is not None or self.overused_threshold is not None:
            errors = (flat - codes).pow(2).sum(-1) if self.reset_strategy == "distance" else None
            self._reset_codes(flat, errors)
        return counts

    @torch.no_grad()
    def _reset_codes(self, flat: torch.Tensor, errors: torch.Tensor | None) -> None:
        """Re-initialise dead (and optionally over-used) codes from current inputs, without a sync."""
        to_reset = torch.zeros_like(self.ema_count, dtype=torch.bool)  # [H, K]
        if self.dead_code_threshold is not None:
            to_reset |= self._dead(self.dead_code_threshold)
        if self.overused_threshold is not None:
            share = self.ema_count / self.ema_count.sum(-1, keepdim=True)
            to_reset |= share > self.overused_threshold / self.codebook_size
        candidates = self._reset_candidates(flat, errors, to_reset)  # [H, K, dim]
        if self.cosine:
            candidates = F.normalize(candidates, dim=-1)
        # A new code starts with the uniform share, so it has time to win inputs before it is dead.
        new_count = self.ema_count.sum(-1, keepdim=True) / self.codebook_size  # [H, 1]
        mask = to_reset.unsqueeze(-1)  # [H, K, 1]
        self.codebooks.data.copy_(torch.where(mask, candidates, self.codebooks.data))
        self.ema_count.copy_(torch.where(to_reset, new_count, self.ema_count))
        if self.ema_decay is not None:
            self.ema_sum.copy_(
                torch.where(mask, candidates * new_count.unsqueeze(-1), self.ema_sum)
            )

    def _reset_candidates(
        self, flat: torch.Tensor, errors: torch.Tensor | None, to_reset: torch.Tensor
    ) -> torch.Tensor:
        """One replacement vector per code, ``[H, K, dim]`` (the same on every rank)."""
        num_inputs, heads, size = flat.shape[0], self.num_codebooks, self.codebook_size
        head_index = torch.arange(heads, device=flat.device).unsqueeze(1)  # [H, 1]
        world_size = self._world_size()
        if self.reset_strategy == "usage":
            picks = torch.randint(num_inputs, (heads, size), generator=self.generator).to(
                flat.device
            )
            candidates = flat[picks, head_index]  # [H, K, dim]
            if world_size > 1:  # every rank offers K inputs; a shared random draw picks the rank
                offered = all_gather_stack(candidates)  # [W, H, K, dim]
                ranks = torch.randint(world_size, (heads, size), generator=self.generator)
                code_index = torch.arange(size, device=flat.device)
                candidates = offered[ranks.to(flat.device), head_index, code_index]
            return candidates

        # "distance": the i-th code to reset gets the input with the i-th largest error.
        keep = min(size, num_inputs)
        worst_errors, worst = errors.t().topk(keep, dim=-1)  # [H, keep]
        worst_inputs = flat[worst, head_index]  # [H, keep, dim]
        if world_size > 1:
            all_errors = all_gather_stack(worst_errors).permute(1, 0, 2).reshape(heads, -1)
            all_inputs = (
                all_gather_stack(worst_inputs).permute(1, 0, 2, 3).reshape(heads, -1, self.dim)
            )
            keep = min(size, all_errors.shape[1])
            order = all_errors.topk(keep, dim=-1).indices  # [H, keep]
            worst_inputs = all_inputs[head_index, order]  # [H, keep, dim]
        rank = (to_reset.long().cumsum(-1) - 1).clamp(0, keep - 1)  # [H, K]
        return worst_inputs[head_index, rank]  # [H, K, dim]

    @torch.no_grad()
    def _maybe_init_from_data(self, flat: torch.Tensor) -> None:
        """Codes from the first training batch (``codebook_init``), batched over codebooks; under
        DDP rank 0's codes are broadcast, so every rank starts from the same codebook."""
        if bool(self.initialized):  # one sync, once: e.g. after loading a checkpoint
            self._initialized_known = True
            return
        data = flat.transpose(0, 1).contiguous()  # [H, N, dim]
        if self.codebook_init == "kmeans":
            centers, counts = self._kmeans(data)
        else:
            centers, counts = self._sample(data)
        if self._world_size() > 1:
            dist.broadcast(centers, src=0)
            dist.broadcast(counts, src=0)
        self.codebooks.data.copy_(centers)
        self.ema_count.copy_(counts)
        if self.ema_decay is not None:
            self.ema_sum.copy_(centers * counts.unsqueeze(-1))
        self.initialized.fill_(True)
        self._initialized_known = True

    def _sample(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K`` inputs per codebook, each counted with the uniform share ``N / K``."""
        centers = sample_codes(data, self.codebook_size, self.generator)  # [H, K, dim]
        if self.cosine:
            centers = F.normalize(centers, dim=-1)
        counts = torch.full(
            centers.shape[:2], data.shape[1] / self.codebook_size, device=data.device
        )
        return centers, counts

    def _kmeans(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k-means (k-means++ seeding, then ``kmeans_iters`` Lloyd steps): ``[H, N, dim]`` ->
        (centers ``[H, K, dim]``, cluster sizes ``[H, K]``, at least 1)."""
        heads, size, dim = self.num_codebooks, self.codebook_size, self.dim
        centers = self._kmeans_plus_plus(data)  # [H, K, dim]
        counts = torch.zeros(heads, size, device=data.device)
        for _ in range(self.kmeans_iters):
            distances = torch.baddbmm(
                centers.pow(2).sum(-1).unsqueeze(1), data, centers.transpose(1, 2), alpha=-2
            )  # [H, N, K]
            assignment = (distances.argmin(-1) + self._offsets.unsqueeze(1)).reshape(-1)  # [H*N]
            counts = torch.bincount(assignment, minlength=heads * size).view(heads, size).float()
            sums = torch.zeros(heads * size, dim, device=data.device)
            sums.index_add_(0, assignment, data.reshape(-1, dim))
            means = sums.view(heads, size, dim) / counts.clamp_min(1).unsqueeze(-1)
            centers = torch.where(counts.unsqueeze(-1) > 0, means, centers)  # empty clusters stay
            if self.cosine:
                centers = F.normalize(centers, dim=-1)
        return centers, counts.clamp_min(1.0)

    def _kmeans_plus_plus(self, data: torch.Tensor) -> torch.Tensor:
        """k-means++ seeding (Arthur & Vassilvitskii 2007): each next center is drawn with
        probability proportional to the squared distance to the nearest center so far. ``[H, N, dim]``
        -> ``[H, K, dim]``; a loop over K (a one-time initialisation, not a hot path)."""
        heads, num_inputs, _ = data.shape
        head_index = torch.arange(heads, device=data.device)
        first = torch.randint(num_inputs, (heads,), generator=self.generator).to(data.device)
        centers = [data[head_index, first]]  # K x [H, dim]
        nearest_sq = (data - centers[0].unsqueeze(1)).pow(2).sum(-1)  # [H, N]
        uniform = torch.rand(self.codebook_size, heads, generator=self.generator).to(data.device)
        for step in range(1, self.codebook_size):
            # Inverse-CDF sampling from nearest_sq / sum (seeded draws, no sync).
            cumulative = nearest_sq.cumsum(-1)  # [H, N]
            target = uniform[step] * cumulative[:, -1]
            pick = (
                torch.searchsorted(cumulative, target.unsqueeze(-1))
                .squeeze(-1)
                .clamp_max(num_inputs - 1)
            )
            centers.append(data[head_index, pick])
            nearest_sq = torch.minimum(nearest_sq, (data - centers[-1].unsqueeze(1)).pow(2).sum(-1))
        return torch.stack(centers, dim=1)

    # --- checkpointing and checks --------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        self._initialized_known = False  # re-read the `initialized` buffer on the next call

    def _check_shape(self, z: torch.Tensor) -> torch.Size:
        if self.num_codebooks == 1:
            if z.shape[-1] != self.dim:
                raise ValueError(
                    f"VectorQuantizer expects z of shape [..., {self.dim}]; got {tuple(z.shape)}"
                )
            return z.shape[:-1]
        if z.dim() < 2 or tuple(z.shape[-2:]) != (self.num_codebooks, self.dim):
            raise ValueError(
                f"VectorQuantizer with num_codebooks={self.num_codebooks} expects z of shape "
                f"[..., {self.num_codebooks}, {self.dim}]; got {tuple(z.shape)}"
            )
        return z.shape[:-2]
