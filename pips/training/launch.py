"""`pips launch`: one run or a sweep, on torchrun (local processes) or SLURM (an sbatch script).

A sweep ``--sweep key=v1,v2 --sweep other=a,b`` expands to the cartesian product of values, one
run folder each, named ``<name>-<key>_<value>-...``. torchrun runs them one after another
(``torchrun --standalone --nproc-per-node N -m pips.cli train ...``). SLURM gets one plain sbatch
script: a job array with one task per run, one task per GPU, ``--signal=USR1@90`` so the run saves
``last.ckpt`` before the time limit or a pre-emption, a resume when the run folder already has a
checkpoint, and ``scontrol requeue`` when the run stopped on that signal.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pips.config import ConfigError, load_config

STOP_SIGNALS = "trainer.stop_signals=[SIGINT,SIGTERM,SIGUSR1]"


@dataclass
class SlurmOptions:
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    time: str = "24:00:00"
    account: str | None = None
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. "--qos=high"


def expand_sweep(sweeps: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> ``[["a=1","b=x"], ["a=1","b=y"], ["a=2","b=x"], ["a=2","b=y"]]``."""
    axes = []
    for sweep in sweeps:
        key, equals, values = sweep.partition("=")
        if not equals or not key or not values:
            raise ConfigError(f"--sweep looks like key=v1,v2,...; got {sweep!r}")
        # a list value keeps its commas: key=[1,2];[3,4] is two lists
        parts = values.split(";") if values.startswith("[") else values.split(",")
        axes.append([f"{key.strip()}={value.strip()}" for value in parts if value.strip()])
    return [list(combination) for combination in itertools.product(*axes)] if axes else [[]]


def run_name(base: str, combination: list[str]) -> str:
    parts = [base]
    for override in combination:
        key, _, value = override.partition("=")
        short = key.split(".")[-1]
        parts.append(f"{short}_{value}")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "", "-".join(parts))


def plan_runs(
    config_path: str, overrides: list[str], sweeps: list[str], base: str
) -> list[tuple[str, list[str]]]:
    """(run name, overrides) for each run of the sweep; every config is checked first."""
    runs = []
    for combination in expand_sweep(sweeps):
        name = run_name(base, combination)
        run_overrides = [*overrides, *combination]
        load_config(config_path, [*run_overrides, f"name={name}"])
        runs.append((name, run_overrides))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"the sweep gives runs the same name ({names}); use distinct values")
    return runs


def torchrun_commands(
    config_path: str, runs: list[tuple[str, list[str]]], processes: int
) -> list[list[str]]:
    commands = []
    for name, overrides in runs:
        command = ["torchrun", "--standalone", f"--nproc-per-node={processes}"]
        command += ["-m", "pips.cli", "train", config_path, *overrides, f"name={name}"]
        if processes > 1:
            command += [f"trainer.devices={processes}", "trainer.strategy=ddp"]
        commands.append(command)
    return commands


def sbatch_script(
    config_path: str,
    runs: list[tuple[str, list[str]]],
    run_root: str,
    options: SlurmOptions,
    log_dir: str,
) -> str:
    """A readable sbatch script: a job array over the runs, resuming and requeueing itself."""
    tasks = options.gpus_per_node
    lines = ["#!/bin/bash", f"#SBATCH --job-name=pips-{runs[0][0] if len(runs) == 1 else 'sweep'}"]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    lines += [
        f"#SBATCH --nodes={options.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --gpus-per-node={tasks}",
        f"#SBATCH --cpus-per-task={options.cpus_per_task}",
        f"#SBATCH --time={options.time}",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={log_dir}/slurm-%A_%a.out",
    ]
    if len(runs) > 1:
        lines.append(f"#SBATCH --array=0-{len(runs) - 1}")
    lines += [f"#SBATCH {extra}" for extra in options.extra]
    lines += [
        "",
        "# One run per array task. Each run saves checkpoints/last.ckpt when SLURM sends USR1",
        "# (90 s before the time limit, or on pre-emption) and the job requeues itself; a",
        "# requeued task finds the checkpoint and resumes.",
        "set -euo pipefail",
        "",
        "NAMES=(",
        *[f"  {shlex.quote(name)}" for name, _ in runs],
        ")",
        "TASK=${SLURM_ARRAY_TASK_ID:-0}",
        "NAME=${NAMES[$TASK]}",
        "# each run's overrides, one word per override (a value may hold spaces and commas)",
        'case "$TASK" in',
        *[
            f"  {i}) OVERRIDES=({shlex.join(overrides)}) ;;"
            for i, (_, overrides) in enumerate(runs)
        ],
        "esac",
        f"RUN_DIR={shlex.quote(run_root)}/$NAME",
        "",
        "# a run stopped by a signal exits 128 + N (143 SIGTERM, 138 SIGUSR1): not an error here",
        "CODE=0",
        'if [ -f "$RUN_DIR/checkpoints/last.ckpt" ]; then',
        f'  srun pips resume "$RUN_DIR" {STOP_SIGNALS} || CODE=$?',
        "else",
        f'  srun pips train {shlex.quote(config_path)} "${{OVERRIDES[@]}}" name="$NAME" \\',
        f"    run_root={shlex.quote(run_root)} trainer.devices={tasks} "
        f"trainer.num_nodes={options.nodes} trainer.strategy=ddp \\",
        f"    {STOP_SIGNALS} || CODE=$?",
        "fi",
        "",
        "STATUS=$(python -c \"import json,sys; print(json.load(open(sys.argv[1]))['status'])\" \\",
        '  "$RUN_DIR/status.json" 2>/dev/null || echo unknown)',
        'if [ "$STATUS" = "interrupted" ]; then',
        "  JOB=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}",
        '  echo "run $NAME stopped on a signal: requeueing $JOB"',
        '  scontrol requeue "$JOB"',
        "  exit 0",
        "fi",
        'exit "$CODE"',
        "",
    ]
    return "\n".join(lines)


def write_launch(
    config_path: str,
    overrides: list[str],
    sweeps: list[str],
    out: Path,
    torchrun: int | None = None,
    slurm: SlurmOptions | None = None,
    base: str = "run",
) -> tuple[Path, list[list[str]] | None]:
    """Write ``out/launch.sh`` (torchrun) or ``out/job.sbatch`` (SLURM); returns the file and
    the commands (torchrun) for running them."""
    if (torchrun is None) == (slurm is None):
        raise ConfigError("pips launch needs exactly one of --torchrun N or --slurm")
    runs = plan_runs(config_path, overrides, sweeps, base)
    run_root = load_config(config_path, overrides).run_root
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if torchrun is not None:
        commands = torchrun_commands(config_path, runs, torchrun)
        script = out / "launch.sh"
        body = ["#!/bin/bash", "# one run after another; each is a torchrun job", "set -e"]
        body += [shlex.join(command) for command in commands]
        script.write_text("\n".join(body) + "\n")
        script.chmod(0o755)
        return script, commands
    script = out / "job.sbatch"
    script.write_text(sbatch_script(config_path, runs, run_root, slurm, str(out.resolve())))
    return script, None
