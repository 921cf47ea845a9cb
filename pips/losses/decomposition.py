"""Split the KL of categorical latents into index-code MI, total correlation and dimension-wise KL.

beta-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs", eq. 2) for ``N``
categorical slots of ``K`` codes, posteriors independent across slots given ``x`` and a uniform prior:

    E_x KL(q(z|x) || p(z)) = I(x; z)                        index-code mutual information
                           + KL(q(z) || prod_n q(z_n))      total correlation
                           + sum_n KL(q(z_n) || p(z_n))     dimension-wise KL

where ``q(z) = E_x q(z|x)`` is the aggregate posterior and ``q(z_n)`` its per-slot marginals. Each
term is estimated from its own densities; none is the remainder of the others (a published model
for categorical latents computes TC as KL - MI - DWKL from one set of terms, so its TC is 0 always).

:func:`decompose_kl` returns a :class:`KLDecomposition` in nats per sample (averaged over the batch,
summed over slots). :class:`SlotMarginalEMA` keeps a running ``q(z_n)`` across batches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from pips.losses.kl import _check_logits, mean_over_ranks

ESTIMATORS = ("mws", "mss")
TERMS = ("mutual_information", "total_correlation", "dimension_wise_kl")


class KLDecomposition(NamedTuple):
    """Scalars in nats per sample; ``clamped[term]`` is a bool tensor, True where clamping bit."""

    kl: torch.Tensor
    mutual_information: torch.Tensor
    total_correlation: torch.Tensor
    dimension_wise_kl: torch.Tensor
    clamped: dict[str, torch.Tensor]


def decompose_kl(
    logits: torch.Tensor,
    dataset_size: int | None = None,
    exact: bool = False,
    estimator: str = "mss",
    clamp: bool = False,
    generator: torch.Generator | None = None,
    samples: torch.Tensor | None = None,
    slot_marginals: torch.Tensor | None = None,
    max_joint_codes: int = 2**20,
) -> KLDecomposition:
    """beta-TCVAE decomposition of ``KL(q(z|x) || Uniform)`` for logits ``[B, N, K]``.

    ``kl`` is always the analytic KL (:func:`pips.losses.kl.kl_to_uniform`). The three terms are:

    - ``exact=True``: exact for the batch's aggregate posterior ``q(z) = (1/B) sum_i q(z|x_i)``,
      enumerating all ``K**N`` joint codes (refused above ``max_joint_codes``; memory ``B * K**N``).
      ``kl == mi + tc + dwkl`` up to rounding. ``dataset_size`` is not used.
    - ``exact=False``: one hard sample ``z_i ~ q(z|x_i)`` per item (drawn with ``generator``, or
      given as ``samples [B, N]``) and a minibatch estimate of ``log q(z_i)`` and ``log q(z_in)``
      with ``estimator`` ``"mss"`` (default) or ``"mws"``; see :func:`minibatch_log_weights` for
      both and their bias. ``E log q(z|x_i)`` in the MI is the closed form ``-H(q(z|x_i))``, so the
      terms telescope to exactly the analytic ``kl`` for any sample. ``slot_marginals [N, K]``
      (e.g. from :class:`SlotMarginalEMA`) replaces the minibatch estimate of each ``q(z_n)``.

    Gradients reach ``logits`` through every ``log q`` term; the sampled indices carry none, and
    the score-function term of the sampling distribution is left out, as in beta-TCVAE.

    ``clamp=True`` clamps each of MI, TC and DWKL at 0 (then ``kl`` no longer equals their sum);
    ``clamped`` says which ones were negative and clamped, as 0-dim bool tensors (no host sync).
    """
    _check_logits(logits, "decompose_kl")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}.")
    _, num_latents, codebook_size = logits.shape
    log_q = torch.log_softmax(logits, dim=-1)  # [B, N, K]
    neg_entropy = (log_q.exp() * log_q).sum((1, 2))  # [B]: E_q(z|x_i) log q(z|x_i)
    kl = neg_entropy.mean() + num_latents * math.log(codebook_size)

    if exact:
        if samples is not None or slot_marginals is not None:
            raise ValueError(
                "exact=True computes every expectation in closed form and takes no samples or "
                "slot_marginals; pass exact=False to use them."
            )
        terms = _exact_terms(log_q, neg_entropy, max_joint_codes)
    else:
        terms = _sampled_terms(
            log_q, neg_entropy, dataset_size, estimator, samples, generator, slot_marginals
        )

    clamped = {}
    values = []
    for name, value in zip(TERMS, terms, strict=True):
        if clamp:
            clamped[name] = value.detach() < 0
            value = value.clamp_min(0.0)
        else:
            clamped[name] = torch.zeros((), dtype=torch.bool, device=logits.device)
        values.append(value)
    return KLDecomposition(kl, *values, clamped=clamped)


def minibatch_log_weights(
    batch_size: int,
    dataset_size: int | None = None,
    estimator: str = "mss",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``log w_ij`` with ``q(z_i) ~= sum_j w_ij q(z_i | x_j)``, for ``z_i ~ q(z|x_i)``. ``[B, B]``.

    ``B`` is the batch size, ``D`` the dataset size (``None``: ``D = B``, the batch is the dataset).

    - ``"mws"``, minibatch weighted sampling (Chen et al. 2018, eq. 3, Sec. 4.1):
      ``w_ij = 1 / (B D)`` for all ``j``. Biased low: each ``log q`` (joint or per slot) is below
      the ``"mss"`` value by ``c = log(B (a + (D-1)/(B-1) s) / (a + s))``, with ``a`` the item's own
      term and ``s`` the sum of the others, so ``log B <= c <= log(B (D-1) / (B-1))``, and
      ``c = log B`` exactly when ``D = B``. The sum ``mi + tc + dwkl`` is unaffected, but the shifts
      move nats between the terms: with ``D = B``, MI gains ``log B``, TC ``(N-1) log B`` and DWKL
      ``-N log B``; uniform posteriors (true terms all 0) give ``log D``, ``(N-1) log D``, ``-N log D``.
    - ``"mss"``, minibatch stratified sampling (Chen et al. 2018, App. C.2), here averaged over
      which batch member stands for the unsampled rest of the dataset (same expectation, less
      variance): ``w_ii = 1 / D`` and ``w_ij = (D - 1) / (D (B - 1))`` for ``j != i``. Given ``z_i``,
      ``sum_j w_ij q(z_i | x_j)`` is an unbiased estimate of ``q(z_i)`` when the other ``B - 1``
      items are drawn without replacement from the other ``D - 1``; with ``D = B`` it is exactly the
      batch's aggregate posterior. Only the ``log`` adds a (Jensen) bias, which vanishes as ``B``
      grows and is 0 when ``D = B``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}.")
    dataset_size = batch_size if dataset_size is None else dataset_size
    if dataset_size < batch_size:
        raise ValueError(
            f"dataset_size ({dataset_size}) is smaller than the batch ({batch_size}); pass the "
            "number of training examples, or None to treat the batch as the dataset."
        )
    if estimator == "mws":
        return torch.full(
            (batch_size, batch_size),
            -math.log(batch_size * dataset_size),
            dtype=dtype,
            device=device,
        )
    others = (dataset_size - 1) / (dataset_size * (batch_size - 1)) if batch_size > 1 else 1.0
    log_weights = torch.full((batch_size, batch_size), math.log(others), dtype=dtype, device=device)
    log_weights.fill_diagonal_(-math.log(dataset_size))
    return log_weights


def _exact_terms(
    log_q: torch.Tensor, neg_entropy: torch.Tensor, max_joint_codes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MI, TC, DWKL of the batch's aggregate posterior, by enumerating all joint codes."""
    batch_size, num_latents, codebook_size = log_q.shape
    if codebook_size**num_latents > max_joint_codes:
        raise ValueError(
            f"exact=True would enumerate K**N = {codebook_size}**{num_latents} (about "
            f"10^{num_latents * math.log10(codebook_size):.1f}) joint codes, more than "
            f"max_joint_codes={max_joint_codes}; use exact=False, or raise max_joint_codes if "
            f"{batch_size} * K**N floats fit in memory."
        )
    log_joint = log_q[:, 0]  # [B, K]
    for slot in range(1, num_latents):
        log_joint = (log_joint[:, :, None] + log_q[:, slot, None, :]).flatten(1)  # [B, K**(slot+1)]
    log_aggregate = log_joint.logsumexp(0) - math.log(batch_size)  # [K**N]: log q(z)
    joint_entropy = -(log_aggregate.exp() * log_aggregate).sum()
    log_marginals = log_q.logsumexp(0) - math.log(batch_size)  # [N, K]: log q(z_n)
    marginal_entropies = -(log_marginals.exp() * log_marginals).sum(-1)  # [N]

    mutual_information = joint_entropy + neg_entropy.mean()  # H(z) - E_x H(z|x)
    total_correlation = marginal_entropies.sum() - joint_entropy
    dimension_wise_kl = (math.log(codebook_size) - marginal_entropies).sum()
    return mutual_information, total_correlation, dimension_wise_kl


def _sampled_terms(
    log_q: torch.Tensor,
    neg_entropy: torch.Tensor,
    dataset_size: int | None,
    estimator: str,
    samples: torch.Tensor | None,
    generator: torch.Generator | None,
    slot_marginals: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MI, TC, DWKL from one sample per item and minibatch estimates of ``log q(z)``, ``log q(z_n)``."""
    batch_size, num_latents, codebook_size = log_q.shape
    if samples is None:
        probs = log_q.detach().exp().flatten(0, 1)  # [B*N, K]
        samples = torch.multinomial(probs, 1, generator=generator).view(batch_size, num_latents)
    elif samples.shape != (batch_size, num_latents) or samples.dtype != torch.long:
        raise ValueError(
            f"samples must be code indices of shape {(batch_size, num_latents)} and dtype "
            f"torch.long; got shape {tuple(samples.shape)} and dtype {samples.dtype}."
        )

    # log q(z_in | x_j) for every sampled item i, every batch item j, every slot n
    index = samples.T[:, None, :].expand(num_latents, batch_size, batch_size)  # [N, B_j, B_i]
    log_slot_given = log_q.transpose(0, 1).gather(2, index).permute(2, 1, 0)  # [B_i, B_j, N]
    log_weights = minibatch_log_weights(
        batch_size, dataset_size, estimator, log_q.dtype, log_q.device
    )  # [B_i, B_j]
    log_joint = (log_slot_given.sum(-1) + log_weights).logsumexp(1)  # [B]: log q(z_i)
    if slot_marginals is None:
        log_slot = (log_slot_given + log_weights[:, :, None]).logsumexp(1)  # [B, N]: log q(z_in)
    else:
        if slot_marginals.shape != (num_latents, codebook_size):
            raise ValueError(
                f"slot_marginals must be probabilities of shape {(num_latents, codebook_size)}; "
                f"got {tuple(slot_marginals.shape)}."
            )
        tiny = torch.finfo(slot_marginals.dtype).tiny
        log_marginals = slot_marginals.clamp_min(tiny).log()  # [N, K]
        log_slot = log_marginals.gather(1, samples.T).T  # [B, N]

    log_slot_product = log_slot.sum(-1)  # [B]: log prod_n q(z_in)
    mutual_information = (neg_entropy - log_joint).mean()
    total_correlation = (log_joint - log_slot_product).mean()
    dimension_wise_kl = log_slot_product.mean() + num_latents * math.log(codebook_size)
    return mutual_information, total_correlation, dimension_wise_kl


class SlotMarginalEMA(nn.Module):
    """Running estimate of the per-slot aggregate posterior ``q(z_n) = E_x q(z_n | x)``, ``[N, K]``.

    ``forward(logits)`` returns ``decay * running.detach() + (1 - decay) * batch_marginals`` (the
    batch's ``mean_i softmax(logits_i)``, which carries the gradient), then, in training mode, folds
    the batch into the running average. Pass the result to ``decompose_kl(slot_marginals=...)``.
    The running average is bias-corrected for its zero start (as in Adam), and is the batch alone
    before the first update.

    Bias: with a frozen encoder, the running average is an unbiased estimate of the population
    ``q(z_n)`` (a normalised average of unbiased batch means); while the encoder trains it lags,
    mixing the marginals of the last ~``1 / (1 - decay)`` parameter versions. ``log`` of it is still
    Jensen-biased low, but much less than a single batch's estimate, as it averages over many more
    items. The gradient reaches only the current batch, scaled by ``1 - decay``.
    """

    def __init__(self, num_latents: int, codebook_size: int, decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"SlotMarginalEMA decay must be in [0, 1); got {decay}.")
        self.num_latents = num_latents
        self.codebook_size = codebook_size
        self.decay = decay
        self.register_buffer("ema", torch.zeros(num_latents, codebook_size))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def running_marginals(self) -> torch.Tensor:
        """Bias-corrected running ``q(z_n)``, ``[N, K]``; uniform before the first update."""
        correction = 1.0 - self.decay ** self.num_updates.clamp_min(1).to(self.ema.dtype)
        uniform = torch.full_like(self.ema, 1.0 / self.codebook_size)
        return torch.where(self.num_updates > 0, self.ema / correction, uniform)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, "SlotMarginalEMA")
        if logits.shape[1:] != (self.num_latents, self.codebook_size):
            raise ValueError(
                f"SlotMarginalEMA was built for [B, {self.num_latents}, {self.codebook_size}] "
                f"logits; got {tuple(logits.shape)}."
            )
        batch_marginals = torch.softmax(logits, dim=-1).mean(0)  # [N, K]
        history_weight = (self.num_updates > 0).to(batch_marginals.dtype) * self.decay
        running = self.running_marginals().to(batch_marginals.dtype)
        mixed = history_weight * running + (1.0 - history_weight) * batch_marginals
        if self.training:
            self.update(batch_marginals)
        return mixed

    @torch.no_grad()
    def update(self, batch_marginals: torch.Tensor) -> None:
        """Fold one batch's ``[N, K]`` marginals into the running average."""
        self.ema.mul_(self.decay).add_(
            mean_over_ranks(batch_marginals.detach().to(self.ema.dtype)), alpha=1 - self.decay
        )
        self.num_updates += 1
