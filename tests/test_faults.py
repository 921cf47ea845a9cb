"""What PIPS promises when a user (or the machine) does the wrong thing: nothing lost, no one in.

Each section is one numbered case of issue 14: a crafted checkpoint never runs code, one folder
holds one run, last.ckpt is fresh at every validation, a refused resume leaves the run alone, task
identity is unique, NaN reaches the guard, codes files are validated, a folder killed before its
first checkpoint is usable, every bad input is one sentence with exit status 2, signals end a run
with 128 + N, and the smaller edges. Real processes are started (and killed) where it matters.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
        f"grids.source={task_folder}",
        "grids.val_fraction=0.2",
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


def _train_then_signal(arguments, log: Path, ready, what: str, *signals) -> int:
    """Start ``pips train ARGUMENTS``, wait until ``ready()``, send ``signals``; its exit status."""
    process = _start("train", *arguments, log=log)
    try:
        _wait_for(ready, what=what)
        for number in signals:
            process.send_signal(number)
        return process.wait(timeout=120)
    finally:
        process.kill()


def _logged_steps(metrics: Path):
    """A condition: the run has logged a few training steps to ``metrics``."""
    return lambda: metrics.is_file() and metrics.read_text().count("\n") > 2


def _one_sentence(result, notes: bool = False) -> str:
    """The whole output of a refused command: one ``error:`` line, no traceback (``notes``:
    after ``note:`` lines, e.g. about a dead process's lock taken over)."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    if notes:
        lines = [line for line in lines if not line.startswith("note: ")]
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
    from pips.tasks.checkpoint_io import SAFE_GLOBALS, safe_torch_load

    run_dir, _ = tiny_run
    assert SAFE_GLOBALS == []  # PIPS saves tensors and plain values only: no allow-list needed
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint = safe_torch_load(path)
        assert isinstance(checkpoint["hyper_parameters"]["config"], dict)


def test_lightning_resume_reads_through_the_safe_loader(crafted_checkpoint):
    from pips.tasks.checkpoint_io import AtomicCheckpointIO, UnsafeCheckpoint

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
    four = lambda: "step 8: val" in log.read_text()  # noqa: E731
    _train_then_signal(arguments, log, four, "four validations", signal.SIGKILL)
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


# ----------------------------------------------------------------------------- 5. task identity


def test_tasks_with_the_same_file_name_in_two_folders_all_decode(
    tiny_run, task_folder, tmp_path, cli
):
    data = tmp_path / "nested"
    one = json.loads(next(iter(sorted(task_folder.glob("*.json")))).read_text())
    for part in ("a", "b"):
        (data / part).mkdir(parents=True)
        (data / part / "t.json").write_text(json.dumps(one))
    encoded = cli("encode", tiny_run[0], "--data", f"{data}:all", "--out", tmp_path / "codes.npz")
    assert encoded.exit_code == 0, encoded.output
    grids = 2 * sum(len(pair) for subset in ("train", "test") for pair in one.get(subset, []))
    assert f"encoded {grids} grids" in encoded.output
    decoded = cli("decode", tiny_run[0], tmp_path / "codes.npz", "--out", tmp_path / "grids.json")
    assert decoded.exit_code == 0, decoded.output
    assert f"decoded {grids} grids of 2 tasks" in decoded.output
    tasks = json.loads((tmp_path / "grids.json").read_text())
    assert sorted(tasks) == ["a/t", "b/t"]


# ----------------------------------------------------------------------------- 6. NaN and numbers


def test_a_huge_learning_rate_reaches_the_nan_guard(task_folder, tmp_path, cli):
    result = cli("train", *_small(task_folder, tmp_path, "name=hot", "optim.lr.start=1e10"))
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert "the training loss became nan" in result.output and "Traceback" not in result.output
    status = json.loads((tmp_path / "hot" / "status.json").read_text())
    assert status["status"] == "crashed" and "NonFiniteLoss" in status["error"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lr.start=.nan", "finite"),
        ("optim.lr.start=.inf", "finite"),
        ("optim.lr.start=-1", ">= 0"),
        ("optim.lr.end=-1e-3", ">= 0"),
        ("optim.grad_clip=.inf", "finite"),
        ("loss.kl=.nan", "finite"),
    ],
)
def test_non_finite_numbers_and_negative_rates_are_refused(tmp_path, cli, override, words):
    line = _one_sentence(cli("train", TINY_CONFIG, f"run_root={tmp_path / 'runs'}", override))
    assert override.split("=")[0].rsplit(".", 1)[0] in line and words in line
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 7. codes files


@pytest.fixture(scope="module")
def codes_file(tiny_run, tmp_path_factory):
    from typer.testing import CliRunner

    from pips.cli import app

    path = tmp_path_factory.mktemp("codes") / "codes.npz"
    result = CliRunner().invoke(
        app, ["encode", str(tiny_run[0]), "--out", str(path), "--data", "arc1:evaluation"]
    )
    assert result.exit_code == 0, result.output
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _huge_pair(files):
    files["pair_indices"] = files["pair_indices"].copy()
    files["pair_indices"][0] = 10**9


CRAFTED_CODES = {
    "huge pair index": (_huge_pair, "pair index 1000000000"),
    "negative pair index": (lambda f: f["pair_indices"].__setitem__(0, -1), "pair index -1"),
    "float code_shapes": (
        lambda f: f.__setitem__("code_shapes", f["code_shapes"].astype(float)),
        "integers",
    ),
    "1-D code_shapes": (
        lambda f: f.__setitem__("code_shapes", f["code_shapes"][:, 0]),
        "[items, rank]",
    ),
    "unknown subset": (lambda f: f["subsets"].__setitem__(0, "dev"), "'dev'"),
    "short metadata": (lambda f: f.__setitem__("roles", f["roles"][:-1]), "one entry per item"),
    "shapes disagree": (lambda f: f["code_shapes"].__setitem__((0, 0), 7), "describe"),
    "float codes": (lambda f: f.__setitem__("codes", f["codes"].astype(float)), "integers"),
    "2-D codes": (lambda f: f.__setitem__("codes", f["codes"].reshape(-1, 1, 1)), "flat array"),
    "huge board": (lambda f: f["code_shapes"].__setitem__((0, 0), 10**6), "1 to 65536"),
    "bad layout": (lambda f: f.__setitem__("layout", np.asarray("sideways")), "pooled or spatial"),
    "numeric task ids": (
        lambda f: f.__setitem__("task_ids", np.arange(len(f["task_ids"]))),
        "strings",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_CODES))
def test_a_crafted_codes_file_is_one_sentence(tiny_run, codes_file, tmp_path, cli, case):
    change, words = CRAFTED_CODES[case]
    files = {key: value.copy() for key, value in codes_file.items()}
    change(files)
    path = tmp_path / "crafted.npz"
    np.savez(path, **files)
    line = _one_sentence(cli("decode", tiny_run[0], path, "--out", tmp_path / "grids.json"))
    assert "crafted.npz" in line and words in line, line
    assert not (tmp_path / "grids.json").exists()


# ----------------------------------------------------------------------------- 8. killed before a checkpoint


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(task_folder, tmp_path, cli):
    run_dir = tmp_path / "early"
    log = tmp_path / "early.log"
    arguments = _small(
        task_folder,
        tmp_path,
        "name=early",
        "trainer.max_steps=100000",
        "trainer.val_every=100000",
        "trainer.log_every=1",
    )
    _train_then_signal(
        arguments, log, _logged_steps(run_dir / "metrics.csv"), "steps", signal.SIGKILL
    )
    temporary = run_dir / "checkpoints" / ".last.ckpt.x1y2z3.tmp"  # what a killed save leaves
    temporary.parent.mkdir(exist_ok=True)
    temporary.write_bytes(b"half a checkpoint")
    line = _one_sentence(cli("resume", run_dir), notes=True)
    assert (
        "stopped before its first checkpoint" in line
        and f"pips train {run_dir}/config.yaml" in line
    )
    again = cli("train", run_dir / "config.yaml", "trainer.max_steps=2", "trainer.val_every=2")
    assert again.exit_code == 0, again.output
    assert "starting it again" in again.output
    assert not temporary.exists(), "a stale temporary file survived the next start"
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 2
    with open(run_dir / "metrics.csv", newline="") as file:  # only the new run's rows
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("step")]
    assert steps and max(steps) <= 2


# ----------------------------------------------------------------------------- 9. bad data and places


def _task(grid) -> bytes:
    return json.dumps({"train": [{"input": grid, "output": [[1]]}]}).encode()


MALFORMED_TASKS = {
    "colour 11": _task([[11]]),
    "colour -1": _task([[-1]]),
    "a float cell": _task([[1.5]]),
    "a string cell": _task([["3"]]),
    "a boolean cell": _task([[True]]),
    "a null cell": _task([[None]]),
    "nested lists": _task([[[1]]]),
    "10^30": b'{"train": [{"input": [[1000000000000000000000000000000]], "output": [[1]]}]}',
    "ragged rows": _task([[1, 2], [3]]),
    "31x31": _task([[0] * 31] * 31),
    "an empty grid": _task([]),
    "an empty row": _task([[]]),
    "a row that is a number": _task([1, 2]),
    "a grid that is a string": _task("1"),
    "truncated JSON": b'{"train": [{"input": [[1',
    "not JSON": b"hello, world",
    "an empty file": b"",
    "a list at top level": b"[1, 2, 3]",
    "no train": b'{"test": []}',
    "train is not a list": b'{"train": {}}',
    "a pair that is a list": b'{"train": [[[1]]]}',
    "a pair without output": b'{"train": [{"input": [[1]]}]}',
    "test is not a list": b'{"train": [], "test": 5}',
    "Latin-1 bytes": b'{"train": [], "name": "caf\xe9"}',
}


@pytest.mark.parametrize("case", list(MALFORMED_TASKS))
def test_malformed_data_is_one_sentence_before_a_run_folder(task_folder, tmp_path, cli, case):
    data = tmp_path / "data"
    shutil.copytree(task_folder, data)
    (data / "bad.json").write_bytes(MALFORMED_TASKS[case])
    run_root = tmp_path / "runs"
    line = _one_sentence(cli("train", *_small(data, run_root, "name=x")))
    assert "bad.json" in line
    assert not run_root.exists(), "a run folder was made for data that cannot be read"


def test_a_utf8_bom_is_read_not_refused(task_folder, tmp_path):
    from pips.data.arc import load_grids

    data = tmp_path / "bom"
    data.mkdir()
    (data / "t.json").write_bytes(b"\xef\xbb\xbf" + _task([[1, 2]]))
    assert [r.grid.tolist() for r in load_grids(str(data), "all")] == [[[1, 2]], [[1]]]


def _one_task(task_folder, tmp_path) -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(next(iter(sorted(task_folder.glob("*.json")))), folder)
    return folder


@pytest.mark.parametrize(
    "case, words",
    [
        ("zero tasks", "holds no .json files"),
        ("one task", "split holds no grids"),
        ("a missing folder", "does not exist"),
        ("a file as run_root", "is a file, not a folder"),
        ("an unwritable run_root", "cannot create the run folder"),
        ("seed=-1", "'seed' must be >= 0"),
        ("trainer.accelerator=gpu", "no CUDA GPU"),
        ("grids.source=arc3", "unknown ARC source 'arc3'"),
        ("name=../../x", "must be one folder name inside run_root"),
        ("name=/abs", "must be one folder name inside run_root"),
        ("a truncated --from", "truncated or corrupt"),
    ],
)
def test_bad_places_and_settings_are_one_sentence(task_folder, tmp_path, cli, case, words):
    if case == "trainer.accelerator=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_root = tmp_path / "runs"
    extra = {"seed=-1": ["seed=-1"], "trainer.accelerator=gpu": ["trainer.accelerator=gpu"]}
    extra |= {"name=../../x": ["name=../../x"], "name=/abs": ["name=/abs"]}
    extra |= {"grids.source=arc3": ["grids.source=arc3"]}
    data, before = task_folder, []
    if case == "zero tasks":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "one task":
        data = _one_task(task_folder, tmp_path)
    elif case == "a missing folder":
        data = tmp_path / "nowhere"
    elif case == "a file as run_root":
        run_root = tmp_path / "file"
        run_root.write_text("not a folder")
    elif case == "an unwritable run_root":
        run_root = Path("/proc/pips-runs")  # not even root can write here
    elif case == "a truncated --from":
        truncated = tmp_path / "half.ckpt"
        truncated.write_bytes(b"PK\x03\x04 half a zip")
        before = ["--from", truncated]
    arguments = _small(data, run_root, "name=x", *extra.get(case, []))
    line = _one_sentence(cli("train", *before, *arguments))
    assert words in line, line
    assert not (run_root / "x").exists() and not (tmp_path / "x").exists()


def test_evaluate_on_a_bad_folder_is_one_sentence(tiny_run, tmp_path, cli):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.json").write_bytes(MALFORMED_TASKS["colour 11"])
    line = _one_sentence(cli("evaluate", tiny_run[0], "--data", data))
    assert "bad.json" in line and "colour 11" in line


def test_a_full_disk_is_a_sentence_and_keeps_the_earlier_checkpoint(
    task_folder, tmp_path, cli, monkeypatch
):
    import errno

    from pips.tasks import checkpoint_io

    real = checkpoint_io.atomic_torch_save
    calls = {"n": 0}

    def save(obj, path):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", save)
    result = cli(
        "train",
        *_small(task_folder, tmp_path, "name=full", "trainer.max_steps=6", "trainer.val_every=2"),
    )
    assert result.exit_code == 2, result.output + repr(result.exception)
    last = result.output.strip().splitlines()[-1]
    assert (
        last.startswith("error: the run stopped: No space left on device") and "pips resume" in last
    )
    assert "Traceback" not in result.output
    assert _step(tmp_path / "full" / "checkpoints" / "best-step2.ckpt") == 2  # survived


# ----------------------------------------------------------------------------- 10. signals


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_sigterm_during_the_final_evaluation_stops_the_run_with_143(tmp_path):
    # arc1's evaluation split (3,500 grids) makes the final evaluation last a few seconds
    run_dir = tmp_path / "final"
    arguments = [TINY_CONFIG, f"run_root={tmp_path}", "name=final", "trainer.max_steps=2"]
    arguments += ["trainer.val_every=2", "trainer.image_every=0", "trainer.progress=false"]
    log = tmp_path / "final.log"
    last = run_dir / "checkpoints" / "last.ckpt"
    ended = lambda: last.is_file() and _step(last) == 2  # noqa: E731
    code = _train_then_signal(arguments, log, ended, "the end of training", signal.SIGTERM)
    assert code == 143, log.read_text()
    output = log.read_text()
    assert "SIGTERM: stopped during the final evaluation" in output and "pips resume" in output
    assert _status(run_dir)["status"] == "interrupted" and _status(run_dir)["signal"] == "SIGTERM"
    assert not (run_dir / "summary.json").exists()


def test_sigterm_before_training_starts_is_an_interrupted_run(tmp_path):
    run_dir = tmp_path / "early"
    arguments = [TINY_CONFIG, f"run_root={tmp_path}", "name=early", "trainer.progress=false"]
    log = tmp_path / "early.log"
    # status.json says running while arc1 is still being read: no handler of RunGuard yet
    started = (run_dir / "status.json").is_file
    code = _train_then_signal(arguments, log, started, "the run to start", signal.SIGTERM)
    assert code == 143, log.read_text()
    assert _status(run_dir)["status"] == "interrupted"
    assert "SIGTERM: stopped" in log.read_text()
    assert not (run_dir / ".lock").exists()


def test_a_double_ctrl_c_exits_130_as_interrupted_with_the_resume_line(task_folder, tmp_path):
    run_dir = tmp_path / "cc"
    arguments = _small(
        task_folder, tmp_path, "name=cc", "trainer.max_steps=100000", "trainer.log_every=1"
    )
    log = tmp_path / "cc.log"
    stepping = _logged_steps(run_dir / "metrics.csv")
    code = _train_then_signal(arguments, log, stepping, "steps", signal.SIGINT, signal.SIGINT)
    assert code == 130, log.read_text()
    output = log.read_text()
    assert "pips resume" in output or "pips train" in output
    assert "Traceback" not in output
    assert _status(run_dir)["status"] == "interrupted"


# ----------------------------------------------------------------------------- 11. smaller edges


def test_the_slurm_script_passes_an_override_with_spaces_as_one_argument(tmp_path, cli):
    override = "optim.lr={kind: cosine, start: 1e-3}"
    out = tmp_path / "launch"
    result = cli("launch", TINY_CONFIG, override, "--slurm", "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    env = {**ENV, "PATH": f"{fake}:{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args")}
    ran = subprocess.run(
        ["bash", str(out / "job.sbatch")], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    arguments = (tmp_path / "args").read_text().splitlines()
    assert override in arguments, arguments


def test_encode_and_decode_write_into_a_folder_and_print_the_file(
    tiny_run, task_folder, tmp_path, cli
):
    folder = tmp_path / "out"
    folder.mkdir()
    encoded = cli("encode", tiny_run[0], "--data", task_folder, "--out", folder)
    assert encoded.exit_code == 0 and str(folder / "codes.npz") in encoded.output
    bare = cli("encode", tiny_run[0], "--data", task_folder, "--out", tmp_path / "codes")
    assert bare.exit_code == 0 and str(tmp_path / "codes.npz") in bare.output
    assert (tmp_path / "codes.npz").is_file()
    decoded = cli("decode", tiny_run[0], folder / "codes.npz", "--out", folder)
    assert decoded.exit_code == 0, decoded.output
    assert str(folder / "grids.json") in decoded.output and (folder / "grids.json").is_file()


def test_report_on_a_truncated_summary_is_one_sentence(copy_run, cli):
    (copy_run / "summary.json").write_text('{"steps": 3')
    line = _one_sentence(cli("report", copy_run))
    assert "summary.json" in line and "damaged" in line


def test_wall_seconds_count_the_time_before_an_interruption(task_folder, tmp_path, cli):
    common = _small(task_folder, tmp_path, "name=w", "trainer.max_steps=4", "trainer.val_every=2")
    stopped = cli("train", *common, "trainer.stop_at_step=2")
    assert stopped.exit_code == 0, stopped.output  # a planned stop is not a failure
    first = _status(tmp_path / "w")["wall_seconds"]
    assert first > 0
    resumed = cli("resume", tmp_path / "w", "trainer.stop_at_step=null")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["wall_seconds"] > first
    assert _status(tmp_path / "w")["wall_seconds"] >= summary["wall_seconds"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["task=images", "images.dataset=mnist", "images.folder=/nonexistent"], "IDX files"),
        (["task=sequences", "sequences.preset=nope"], "unknown GSSM preset"),
        (["task=sequences", "sequences.train_file=/nonexistent.npz"], "nonexistent"),
    ],
)
def test_images_and_sequences_data_are_checked_before_the_run_folder(
    overrides, words, tmp_path, cli
):
    line = _one_sentence(cli("train", *overrides, f"run_root={tmp_path}", "name=bad"))
    assert words in line, line
    assert not (tmp_path / "bad").exists()


def test_an_exported_model_is_safetensors_and_serves_every_verb(
    tiny_run, task_folder, tmp_path, cli
):
    """pips export writes the weights as safetensors (raw tensors and string metadata: nothing
    in it can run); evaluate, encode/decode and pips.load read it like the checkpoint."""
    import pips

    run_dir, _ = tiny_run
    out = tmp_path / "model"
    exported = cli("export", run_dir, "--out", out)
    assert exported.exit_code == 0, exported.output
    file = tmp_path / "model.safetensors"
    assert file.is_file() and str(file) in exported.output
    from_run = json.loads(cli("evaluate", run_dir, "--data", task_folder, "--json").output)
    from_file = json.loads(cli("evaluate", file, "--data", task_folder, "--json").output)
    assert from_file["metrics"]["cell_accuracy"] == from_run["metrics"]["cell_accuracy"]
    grids = [np.array([[1, 2], [3, 4]])]
    np.testing.assert_array_equal(
        pips.load(file).encode(grids)[0], pips.load(run_dir).encode(grids)[0]
    )
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    line = _one_sentence(cli("evaluate", tmp_path / "other.safetensors"))
    assert "other.safetensors" in line


def test_a_model_that_does_not_fit_its_data_is_one_sentence_before_the_folder(tmp_path, cli):
    line = _one_sentence(
        cli(
            "train", "task=images", "images.backbone=vit", "model.patch_size=3",
            f"run_root={tmp_path}", "name=bad",
        )
    )  # fmt: skip
    assert "model.patch_size=3" in line
    assert not (tmp_path / "bad").exists()
