"""Loggers for the run folder: a CSV logger that keeps earlier rows when a run is resumed.

Lightning's CSVLogger deletes an existing metrics.csv whenever its folder is not empty, which
would erase a run's history on `pips resume`; this one appends under the existing header.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = list(header)

    def _check_log_dir_exists(self) -> None:
        """Keep metrics.csv: the folder holds the run's config and earlier rows on purpose."""


class RunCSVLogger(CSVLogger):
    """Writes ``metrics.csv`` straight into the run folder and appends across resumes."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__(save_dir=run_dir, name="", version="")

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
