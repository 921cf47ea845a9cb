"""KL divergence of categorical latents to a uniform prior: analytic, and Monte Carlo for the relaxation.

Logits are ``[B, N, K]``: batch, latent slots, codes. Each slot has its own categorical posterior
``q(z_n | x) = softmax(logits[:, n])`` and the prior is uniform over the ``K`` codes, independently
per slot. Both KLs are in nats per sample: summed over slots, averaged over the batch.

- :func:`kl_to_uniform` is the exact KL of the categoricals (what the ELBO of a discrete VAE needs).
- :func:`monte_carlo_kl_to_uniform` estimates the KL between the *relaxed* posterior and the relaxed
  uniform prior (Concrete / Gumbel-softmax; Maddison et al. 2017, Jang et al. 2017). With the same
  temperature for both, this KL does not depend on the temperature at all, and it is never smaller
  than the categorical KL (see its docstring): it does *not* approach :func:`kl_to_uniform` as the
  temperature goes to 0.
"""

from __future__ import annotations

import math

import torch


def _check_logits(logits: torch.Tensor, caller: str) -> None:
    """Refuse anything that is not a floating ``[B, N, K]`` tensor, with a sentence saying so."""
    if logits.dim() != 3:
        raise ValueError(
            f"{caller} expects logits of shape [batch, latents, codes]; got shape "
            f"{tuple(logits.shape)}. Add a slot dimension with logits.unsqueeze(1) for one latent."
        )
    if not logits.is_floating_point():
        raise TypeError(f"{caller} expects floating-point logits; got dtype {logits.dtype}.")


def _check_temperature(temperature: float | torch.Tensor, name: str = "temperature") -> None:
    """Refuse a non-positive number; tensors pass unchecked, to avoid a device sync per step."""
    if not torch.is_tensor(temperature) and temperature <= 0:
        raise ValueError(f"{name} must be positive; got {temperature}.")


def kl_to_uniform(logits: torch.Tensor, per_latent: bool = False) -> torch.Tensor:
    """Analytic ``KL(q(z|x) || Uniform(K))``, summed over slots, averaged over the batch.

    ``KL = sum_n sum_k q_nk log(q_nk K) = sum_n (log K - H(q_n))`` with ``q_n = softmax(logits_n)``
    (Kingma & Welling 2014, eq. 10, with the categorical KL in closed form). It does not depend on
    any sampling temperature. ``per_latent=True`` divides by ``N`` (nats per slot).

    logits: ``[B, N, K]``. Returns a scalar.
    """
    _check_logits(logits, "kl_to_uniform")
    _, num_latents, codebook_size = logits.shape
    log_q = torch.log_softmax(logits, dim=-1)  # [B, N, K]; finite even for logits of size 1e4
    kl_per_slot = (log_q.exp() * log_q).sum(-1) + math.log(codebook_size)  # [B, N]
    kl = kl_per_slot.sum(-1).mean()
    return kl / num_latents if per_latent else kl


def sample_exp_concrete(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reparameterised samples of the ExpConcrete distribution: the log of a Gumbel-softmax sample.

    ``y = log_softmax((log q + g) / temperature)`` with ``g ~ Gumbel(0, 1)`` i.i.d. (Maddison et al.
    2017, Sec. 3.2 and App. B; ``exp(y)`` is the Gumbel-softmax sample of Jang et al. 2017). Working
    in log space keeps ``y`` finite where ``exp(y)`` would underflow to 0 at low temperature.

    logits: ``[..., K]``. Returns ``[num_samples, ..., K]``; gradients flow to ``logits``.
    """
    _check_temperature(temperature)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1; got {num_samples}.")
    log_q = torch.log_softmax(logits, dim=-1)
    shape = (num_samples, *log_q.shape)
    tiny = torch.finfo(log_q.dtype).tiny
    uniform = torch.rand(shape, generator=generator, device=log_q.device, dtype=log_q.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(tiny)))  # [S, ..., K]
    return torch.log_softmax((log_q + gumbel) / temperature, dim=-1)


def exp_concrete_log_prob(
    log_sample: torch.Tensor, logits: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """Log-density of the ExpConcrete distribution (Maddison et al. 2017, appendix) at ``log_sample``.

    ``log p(y) = log (K-1)! + (K-1) log tau + sum_k (log q_k - tau y_k) - K logsumexp_k(log q_k - tau y_k)``
    with ``log q = log_softmax(logits)``. Matches ``torch.distributions.ExpRelaxedCategorical``.

    log_sample: ``[..., K]`` broadcastable against logits ``[..., K]``. Returns ``[...]``.
    """
    codebook_size = logits.shape[-1]
    temperature = torch.as_tensor(temperature, dtype=log_sample.dtype, device=log_sample.device)
    score = torch.log_softmax(logits, dim=-1) - temperature * log_sample  # [..., K]
    log_normaliser = math.lgamma(codebook_size) + (codebook_size - 1) * temperature.log()
    return log_normaliser + score.sum(-1) - codebook_size * score.logsumexp(-1)


def monte_carlo_kl_to_uniform(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    log_sample: torch.Tensor | None = None,
    num_samples: int = 1,
    prior_temperature: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    per_latent: bool = False,
) -> torch.Tensor:
    """Monte Carlo ``KL(q_tau || p_tau')`` between the relaxed posterior and the relaxed uniform prior.

    ``q_tau = ExpConcrete(softmax(logits), tau)`` and ``p_tau' = ExpConcrete(uniform, tau')``; the
    estimate is ``mean_s [log q_tau(y_s) - log p_tau'(y_s)]`` at ExpConcrete samples ``y_s ~ q_tau``
    (the relaxed ELBO of Maddison et al. 2017; Jang et al. 2017), summed over slots and
    averaged over the batch and samples. With ``tau' = tau`` the ``(K-1)!``, ``tau^(K-1)`` and
    ``tau * sum_k y_k`` parts cancel in closed form, so ``K`` up to 4096 loses no precision to them:

        ``log q(y) - log p(y) = sum_k (log q_k + log K) - K lse_k(log q_k - tau y_k)
                                 + K lse_k(-log K - tau y_k)``.

    Two facts to know before using it as the ELBO's KL term:

    - With ``tau' = tau`` the value does not depend on ``tau``: ``softmax(log x / tau)`` maps the
      temperature-1 Concrete to the temperature-``tau`` one for *any* class probabilities, and a KL
      is invariant when the same bijection is applied to both distributions. Even the per-sample
      terms agree for the same Gumbel noise.
    - It is at least the categorical KL (:func:`kl_to_uniform`), with equality only when ``q`` is
      uniform: ``argmax y ~ Categorical(q)`` under both relaxations, and a KL can only shrink under
      a map (data processing). So it does not converge to the analytic KL as ``tau -> 0``.

    Args:
        logits: ``[B, N, K]``.
        temperature: posterior temperature ``tau > 0``.
        log_sample: ExpConcrete samples ``[B, N, K]`` or ``[S, B, N, K]`` (the *log* of the
            Gumbel-softmax sample, e.g. ``log_softmax((logits + gumbel) / tau)``); drawn here with
            :func:`sample_exp_concrete` when ``None``.
        num_samples: samples per item when drawing here.
        prior_temperature: ``tau'`` of the prior; ``None`` uses ``tau``. Maddison et al. 2017 give
            the prior its own temperature; then the value does depend on both.
        generator: for reproducible samples.
        per_latent: divide by ``N`` (nats per slot).

    Returns a scalar; gradients flow through both the density and the reparameterised sample.
    """
    _check_logits(logits, "monte_carlo_kl_to_uniform")
    _check_temperature(temperature)
    _, num_latents, codebook_size = logits.shape
    if log_sample is None:
        log_sample = sample_exp_concrete(
            logits, temperature, num_samples, generator
        )  # [S, B, N, K]
    elif log_sample.shape[-3:] != logits.shape:
        raise ValueError(
            f"log_sample must have shape {tuple(logits.shape)} or [samples, *that]; "
            f"got {tuple(log_sample.shape)}."
        )
    log_q = torch.log_softmax(logits, dim=-1)  # [B, N, K]
    log_k = math.log(codebook_size)
    if prior_temperature is None:
        scaled = temperature * log_sample  # [S, B, N, K]
        log_ratio = (
            (log_q + log_k).sum(-1)
            - codebook_size * (log_q - scaled).logsumexp(-1)
            + codebook_size * (-log_k - scaled).logsumexp(-1)
        )  # [S, B, N]
    else:
        _check_temperature(prior_temperature, "prior_temperature")
        uniform_logits = torch.zeros_like(log_q)
        log_ratio = exp_concrete_log_prob(log_sample, logits, temperature) - exp_concrete_log_prob(
            log_sample, uniform_logits, prior_temperature
        )  # [S, B, N]
    kl = log_ratio.sum(-1).mean()
    return kl / num_latents if per_latent else kl


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over data-parallel ranks (itself outside torch.distributed), so a
    running estimate built from per-rank batches stays the same on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()
