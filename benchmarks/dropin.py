"""Quantizers as drop-ins in someone else's model: do their defaults collapse?

The model is the small convolutional autoencoder of other libraries' examples (two conv + max-pool
layers down, two upsample + conv layers up; vector-quantize-pytorch's ``examples/autoencoder.py``)
on sklearn's digits upsampled to 16x16: unnormalised 32-channel features on a 4x4 grid, L1 loss
plus 10 x the quantizer loss, AdamW 3e-4. Every quantizer runs at its default arguments. Printed:
validation L1, code usage (share of the codebook used on the validation set; mean over stages or
groups) and validation code perplexity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dropin.py            # 600 steps, every quantizer
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dropin.py --kinds vq rvq --steps 300 --seeds 0 1

vector-quantize-pytorch's ``VectorQuantize`` and ``ResidualVQ`` (its defaults) run in the same
process when it is installed (``pip install -e '.[bench]'``). ``tests/test_quantizers_dropin.py``
trains this same model.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 32  # channels of the latent grid = the quantizer's dim
CODEBOOK_SIZE = 256


def pips_defaults() -> dict[str, Callable[[], nn.Module]]:
    """Each PIPS quantizer at its defaults, given the feature size and ~256 codes (8 bits)."""
    from pips import quantizers as q

    return {
        "vq": lambda: q.VectorQuantizer(dim=FEATURES, codebook_size=CODEBOOK_SIZE),
        "rvq": lambda: q.ResidualVQ(dim=FEATURES, codebook_size=CODEBOOK_SIZE, num_stages=4),
        "gvq": lambda: q.GroupVQ(dim=FEATURES, codebook_size=CODEBOOK_SIZE, groups=4),
        "simvq": lambda: q.SimVQ(dim=FEATURES, codebook_size=CODEBOOK_SIZE),
        "product_vq": lambda: q.ProductVQ(dim=FEATURES, levels=[16, 16]),
        "lfq": lambda: q.LFQ(dim=FEATURES, codebook_size=CODEBOOK_SIZE),
        "fsq": lambda: q.FSQ(levels=[8, 6, 5], dim=FEATURES),
        "residual_fsq": lambda: q.ResidualFSQ(levels=[8, 6, 5], num_stages=4, dim=FEATURES),
        "radial": lambda: q.RadialQuantizer(dim=FEATURES, codebook_size=CODEBOOK_SIZE),
    }


def digits_16x16(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 digits in [0, 1], bilinearly upsampled to 16x16: (train [1497], val [300])."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images = images[order]
    return images[300:], images[:300]


class ConvAutoencoder(nn.Module):
    """``[B, 1, 16, 16] -> [B, 16, FEATURES]`` features (a 4x4 grid) -> quantizer -> ``[B, 1, 16, 16]``."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.MaxPool2d(2),
            nn.GELU(),
            nn.Conv2d(16, FEATURES, 3, padding=1),
            nn.MaxPool2d(2),
        )
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(FEATURES, 16, 3, padding=1),
            nn.GELU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(16, 1, 3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.encoder(images).flatten(2).transpose(1, 2)  # [B, 16, FEATURES]
        quantized, indices, loss = unpack(self.quantizer(features))
        grid = quantized.transpose(1, 2).reshape(-1, FEATURES, 4, 4)
        return self.decoder(grid), indices, loss


def unpack(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(quantized, indices, loss)`` from a PIPS ``QuantizerOutput`` or vector-quantize-pytorch's
    ``(quantized, indices, loss)`` tuples (whose loss may be one per stage)."""
    if hasattr(out, "stats"):
        return out.quantized, out.indices, out.loss
    quantized, indices, loss = out[:3]
    return quantized, indices, loss.sum()


def code_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(share of the codebook used, perplexity), both averaged over stages/groups ``[..., S]``."""
    columns = (
        indices.reshape(-1, indices.shape[-1]) if indices.dim() > 2 else indices.reshape(-1, 1)
    )
    usages, perplexities = [], []
    for column in columns.t():
        counts = torch.bincount(column, minlength=codebook_size).float()
        probs = counts / counts.sum()
        usages.append((counts > 0).float().mean().item())
        perplexities.append(math.exp(-(probs * probs.clamp_min(1e-12).log()).sum().item()))
    return sum(usages) / len(usages), sum(perplexities) / len(perplexities)


def train_dropin(
    quantizer: nn.Module,
    steps: int = 600,
    batch_size: int = 256,
    seed: int = 0,
    quantizer_weight: float = 10.0,
    codebook_size: int | None = None,
) -> dict[str, float]:
    """Train the autoencoder with ``quantizer``; validation L1, code usage and perplexity."""
    torch.manual_seed(seed)
    train, val = digits_16x16(seed)
    model = ConvAutoencoder(quantizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(train.shape[0], (batch_size,), generator=generator)]
        reconstruction, _, loss = model(batch)
        total = (reconstruction - batch).abs().mean() + quantizer_weight * loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        reconstruction, indices, _ = model(val)
    size = codebook_size or quantizer.codebook_size
    usage, perplexity = code_usage(indices, size)
    return {
        "val_l1": (reconstruction - val).abs().mean().item(),
        "usage": usage,
        "perplexity": perplexity,
        "seconds": seconds,
    }


def theirs_defaults() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return {}
    return {
        "vqp VectorQuantize": (
            lambda: vqp.VectorQuantize(dim=FEATURES, codebook_size=CODEBOOK_SIZE),
            CODEBOOK_SIZE,
        ),
        "vqp ResidualVQ": (
            lambda: vqp.ResidualVQ(dim=FEATURES, codebook_size=CODEBOOK_SIZE, num_quantizers=4),
            CODEBOOK_SIZE,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="*", default=None, help="PIPS kinds (default: all)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--no-theirs", action="store_true", help="skip vector-quantize-pytorch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {kind: (make, None) for kind, make in pips_defaults().items()}
    if args.kinds is not None:
        cases = {kind: cases[kind] for kind in args.kinds if kind in cases}
    if not args.no_theirs:
        cases.update(theirs_defaults())
    print(f"{args.steps} steps, seeds {args.seeds}, features {FEATURES}, 4x4 grid per digit")
    header = (
        f"{'quantizer':<20} {'codes':>7} {'val L1':>7} {'usage':>7} {'perplexity':>10} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, (make, size) in cases.items():
        for seed in args.seeds:
            quantizer = make()
            result = train_dropin(quantizer, steps=args.steps, seed=seed, codebook_size=size)
            codes = size or quantizer.codebook_size
            print(
                f"{name + ('' if len(args.seeds) == 1 else f' s{seed}'):<20} {codes:>7} "
                f"{result['val_l1']:>7.4f} {result['usage']:>7.1%} {result['perplexity']:>10.1f} "
                f"{result['seconds']:>6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
