"""Signals outside the training loop, and the exit status of a stopped run.

While a run is in training, :class:`~pips.training.callbacks.RunGuard` turns a stop signal into a
clean stop after the step (``last.ckpt`` saved). Before that (building the model, loading data)
and after it (the final evaluation), :func:`interrupt_on` makes the same signals raise
:class:`RunInterrupted`, so the run still ends as "interrupted" with a sentence, never as a
process killed with ``status.json`` at "running".

A run stopped by signal N exits with status 128 + N, as shells report it: 130 for SIGINT (Ctrl-C),
143 for SIGTERM, 138 for SIGUSR1 (SLURM's warning before the time limit).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RunInterrupted(BaseException):
    """A stop signal outside a checkpointable step (not a KeyboardInterrupt, which Lightning
    turns into ``sys.exit(1)``)."""

    def __init__(self, signal_name: str, detail: str = ""):
        super().__init__(f"{signal_name}{': ' + detail if detail else ''}")
        self.signal_name = signal_name
        self.detail = detail


def exit_status(signal_name: str | None) -> int:
    """128 + the signal's number (0 for no signal: a planned stop such as trainer.stop_at_step)."""
    if not signal_name:
        return 0
    return 128 + int(getattr(signal, signal_name))


@contextmanager
def interrupt_on(signal_names: list[str]) -> Iterator[None]:
    """Within the block, each named signal raises :class:`RunInterrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        raise RunInterrupted(signal.Signals(signum).name)

    previous = {}
    for name in signal_names:
        number = getattr(signal, name)
        previous[number] = signal.signal(number, handle)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
