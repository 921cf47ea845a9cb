"""Sampling throughput of the code prior with its KV cache against recomputing the whole prefix at
every step, same model, same process (target: >= 5x at 1,024 tokens on CPU).

The prior samples ``length`` tokens of a fixed-length layout (a vocabulary of 4,096, like one part
of the demo's FSQ codes) for a batch of ``batch`` rows. The cached path is timed over whole
``prior.sample`` calls. The reference path (``Decoding(cache=False)``: each step one full causal
forward over ``[BOS, tokens so far]``) costs O(length^2) per string, too slow to run whole at
1,024 tokens and batch 64 on one thread, so its generation time is measured at ``--strata``
evenly spread positions (the step at the middle of each stratum, timed after a warm-up) and
summed as ``step time x stratum width``: a stratified estimate of the whole generation.

    .venv/bin/python benchmarks/sampling.py                  # CPU, 1 thread, ~2 minutes
    .venv/bin/python benchmarks/sampling.py --lengths 256 --batches 1 --width 256 --depth 6
    .venv/bin/python benchmarks/sampling.py --device cuda --threads 16
"""

from __future__ import annotations

import argparse
import time

import torch

from pips.models.code_tokens import IndexSplit, PooledLayout
from pips.models.prior import CodePrior, filter_logits


def build_prior(length: int, args) -> CodePrior:
    torch.manual_seed(0)
    layout = PooledLayout(num_slots=length, split=IndexSplit([(args.vocab, 1)]))
    prior = CodePrior(layout, width=args.width, depth=args.depth, heads=args.heads)
    return prior.to(args.device).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cached_seconds(prior: CodePrior, batch: int, length: int, device: str) -> float:
    """Wall time of one whole cached ``prior.sample`` (after a short warm-up call)."""
    generator = torch.Generator(device=device).manual_seed(0)
    prior.sample(batch, length=min(length, 8), generator=generator)
    synchronize(device)
    start = time.perf_counter()
    tokens = prior.sample(batch, length=length, generator=generator)
    synchronize(device)
    assert tokens.shape == (batch, length)
    return time.perf_counter() - start


@torch.no_grad()
def recompute_seconds(prior: CodePrior, batch: int, length: int, strata: int, device: str):
    """Estimated wall time of a whole generation that recomputes the prefix at each step."""
    generator = torch.Generator(device=device).manual_seed(0)
    decoding = prior.start(batch, length, cache=False)
    decoding.tokens.random_(0, prior.vocab_size, generator=generator)
    width = length / strata

    def one_step(position: int) -> float:
        decoding.position = position
        synchronize(device)
        start = time.perf_counter()
        probs = filter_logits(decoding.next_logits()).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        decoding.push(token)  # one full forward over [BOS, tokens[:position + 1]]
        synchronize(device)
        return time.perf_counter() - start

    one_step(length // 2)  # warm-up
    positions = [min(int((k + 0.5) * width), length - 2) for k in range(strata)]
    return sum(one_step(position) for position in positions) * width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--strata", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"prior: width {args.width}, depth {args.depth}, heads {args.heads}, vocabulary "
        f"{args.vocab}; {args.device}, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"{'tokens':>7} {'batch':>6} {'cached tok/s':>13} {'recompute tok/s':>16} {'speed-up':>9}"
    )
    for length in args.lengths:
        prior = build_prior(length, args)
        for batch in args.batches:
            cached = cached_seconds(prior, batch, length, args.device)
            recompute = recompute_seconds(prior, batch, length, args.strata, args.device)
            tokens = batch * length
            print(
                f"{length:>7} {batch:>6} {tokens / cached:>13,.0f} {tokens / recompute:>16,.0f} "
                f"{recompute / cached:>8.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
