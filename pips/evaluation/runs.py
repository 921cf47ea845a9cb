"""Read run folders back: status, steps, best validation metrics and wall time (`pips runs`), and
one row per run for `pips compare`."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import yaml

from pips.plots import read_metrics
from pips.tasks import TASKS
from pips.tasks.checkpoints import read_json_record


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def run_status(run_dir: Path) -> str:
    """running / finished / interrupted / crashed (a "running" run whose process on this host
    is gone crashed without saying so); runs from before status.json: finished if they have a
    summary, else incomplete."""
    record = read_json_record(run_dir / "status.json")
    status = record.get("status")
    if status is None:
        return "finished" if (run_dir / "summary.json").is_file() else "incomplete"
    if status == "running" and record.get("host") == socket.gethostname():
        pid = record.get("pid")
        if isinstance(pid, int) and not _process_alive(pid):
            return "crashed"
    return status


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def find_runs(root: Path) -> list[Path]:
    """Run folders in ``root`` (or ``root`` itself), newest first; one level deep."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    if not root.is_dir():
        return []
    runs = [path for path in root.iterdir() if path.is_dir() and is_run_dir(path)]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def _best(series: dict, key: str, mode: str = "max") -> float | None:
    if key not in series:
        return None
    values = series[key][1]
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return float(values.max() if mode == "max" else values.min())


def _last(series: dict, key: str) -> float | None:
    if key not in series or not len(series[key][1]):
        return None
    return float(series[key][1][-1])


def run_row(run_dir: Path) -> dict:
    """One run's name, status, model, steps, best validation metrics, final metrics, time."""
    run_dir = Path(run_dir)
    summary = read_json_record(run_dir / "summary.json")
    status_record = read_json_record(run_dir / "status.json")
    series = read_metrics(run_dir / "metrics.csv")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    model = config.get("model", {})
    quantizer = model.get("quantizer", {})
    steps = summary.get("steps")
    if steps is None and series:
        steps = int(max(float(s[0].max()) for s in series.values() if len(s[0])))
    wall = summary.get("wall_seconds")
    if wall is None and status_record.get("started"):
        started = time.mktime(time.strptime(status_record["started"], "%Y-%m-%dT%H:%M:%S"))
        wall = time.time() - started
    task = config.get("task", "grids")
    headline = TASKS[task].headline if task in TASKS else TASKS["grids"].headline
    metric, label, digits = headline.metric, headline.label, headline.digits
    learns_codes = TASKS[task].learns_codes if task in TASKS else True
    value = summary.get(metric, _best(series, f"val/{metric}", headline.mode))
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "status": run_status(run_dir),
        "task": task,
        "result": None if value is None else f"{label} {value:.{digits}f}",
        "headline": metric,
        "layout": model.get("layout") if learns_codes else None,
        "quantizer": quantizer.get("kind") if learns_codes else None,
        "steps": steps,
        "best_cell_accuracy": _best(series, "val/cell_accuracy"),
        "best_grid_accuracy": _best(series, "val/grid_accuracy"),
        "cell_accuracy": summary.get("cell_accuracy"),
        "grid_accuracy": summary.get("grid_accuracy"),
        "codebook_perplexity": summary.get(
            "codebook_perplexity", _last(series, "val/codebook_perplexity")
        ),
        "bits_per_grid": summary.get("bits_per_grid"),
        "dead_codes": summary.get("val_dead_codes"),
        "grids_per_second": summary.get("grids_per_second"),
        "wall_seconds": wall,
        "error": status_record.get("error"),
    }


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
