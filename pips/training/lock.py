"""One run per folder: ``<run>/.lock``, created exclusively, holds the process and host that own it.

``pips train`` and ``pips resume`` claim the folder before writing anything in it and release it
when they exit. A second command on the same folder stops with a sentence naming the process that
holds it. A lock left by a process that no longer exists (killed with SIGKILL, a lost node) is
reported and taken over; one held on another host is never guessed at.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderLocked(RuntimeError):
    """The run folder belongs to another live process; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class RunLock:
    """``with RunLock(run_dir):`` or ``acquire()`` / ``release()``; released at exit as well."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False
        self.stale: dict | None = None  # the record of a dead owner's lock this one replaced

    def acquire(self) -> RunLock:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        for _ in range(3):  # a stale lock is removed once; a race with another taker is lost
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                if not self._is_stale(owner):
                    raise RunFolderLocked(self._held_message(owner)) from None
                self.stale = owner
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(record, handle)
            self.held = True
            atexit.register(self.release)
            return self
        raise RunFolderLocked(self._held_message(_read(self.path)))

    def check_free(self) -> None:
        """Raise :class:`RunFolderLocked` when a live process holds the folder (takes nothing)."""
        if self.path.is_file():
            owner = _read(self.path)
            if not self._is_stale(owner):
                raise RunFolderLocked(self._held_message(owner))

    def _is_stale(self, owner: dict) -> bool:
        pid, host = owner.get("pid"), owner.get("host")
        if not isinstance(pid, int) or host != socket.gethostname():
            # unreadable (a half-written lock of a killed process) counts as stale only when old
            return not owner and self._older_than(60)
        return pid != os.getpid() and not _alive(pid)

    def _older_than(self, seconds: float) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > seconds
        except OSError:
            return True

    def _held_message(self, owner: dict) -> str:
        who = (
            f"process {owner.get('pid')} on {owner.get('host')} (since {owner.get('started')})"
            if owner
            else "another process"
        )
        return (
            f"run folder {self.run_dir} is in use by {who}: one folder holds one run; wait for it "
            f"to finish, or choose another name with name=... (if that process is gone, delete "
            f"{self.path})"
        )

    def stale_note(self) -> str | None:
        """A sentence about the dead owner whose lock was taken over, if any."""
        if not self.stale:
            return None
        return (
            f"note: {self.run_dir} was locked by process {self.stale.get('pid')} on "
            f"{self.stale.get('host')}, which no longer runs (it was killed); taking the folder over"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if _read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)

    def __enter__(self) -> RunLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()
