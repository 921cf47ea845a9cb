"""What PIPS promises when a user (or the machine) does the wrong thing: nothing lost, no one in.

Each section is one numbered case of issue 14: a crafted checkpoint never runs code, one folder
holds one run, last.ckpt is fresh at every validation, a refused resume leaves the run alone, task
identity is unique, NaN reaches the guard, codes files are validated, a folder killed before its
first checkpoint is usable, every bad input is one sentence with exit status 2, signals end a run
with 128 + N, and the smaller edges. Real processes are started (and killed) where it matters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _small(task_folder, run_root, *extra) -> list[str]:
    """A tiny run on 24 tasks: a couple of seconds of training."""
    return [
        str(TINY_CONFIG),
        f"run_root={run_root}",
        f"data.source={task_folder}",
        "data.val_fraction=0.2",
        "data.max_samples=48",
        "data.batch_size=8",
        "trainer.image_every=0",
        "trainer.progress=false",
        "trainer.threads=1",
        *[str(e) for e in extra],
    ]


def _start(*arguments, log: Path) -> subprocess.Popen:
    """``python -m pips.cli ARGUMENTS`` as a real process, its output into ``log``."""
    handle = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "pips.cli", *[str(a) for a in arguments]],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=ENV,
        cwd=REPO,
    )


def _wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _one_sentence(result) -> str:
    """The whole output of a refused command: one ``error:`` line, no traceback."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


# ----------------------------------------------------------------------------- 1. crafted checkpoints


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a crafted .ckpt does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted_checkpoint(tiny_run, tmp_path):
    """A copy of the tiny run whose last.ckpt (and best) also hold a code-running object."""
    source, _ = tiny_run
    run_dir = tmp_path / "crafted"
    shutil.copytree(source, run_dir)
    marker = tmp_path / "PAYLOAD_RAN"
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["callbacks"]["extra"] = _Payload(marker)
        torch.save(checkpoint, path)
    return run_dir, marker


@pytest.mark.parametrize("verb", ["evaluate", "resume", "train --from", "encode", "report"])
def test_a_crafted_checkpoint_never_runs_its_payload(crafted_checkpoint, tmp_path, cli, verb):
    run_dir, marker = crafted_checkpoint
    arguments = {
        "evaluate": ["evaluate", run_dir],
        "resume": ["resume", run_dir, "trainer.max_steps=40"],
        "train --from": [
            "train",
            TINY_CONFIG,
            "--from",
            run_dir,
            f"run_root={tmp_path / 'runs'}",
            "name=child",
        ],
        "encode": ["encode", run_dir, "--out", tmp_path / "codes.npz"],
        "report": ["report", run_dir],
    }[verb]
    result = cli(*arguments)
    line = _one_sentence(result)
    assert "posix.system" in line and "could run code" in line
    assert not marker.exists(), "the checkpoint's payload ran"
    assert not (tmp_path / "runs").exists(), "a run folder was made for a refused --from"


def test_real_checkpoints_load_with_weights_only(tiny_run):
    from pips.training.checkpoint_io import SAFE_GLOBALS, safe_torch_load

    run_dir, _ = tiny_run
    assert SAFE_GLOBALS == []  # PIPS saves tensors and plain values only: no allow-list needed
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint = safe_torch_load(path)
        assert isinstance(checkpoint["hyper_parameters"]["config"], dict)


def test_lightning_resume_reads_through_the_safe_loader(crafted_checkpoint):
    from pips.training.checkpoint_io import AtomicCheckpointIO, UnsafeCheckpoint

    run_dir, marker = crafted_checkpoint
    with pytest.raises(UnsafeCheckpoint):  # trainer.fit(ckpt_path=...) loads with this plugin
        AtomicCheckpointIO().load_checkpoint(
            run_dir / "checkpoints" / "last.ckpt", weights_only=False
        )
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. one run per folder


def test_a_second_run_into_a_busy_folder_stops_naming_the_process(task_folder, tmp_path):
    run_dir = tmp_path / "same"
    common = _small(task_folder, tmp_path, "name=same", "trainer.max_steps=100000")
    first = _start("train", *common, "seed=1", log=tmp_path / "first.log")
    try:
        _wait_for(lambda: (run_dir / ".lock").is_file(), what="the first run's lock")
        second = subprocess.run(
            [sys.executable, "-m", "pips.cli", "train", *common, "seed=2"],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=REPO,
            timeout=120,
        )
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, (tmp_path / "first.log").read_text()
    finally:
        first.kill()
    assert second.returncode == 2, second.stdout + second.stderr
    lines = [line for line in second.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and f"run folder {run_dir} is in use by process {first.pid}" in lines[0]
    assert "seed: 1" in (run_dir / "config.yaml").read_text()  # the first run's, untouched
    assert not (run_dir / ".lock").exists(), "the lock is released when the run ends"


def test_a_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path):
    from pips.training.lock import RunFolderLocked, RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    lock = RunLock(tmp_path).acquire()
    assert f"process {dead.pid}" in lock.stale_note() and "no longer runs" in lock.stale_note()
    with pytest.raises(RunFolderLocked, match=f"in use by process {os.getpid()}"):
        RunLock(tmp_path).acquire()  # a live holder (this process) keeps it
    lock.release()
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------- 3. last.ckpt fresh


def test_sigkill_after_non_improving_validations_keeps_the_latest_validation(
    task_folder, tmp_path, cli
):
    # optim.lr=0: every validation scores the same, so none after the first improves the best
    run_dir = tmp_path / "killed"
    arguments = _small(
        task_folder,
        tmp_path,
        "name=killed",
        "optim.lr=0",
        "trainer.max_steps=100000",
        "trainer.val_every=2",
    )
    log = tmp_path / "killed.log"
    process = _start("train", *arguments, log=log)
    try:
        _wait_for(lambda: "step 8: val" in log.read_text(), what="four validations")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    folder = run_dir / "checkpoints"
    assert [p.name for p in folder.glob("best*.ckpt")] == ["best-step2.ckpt"]  # never improved
    assert _step(folder / "last.ckpt") >= 6, "last.ckpt is older than the last validations"
    # the dead run's lock is taken over by the resume, which says so
    step = _step(folder / "last.ckpt")
    resumed = cli("resume", run_dir, f"trainer.max_steps={step + 2}", "trainer.val_every=100")
    assert resumed.exit_code == 0, resumed.output
    assert "no longer runs" in resumed.output
    assert _step(folder / "last.ckpt") == step + 2


# ----------------------------------------------------------------------------- 4. refused resume


def test_a_resume_whose_model_does_not_fit_is_refused_before_writing(copy_run, cli):
    before = {p: p.read_bytes() for p in copy_run.rglob("*") if p.is_file()}
    line = _one_sentence(cli("resume", copy_run, "model.width=64"))
    assert "different shapes" in line and "model.width (32 -> 64)" in line
    after = {p: p.read_bytes() for p in copy_run.rglob("*") if p.is_file()}
    assert after == before, "a refused resume changed the run folder"
    assert cli("resume", copy_run, "trainer.max_steps=32").exit_code == 0  # still resumable
