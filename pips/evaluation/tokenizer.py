"""A trained run as a tokenizer for your own code: ``pips.load(run)`` -> :class:`Tokenizer`.

``encode`` turns items (ARC grids, images, sequences: whatever the run's task learns codes of)
into code arrays and ``decode`` turns code arrays back into items, exactly as `pips encode` and
`pips decode` do; the model is the run's best checkpoint (or ``which="last"``), on CPU unless
``device`` says otherwise, in eval mode with argmax codes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pips.config import Config
from pips.tasks import Task, get_task
from pips.tasks.checkpoints import load_model


class Tokenizer:
    """A trained model and its task: ``encode(items)`` -> codes, ``decode(codes)`` -> items."""

    def __init__(self, model: torch.nn.Module, task: Task, checkpoint: Path, step: int, run_dir):
        self.model = model.eval()
        self.task = task
        self.checkpoint = checkpoint
        self.step = step
        self.run_dir = run_dir

    @property
    def config(self) -> Config:
        return self.task.config

    @property
    def codebook_size(self) -> int:
        """Distinct values of one code index."""
        return int(self.model.quantizer.codebook_size)

    @property
    def bits_per_code(self) -> float:
        """Bits one latent's indices can carry: log2 of the codebook size times the indices per
        latent (residual stages, groups)."""
        levels = getattr(self.model, "code_levels", 1)
        return levels * math.log2(self.codebook_size) if self.codebook_size > 1 else 0.0

    @property
    def bits_per_item(self) -> float | None:
        """The code string's capacity per item on the run's validation split, as its final
        evaluation measured it (for spatial grid codes it depends on the grid's size); None when
        the run has not finished."""
        if self.run_dir is None:
            return None
        path = Path(self.run_dir) / "summary.json"
        try:
            summary = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return None
        value = summary.get(f"bits_per_{self.task.unit.removesuffix('s')}")
        return None if value is None else float(value)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> Tokenizer:
        self.model.to(device)
        return self

    def encode(self, items) -> list[np.ndarray]:
        """Items -> one integer code array per item (grids: a list of ``[H, W]`` int arrays;
        images: ``[N, C, H, W]`` in [0, 1]; sequences: ``[N, T]`` tokens)."""
        if isinstance(items, list | tuple) and items and not self.task.takes_data_spec:
            items = np.stack([np.asarray(item) for item in items])
        with torch.no_grad():
            return self.task.encode(self.model, items)

    def decode(self, codes) -> list:
        """Code arrays (what :meth:`encode` returns) -> items, one per code array."""
        with torch.no_grad():
            return self.task.decode(self.model, [np.asarray(c) for c in codes])

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.task.name}, {self.checkpoint}, step {self.step}, "
            f"{self.codebook_size} codes)"
        )


def load(path: str | Path, device: torch.device | str = "cpu", which: str = "best") -> Tokenizer:
    """The tokenizer of a run folder or a ``.ckpt`` file (its best checkpoint by default)."""
    loaded = load_model(path, which)
    tokenizer = Tokenizer(
        loaded.model, get_task(loaded.config), loaded.checkpoint, loaded.step, loaded.run_dir
    )
    return tokenizer.to(device)
