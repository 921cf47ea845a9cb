"""Atomic checkpoint writes: an interrupted save leaves the previous file whole and no debris."""

from __future__ import annotations

import pytest
import torch

from pips.tasks.checkpoint_io import AtomicCheckpointIO, atomic_torch_save


class SaveInterrupted(Exception):
    pass


def _interrupting_save(error: type[BaseException]):
    """A stand-in for torch.save that writes half a file, then fails."""

    def save(obj, handle, *args, **kwargs):
        handle.write(b"PARTIAL CHECKPOINT BYTES" * 100)
        handle.flush()
        raise error("interrupted mid-write")

    return save


def _folder_listing(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_normal_save_writes_a_loadable_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"  # the folder is created on demand
    atomic_torch_save({"step": 1, "weights": torch.arange(4)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1
    assert torch.equal(loaded["weights"], torch.arange(4))
    assert _folder_listing(path) == ["last.ckpt"]


def test_normal_save_replaces_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    atomic_torch_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert _folder_listing(path) == ["last.ckpt"]


@pytest.mark.parametrize("error", [SaveInterrupted, KeyboardInterrupt, OSError])
def test_interrupted_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "weights": torch.ones(3)}, path)
    before = path.read_bytes()

    monkeypatch.setattr(torch, "save", _interrupting_save(error))
    with pytest.raises(error):
        atomic_torch_save({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 1
    assert _folder_listing(path) == ["last.ckpt"]


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    monkeypatch.setattr(torch, "save", _interrupting_save(SaveInterrupted))
    with pytest.raises(SaveInterrupted):
        atomic_torch_save({"step": 1}, path)
    assert list(tmp_path.iterdir()) == []


def test_lightning_plugin_saves_atomically(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "best.ckpt"
    io.save_checkpoint({"global_step": 3}, path)
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 3

    monkeypatch.setattr(torch, "save", _interrupting_save(SaveInterrupted))
    with pytest.raises(SaveInterrupted):
        io.save_checkpoint({"global_step": 4}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 3
    assert _folder_listing(path) == ["best.ckpt"]
