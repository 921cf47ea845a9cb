"""Checkpoints written atomically (a temporary file in the same folder, fsync, then rename) and
read safely (``torch.load(weights_only=True)``: tensors and plain Python values only).

A crash or an interrupt mid-save leaves the previous checkpoint in place, never a half-written one.
Loading a checkpoint never runs code: PIPS saves only tensors, numbers, strings, lists, tuples and
dicts (the config as a plain dict, random states as tensors), which torch's weights-only unpickler
reads without an allow-list; a file holding any other object is refused with a sentence.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` into a temporary file beside ``path``, synced, then renamed over it:
    a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


TEMPORARY_PATTERN = ".*.tmp"  # what atomic_torch_save leaves behind when the process is killed
SAFE_GLOBALS: list = []  # classes beyond torch's weights-only defaults a checkpoint may hold: none


class UnsafeCheckpoint(ValueError):
    """A file that holds Python objects other than tensors and plain values (it could run code)."""


class UnreadableCheckpoint(ValueError):
    """A file that is truncated, corrupt or not a torch checkpoint at all."""


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` on CPU that never executes code from the file.

    Raises :class:`UnsafeCheckpoint` naming the object the file holds, or
    :class:`UnreadableCheckpoint` for a damaged file; both messages are sentences about ``path``.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "GLOBAL" not in text and "Unsupported" not in text:  # damaged, not crafted
            raise UnreadableCheckpoint(f"checkpoint {path} cannot be read ({text})") from None
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = found.group(1) if found else "a Python object"
        raise UnsafeCheckpoint(
            f"checkpoint {path} holds {what}, which a pips checkpoint never holds (loading it "
            f"could run code), so it was not loaded; use a checkpoint written by pips train"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise UnreadableCheckpoint(
            f"checkpoint {path} cannot be read: it is truncated or corrupt ({error})"
        ) from None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed save left in ``folder``; the run's lock must be held."""
    removed = []
    for temporary in Path(folder).glob(TEMPORARY_PATTERN):
        if temporary.is_file():
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Lightning's resume (``trainer.fit(ckpt_path=...)``) reads through here: weights only,
        whatever the caller asked."""
        return safe_torch_load(path)
