"""The two-part code as a fact: ARC-AGI-1 evaluation tasks through `pips compress` and
`pips decompress` with a prior run, checked for an exact round trip, the stream's length beside
the model's codelength and beside zlib -9 / xz -9e on the same grids.

    .venv/bin/python benchmarks/compress.py runs/arc_prior --tasks 20
    .venv/bin/python benchmarks/compress.py runs/arc_prior_raw --tasks 400   # every task (slow)

Coding is token by token at batch 1 (the receiver's way), about a millisecond per token for the
presets' 4-block priors on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pips.data.arc import load_grids, read_task_file
from pips.data.compressors import arc_baselines
from pips.evaluation.commands import compress_file, decompress_file


def evaluation_tasks(count: int) -> dict:
    """The first ``count`` ARC-AGI-1 evaluation tasks (by id) as one object of tasks."""
    tasks: dict = {}
    for record in load_grids("arc1", "evaluation", distinct=False):
        if record.task_id not in tasks and len(tasks) == count:
            break
        task = tasks.setdefault(record.task_id, {"train": [], "test": []})
        pairs = task[record.subset]
        while len(pairs) <= record.pair_index:
            pairs.append({})
        pairs[record.pair_index][record.role] = record.grid.tolist()
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a prior run folder (task prior)")
    parser.add_argument("--tasks", type=int, default=20, help="evaluation tasks to code")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = evaluation_tasks(args.tasks)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "tasks.json"
        source.write_text(json.dumps(tasks))
        started = time.perf_counter()
        result = compress_file(args.run, source, Path(folder) / "tasks.pips")
        encode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        decompress_file(args.run, Path(folder) / "tasks.pips", Path(folder) / "back.json")
        decode_seconds = time.perf_counter() - started
        exact = json.loads((Path(folder) / "back.json").read_text()) == tasks
        grids = [r.grid for r in read_task_file(source)]
    count = result["items"]
    baselines = arc_baselines(grids)
    payload, model = result["payload_bits"], result["codelength_bits"]
    print(f"{len(tasks)} tasks, {count} grids, round trip exact: {exact}")
    print(
        f"stream {payload / count:.1f} bits/grid (payload {payload} bits), model codelength "
        f"{model / count:.1f} (prior {result['prior_bits'] / count:.1f} + decoder "
        f"{result['decoder_bits'] / count:.1f}); stream / model = {payload / model:.4f}, "
        f"excess {(payload - model) / 8:.1f} bytes; header {result['header_bytes']} bytes"
    )
    print(
        f"same grids: zlib -9 {baselines['zlib_bits']:.1f}, xz -9e {baselines['xz_bits']:.1f}, "
        f"order-0 {baselines['order0_bits']:.1f} bits/grid"
    )
    print(f"compress {encode_seconds:.1f} s, decompress {decode_seconds:.1f} s")


if __name__ == "__main__":
    main()
