"""Build library parts from config through the registries (no if-chains over names elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pips.config import ModelConfig, QuantizerConfig
from pips.quantizers import QUANTIZERS, Quantizer

# The constructor arguments each quantizer takes from the config; `dim` is the model width and
# `num_slots` the number of latent slots (None for the spatial layout).
QUANTIZER_ARGUMENTS: dict[str, Callable[[QuantizerConfig, int, int | None], dict[str, Any]]] = {
    "gumbel": lambda q, dim, num_slots: dict(
        dim=dim,
        codebook_size=q.codebook_size,
        estimator=q.estimator,
        head=q.head,
        num_slots=num_slots if q.per_slot_head else None,
        sampling=q.sampling,
        factors=q.factors,
    ),
    "fsq": lambda q, dim, num_slots: dict(levels=q.levels, dim=dim),
    "vq": lambda q, dim, num_slots: dict(
        dim=dim,
        codebook_size=q.codebook_size,
        rotation_trick=q.rotation_trick,
        ema_decay=q.ema_decay,
        commitment_weight=q.commitment_weight,
        codebook_init=q.codebook_init,
        dead_code_threshold=q.dead_code_threshold,
    ),
    "rvq": lambda q, dim, num_slots: dict(
        dim=dim,
        codebook_size=q.codebook_size,
        num_stages=q.num_stages,
        shared_codebook=q.shared_codebook,
        rotation_trick=q.rotation_trick,
        ema_decay=q.ema_decay,
        commitment_weight=q.commitment_weight,
        codebook_init=q.codebook_init,
        dead_code_threshold=q.dead_code_threshold,
    ),
    "gvq": lambda q, dim, num_slots: dict(
        dim=dim,
        codebook_size=q.codebook_size,
        groups=q.groups,
        shared_codebook=q.shared_codebook,
        ema_decay=q.ema_decay,
        commitment_weight=q.commitment_weight,
        codebook_init=q.codebook_init,
        dead_code_threshold=q.dead_code_threshold,
    ),
    "lfq": lambda q, dim, num_slots: dict(
        dim=dim,
        codebook_size=q.codebook_size,
        entropy_weight=q.entropy_weight,
        commitment_weight=q.commitment_weight,
    ),
    "simvq": lambda q, dim, num_slots: dict(
        dim=dim,
        codebook_size=q.codebook_size,
        commitment_weight=q.commitment_weight,
        rotation_trick=q.rotation_trick,
        basis_init="gaussian" if q.codebook_init == "gaussian" else "sample",  # no k-means basis
    ),
    "product_vq": lambda q, dim, num_slots: dict(
        dim=dim,
        levels=q.levels,
        shared_codebook=q.shared_codebook,
        base=q.base,
        num_chunks=q.groups,
        ema_decay=q.ema_decay,
        commitment_weight=q.commitment_weight,
        codebook_init=q.codebook_init,
        dead_code_threshold=q.dead_code_threshold,
    ),
    "residual_fsq": lambda q, dim, num_slots: dict(
        levels=q.levels, num_stages=q.num_stages, dim=dim
    ),
    "radial": lambda q, dim, num_slots: dict(dim=dim, base=q.base, codebook_size=q.codebook_size),
    "none": lambda q, dim, num_slots: dict(dim=dim),
}


# The size of the vectors a quantizer takes when `model.quantizer.dim` is not set, where it is not
# the model width. (Every quantizer projects its own vectors now: LFQ width -> its bits and back.)
DEFAULT_CODE_DIM: dict[str, int] = {}


def quantizer_dim(config: QuantizerConfig, width: int) -> int:
    """The vector size the model projects its latents to before quantizing."""
    return config.dim or DEFAULT_CODE_DIM.get(config.kind, width)


def build_quantizer(config: QuantizerConfig, dim: int, num_slots: int | None) -> Quantizer:
    if config.kind not in QUANTIZERS:
        raise ValueError(
            f"quantizer {config.kind!r} is not available; available: {', '.join(QUANTIZERS)}"
        )
    return QUANTIZERS[config.kind](**QUANTIZER_ARGUMENTS[config.kind](config, dim, num_slots))


def block_arguments(config: ModelConfig) -> dict[str, Any]:
    """The transformer Block arguments every model takes from ``model.*``."""
    return dict(
        width=config.width,
        heads=config.heads,
        mlp=config.mlp,
        mlp_ratio=config.mlp_ratio,
        dropout=config.dropout,
    )


def build_pooling(config: ModelConfig):
    """LatentPooling of ``model.num_latents`` slots with ``model.pooling_layers`` blocks."""
    from pips.nn.pooling import LatentPooling

    return LatentPooling(
        config.width,
        config.heads,
        config.num_latents,
        config.pooling_layers,
        config.mlp,
        config.mlp_ratio,
        config.dropout,
    )
