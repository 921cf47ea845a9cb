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


def check_run_root(run_root: str | Path) -> None:
    """``run_root`` is (or can become) a writable folder."""
    root = Path(run_root)
    if root.exists() and not root.is_dir():
        raise PreflightError(
            f"run_root={run_root} is a file, not a folder; set run_root to a folder for runs"
        )
