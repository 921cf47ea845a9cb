"""``metrics.csv`` in the run folder: a Lightning logger that appends across resumes.

Lightning's CSVLogger deletes an existing metrics.csv whenever its folder is not empty, which
would erase a run's history on `pips resume`. This logger implements Lightning's public
``Logger`` interface itself: rows are kept until ``save``, then appended under the file's
header; when a new metric appears, the file is rewritten once with the wider header.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only


class RunCSVLogger(Logger):
    """Writes ``metrics.csv`` straight into the run folder (one row per logging call, a ``step``
    column) and appends across resumes."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.keys: list[str] = self._header()

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    def _header(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return list(next(csv.reader(handle), []))

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args, **kwargs) -> None:
        """The resolved config is the run's config.yaml; nothing more to write here."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        row["step"] = len(self.rows) if step is None else step
        self.rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self.rows:
            return
        new = sorted(set().union(*self.rows) - set(self.keys))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if new and self.path.is_file():  # a wider header: rewrite the earlier rows under it
            self.keys = sorted(self.keys + new)
            with open(self.path, newline="") as handle:
                earlier = list(csv.DictReader(handle))
            with open(self.path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.keys)
                writer.writeheader()
                writer.writerows(earlier)
        elif new:
            self.keys = sorted(self.keys + new)
        exists = self.path.is_file()
        with open(self.path, "a" if exists else "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self.rows)
        self.rows = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
