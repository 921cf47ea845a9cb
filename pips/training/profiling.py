"""Where a training step's time goes: ``trainer.profiler=light`` (one JSON line per step) and
``trainer.profiler=torch`` (a torch.profiler trace of a window of steps)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LightProfiler(L.Callback):
    """``profile.jsonl``: per training step the seconds spent waiting for data, in forward
    (with the loss), backward and the optimizer step (with clipping and the hooks after it), the
    cells (tokens) per second and the peak memory. CUDA is synchronised at each boundary, so the
    numbers are true and the step a little slower."""

    def __init__(self, path: Path, elements=None):
        self.path = Path(path)
        self.elements = elements or (lambda batch: float(batch.elements))  # the task's count
        self.handle = None
        self.marks: dict[str, float] = {}
        self.last_end: float | None = None

    def _mark(self, module, name: str) -> None:
        _sync(module.device)
        self.marks[name] = time.perf_counter()

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.marks = {}
        self._mark(module, "start")

    def on_before_backward(self, trainer, module, loss) -> None:
        self._mark(module, "backward")

    def on_after_backward(self, trainer, module) -> None:
        self._mark(module, "backward_end")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self._mark(module, "optimizer")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._mark(module, "end")
        marks = self.marks
        end = marks["end"]
        data = 0.0 if self.last_end is None else marks["start"] - self.last_end
        self.last_end = end
        if self.handle is None:
            return
        forward_end = marks.get("backward", end)
        record = {
            "step": trainer.global_step,
            "data_seconds": data,
            "forward_seconds": forward_end - marks["start"],
            "backward_seconds": marks.get("backward_end", forward_end) - forward_end,
            "optimizer_seconds": end - marks.get("optimizer", end),
            "step_seconds": end - marks["start"],
            "grids": len(batch),
            "cells_per_second": self.elements(batch) / max(end - marks["start"], 1e-9),
            "peak_memory_mb": peak_memory_mb(module.device),
        }
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def on_train_end(self, trainer, module) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class TorchProfiler(L.Callback):
    """A torch.profiler trace (CPU, and CUDA when used) of steps ``wait + warmup`` to
    ``wait + warmup + active``, written as a TensorBoard / Chrome trace into ``folder``."""

    def __init__(self, folder: Path, wait: int = 4, warmup: int = 1, active: int = 5):
        self.folder = Path(folder)
        self.schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        self.profiler = None

    def on_train_start(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if module.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=self.schedule,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.folder)),
            record_shapes=True,
            profile_memory=True,
        )
        self.profiler.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def on_train_end(self, trainer, module) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None
