"""Speed and peak memory of the PIPS quantizers beside vector-quantize-pytorch, in one run.

Every case times one training step: forward + backward + codebook update (EMA in the forward; an
SGD step for SimVQ's learned map), train mode, the same input tensor for both. The straight-through
estimator on both sides (the other library's default rotation trick turned off), except in the
rotation-trick cases, where both use it. Ours run at their defaults (codes sampled from the first
batch, dead-code resets on); theirs at theirs (no resets). Ratios are measured in this run: ours and theirs are timed alternately, the
median of at least ``--repeats`` runs (more for fast cases, about 0.5 s each) after warm-up.

    .venv/bin/python benchmarks/quantizers.py            # CPU, 1 thread (stable on shared machines)
    .venv/bin/python benchmarks/quantizers.py --threads 8 --device cuda
    .venv/bin/python benchmarks/quantizers.py --cases rotation SimVQ   # cases whose name matches

The other library is optional (``pip install -e '.[bench]'``); without it only our numbers print.
Peak memory: extra bytes allocated during one step (CUDA: ``max_memory_allocated``; CPU: the torch
profiler's allocation trace).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from pips.quantizers import FSQ, LFQ, GroupVQ, ResidualVQ, SimVQ, VectorQuantizer

try:
    import vector_quantize_pytorch as vqp
except ImportError:  # optional: the benchmark still prints our numbers
    vqp = None

BATCH, LENGTH, DIM = 16, 1024, 64
LFQ_BITS = 10


@dataclass
class Case:
    name: str
    ours: Callable[[], Callable[[], None]]  # builds a module, returns a step function
    theirs: Callable[[], Callable[[], None]] | None
    floor: Callable[[], Callable[[], None]] | None = None  # the matmul this case is compared with
    target: str = ""


def training_step(
    module: torch.nn.Module, z: torch.Tensor, unpack: Callable, update: bool = False
) -> Callable[[], None]:
    """One forward + backward with a fixed upstream gradient on the output plus the aux loss;
    ``update`` adds an SGD step on the module's parameters (a learned codebook's update)."""
    module.train()
    upstream = torch.randn_like(z)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3) if update else None

    def step() -> None:
        z.grad = None
        quantized, loss = unpack(module(z))
        outputs, grads = [quantized], [upstream]
        if loss is not None and loss.requires_grad:
            outputs.append(loss)
            grads.append(torch.ones_like(loss))
        torch.autograd.backward(outputs, grads)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def ours(out):
    return out.quantized, out.loss


def theirs_vq(out):
    quantized, _, loss = out
    return quantized, loss.sum()


def theirs_fsq(out):
    return out[0], None


def matmul_floor(z: torch.Tensor, codebook_size: int) -> Callable[[], Callable[[], None]]:
    """The bare ``z @ codebook.T`` of the nearest-neighbour search: the floor for VQ."""

    def build():
        flat = z.detach().reshape(-1, DIM)
        codebook = torch.randn(codebook_size, DIM, device=z.device)
        return lambda: flat @ codebook.t()

    return build


def build_cases(z: torch.Tensor, z_bits: torch.Tensor) -> list[Case]:
    device = z.device
    cases = []
    for size in (512, 4096):
        cases.append(
            Case(
                f"VQ EMA K={size}",
                lambda size=size: training_step(VectorQuantizer(DIM, size).to(device), z, ours),
                lambda size=size: training_step(
                    vqp.VectorQuantize(
                        dim=DIM,
                        codebook_size=size,
                        decay=0.99,
                        commitment_weight=0.25,
                        rotation_trick=False,
                    ).to(device),
                    z,
                    theirs_vq,
                ),
                floor=matmul_floor(z, size),
                target="ours <= 2.5x matmul",
            )
        )
    cases.append(
        Case(
            "VQ rotation trick K=512",
            lambda: training_step(
                VectorQuantizer(DIM, 512, rotation_trick=True).to(device), z, ours
            ),
            lambda: training_step(
                vqp.VectorQuantize(
                    dim=DIM,
                    codebook_size=512,
                    decay=0.99,
                    commitment_weight=0.25,
                    rotation_trick=True,
                ).to(device),
                z,
                theirs_vq,
            ),
            target="theirs >= 2x ours",
        )
    )
    cases.append(
        Case(
            "SimVQ rotation K=512",
            lambda: training_step(
                SimVQ(DIM, 512, rotation_trick=True).to(device), z, ours, update=True
            ),
            lambda: training_step(
                vqp.SimVQ(dim=DIM, codebook_size=512, rotation_trick=True).to(device),
                z,
                theirs_vq,
                update=True,
            ),
            target="theirs >= 2x ours",
        )
    )
    cases.append(
        Case(
            "SimVQ ST K=512",
            lambda: training_step(SimVQ(DIM, 512).to(device), z, ours, update=True),
            lambda: training_step(
                vqp.SimVQ(dim=DIM, codebook_size=512, rotation_trick=False).to(device),
                z,
                theirs_vq,
                update=True,
            ),
            target="theirs >= 2x ours",
        )
    )
    cases.append(
        Case(
            "LFQ 2^10 + entropy",
            lambda: training_step(LFQ(LFQ_BITS).to(device), z_bits, ours),
            lambda: training_step(
                vqp.LFQ(
                    dim=LFQ_BITS,
                    entropy_loss_weight=0.1,
                    commitment_loss_weight=0.25,
                    diversity_gamma=1.0,
                ).to(device),
                z_bits,
                lambda out: (out.quantized, out.entropy_aux_loss),
            ),
            target="theirs >= 10x ours",
        )
    )
    cases.append(
        Case(
            "FSQ [8,5,5,5] dim 64",
            lambda: training_step(FSQ([8, 5, 5, 5], dim=DIM).to(device), z, ours),
            lambda: training_step(vqp.FSQ(levels=[8, 5, 5, 5], dim=DIM).to(device), z, theirs_fsq),
            target="ours <= theirs",
        )
    )
    cases.append(
        Case(
            "RVQ 4 stages K=512",
            lambda: training_step(ResidualVQ(DIM, 512, num_stages=4).to(device), z, ours),
            lambda: training_step(
                vqp.ResidualVQ(
                    dim=DIM,
                    num_quantizers=4,
                    codebook_size=512,
                    decay=0.99,
                    commitment_weight=0.25,
                    rotation_trick=False,
                ).to(device),
                z,
                theirs_vq,
            ),
            target="ours <= theirs",
        )
    )
    cases.append(
        Case(
            "GVQ 4 groups K=512",
            lambda: training_step(GroupVQ(DIM, 512, groups=4).to(device), z, ours),
            lambda: training_step(
                vqp.VectorQuantize(
                    dim=DIM,
                    codebook_size=512,
                    codebook_dim=DIM // 4,
                    heads=4,
                    separate_codebook_per_head=True,
                    decay=0.99,
                    commitment_weight=0.25,
                    rotation_trick=False,
                ).to(device),
                z,
                theirs_vq,
            ),
            target="ours <= theirs",
        )
    )
    return cases


def time_once(step: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_ms(
    steps: list[Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Median milliseconds of each step, timed alternately (ours, theirs, ours, ...) so that drift
    in a shared machine's load hits both alike; at least ``repeats`` runs and about 0.5 s each."""
    for _ in range(warmup):
        for step in steps:
            time_once(step, device)
    first = max(time_once(step, device) for step in steps)
    runs = max(repeats, min(100, math.ceil(0.5 / max(first, 1e-6))))
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(runs):
        for step, step_times in zip(steps, times, strict=True):
            step_times.append(time_once(step, device))
    return [1e3 * statistics.median(step_times) for step_times in times]


def peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Extra memory allocated at the peak of one step, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as file:
            events = json.load(file)["traceEvents"]
    totals = [
        event["args"]["Total Allocated"] for event in events if event.get("name") == "[memory]"
    ]
    return max([0, *totals]) / 2**20


def lfq_loss_agreement(z_bits: torch.Tensor) -> str:
    """Both libraries' LFQ losses on the same input (inv_temperature 100, gamma 1)."""
    ours_lfq = LFQ(LFQ_BITS, entropy_weight=0.1, commitment_weight=0.25).to(z_bits.device).train()
    theirs_lfq = vqp.LFQ(
        dim=LFQ_BITS, entropy_loss_weight=0.1, commitment_loss_weight=0.25, diversity_gamma=1.0
    )
    theirs_lfq = theirs_lfq.to(z_bits.device).train()
    with torch.no_grad():
        out = ours_lfq(z_bits)
        theirs_out, breakdown = theirs_lfq(
            z_bits, inv_temperature=100.0, return_loss_breakdown=True
        )
    return (
        f"LFQ loss on the same input: ours {out.loss.item():.6f} (per-sample entropy "
        f"{out.stats['per_sample_entropy'].item():.6f}, codebook entropy {out.stats['codebook_entropy'].item():.6f}); "
        f"theirs {theirs_out.entropy_aux_loss.item():.6f} (per-sample entropy "
        f"{breakdown.per_sample_entropy.item():.6f}, codebook entropy {breakdown.batch_entropy.item():.6f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="minimum timed runs per case")
    parser.add_argument("--cases", nargs="*", default=None, help="run cases whose name has one")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    z = torch.randn(BATCH, LENGTH, DIM, device=device, requires_grad=True)
    z_bits = torch.randn(BATCH, LENGTH, LFQ_BITS, device=device, requires_grad=True)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"z [{BATCH}, {LENGTH}, {DIM}] (LFQ [{BATCH}, {LENGTH}, {LFQ_BITS}]), "
        f"median of >= {args.repeats} alternating runs after {args.warmup} warm-up"
    )
    if vqp is None:
        print(
            "vector-quantize-pytorch is not installed: its column is skipped (pip install -e '.[bench]')"
        )
    else:
        print(f"vector-quantize-pytorch {getattr(vqp, '__version__', '')}".rstrip())

    header = f"{'case':<24} {'ours ms':>9} {'ours MiB':>9} {'theirs ms':>10} {'theirs MiB':>10} {'theirs/ours':>11} {'ours/matmul':>11}  target"
    print(header)
    print("-" * len(header))
    for case in build_cases(z, z_bits):
        if args.cases and not any(part in case.name for part in args.cases):
            continue
        steps = [case.ours()]
        if case.theirs is not None and vqp is not None:
            steps.append(case.theirs())
        if case.floor is not None:
            steps.append(case.floor())  # timed in the same alternating loop
        times = median_ms(steps, device, args.warmup, args.repeats)
        memories = [peak_mib(step, device) for step in steps]
        if case.floor is not None:
            floor_ms, floor_mem = times.pop(), memories.pop()
            label = "matmul z@C.T " + case.name.split()[-1]
            print(
                f"{label:<24} {floor_ms:>9.1f} {floor_mem:>9.1f} {'-':>10} {'-':>10} {'-':>11} {'1.00x':>11}"
            )
        ours_ms, ours_mem = times[0], memories[0]
        ratio = f"{times[1] / ours_ms:.2f}x" if len(times) == 2 else "-"
        theirs_cells = (
            f"{times[1]:>10.1f} {memories[1]:>10.1f}" if len(times) == 2 else f"{'-':>10} {'-':>10}"
        )
        floor = f"{ours_ms / floor_ms:.2f}x" if case.floor is not None else "-"
        print(
            f"{case.name:<24} {ours_ms:>9.1f} {ours_mem:>9.1f} {theirs_cells} "
            f"{ratio:>11} {floor:>11}  {case.target}"
        )
    if vqp is not None:
        print(lfq_loss_agreement(z_bits))


if __name__ == "__main__":
    main()
