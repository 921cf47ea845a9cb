"""Load a trained model from a run folder or a checkpoint file, with errors a person can act on.

A Lightning checkpoint written by ``pips train`` holds the run's resolved config (its
``hyper_parameters``) and the weights; :func:`load_model` rebuilds the model from the config and
loads the weights, so a checkpoint is usable without its run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from pips.config import Config, ConfigError, check_config, from_dict, migrate
from pips.tasks.base import TaskError, get_task
from pips.tasks.checkpoint_io import UnreadableCheckpoint, UnsafeCheckpoint, safe_torch_load
from pips.tasks.export import read_exported


class CheckpointError(RuntimeError):
    """A checkpoint or run folder that cannot be used; the message names the file and the fix."""


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # the task's bare model, in eval mode
    config: Config
    checkpoint: Path
    step: int
    run_dir: Path | None  # the run folder that holds the checkpoint, when it is in one


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint file for ``path``: the file itself, or in a run folder its best checkpoint
    (``which="best"``, falling back to ``last.ckpt``) or ``last.ckpt`` (``which="last"``)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; give a run folder written by pips train or a .ckpt file"
        )
    folder = path / "checkpoints"
    if not folder.is_dir():
        raise CheckpointError(
            f"{path} is not a run folder (it has no checkpoints/ folder); give the folder that "
            f"pips train printed, or a .ckpt file"
        )
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = folder / "last.ckpt"
    if len(best) > 1 and last.is_file():  # trainer.keep_best > 1: ask the checkpoint callback
        best = [_best_model_path(last, folder) or best[-1]]
    candidates = ([best[-1]] if best else []) + ([last] if last.is_file() else [])
    if which == "last":
        candidates.reverse()
    if not candidates:
        raise CheckpointError(
            f"run folder {path} has no checkpoints yet (checkpoints/ is empty): the run stopped "
            f"before its first validation; train it longer, or resume it with pips resume {path}"
        )
    return candidates[0]


def _best_model_path(last: Path, folder: Path) -> Path | None:
    """The best checkpoint the run's ModelCheckpoint recorded in ``last``, if it still exists."""
    try:
        states = safe_torch_load(last).get("callbacks", {})
    except (UnreadableCheckpoint, UnsafeCheckpoint, AttributeError):  # the newest best file
        return None
    for key, state in states.items():
        monitored = isinstance(state, dict) and state.get("monitor")
        if key.startswith("ModelCheckpoint") and monitored and state.get("best_model_path"):
            path = folder / Path(state["best_model_path"]).name
            if path.is_file():
                return path
    return None


def read_checkpoint(path: Path) -> dict:
    """The one safe loader of every verb: weights only (never runs code from the file), on CPU,
    with the failure modes of a truncated, foreign or crafted file spelt out. A ``.safetensors``
    file written by `pips export` reads as a checkpoint too."""
    if Path(path).suffix == ".safetensors":
        try:
            return read_exported(Path(path))
        except ValueError as error:
            raise CheckpointError(str(error)) from None
    try:
        checkpoint = safe_torch_load(path)
    except UnsafeCheckpoint as error:
        raise CheckpointError(str(error)) from None
    except UnreadableCheckpoint as error:
        raise CheckpointError(
            f"{error}; use another checkpoint of the run (checkpoints/last.ckpt or best-*.ckpt)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a pips checkpoint (no state_dict); give a .ckpt from a run folder's "
            f"checkpoints/"
        )
    return checkpoint


def checkpoint_config(checkpoint: dict, path: Path) -> Config:
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    if saved is None:
        raise CheckpointError(
            f"{path} holds no pips config (hyper_parameters.config); it was not written by "
            f"pips train"
        )
    try:
        config = from_dict(Config, migrate(saved))  # runs written before task sections too
        check_config(config)
        return config
    except ConfigError as error:
        raise CheckpointError(
            f"the config saved in {path} does not fit this version of pips: {error}"
        ) from None


def load_weights(model: torch.nn.Module, state: dict, path: Path, prefix: str = "model.") -> None:
    """Load ``state`` (keys under ``prefix``) into ``model``, naming every mismatch."""
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{key} {tuple(weights[key].shape)} in the file vs {tuple(value.shape)} in the model"
        for key, value in own.items()
        if key in weights
        and isinstance(value, torch.Tensor)  # extra states (e.g. a VQ's k-means flag) are dicts
        and isinstance(weights[key], torch.Tensor)
        and weights[key].shape != value.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append("different shapes: " + "; ".join(shapes[:3]))
        if missing:
            problems.append("missing weights: " + ", ".join(missing[:3]))
        if unexpected:
            problems.append("weights the model does not have: " + ", ".join(unexpected[:3]))
        raise CheckpointError(
            f"checkpoint {path} does not fit the model its config describes ("
            + " | ".join(problems)
            + "); use the config the checkpoint was trained with (do not override model.* keys)"
        )
    model.load_state_dict(weights)


def _build_model(config: Config, checkpoint: dict, path: Path) -> torch.nn.Module:
    """The task's bare model for ``config``, with the data shape the checkpoint recorded."""
    try:
        return get_task(config).build_model(checkpoint.get("hyper_parameters") or {})
    except (TaskError, ValueError) as error:
        raise CheckpointError(f"the model of {path} cannot be built: {error}") from None


def check_checkpoint_fits(config: Config, path: Path, changed: list[str] | None = None) -> dict:
    """Read ``path`` safely and check its weights load into the model ``config`` describes,
    before a run writes anything; ``changed``: the config keys the caller changed (named in the
    error, as what made the shapes differ). Returns the checkpoint."""
    checkpoint = read_checkpoint(path)
    model = _build_model(config, checkpoint, path)
    try:
        load_weights(model, checkpoint["state_dict"], path)
    except CheckpointError as error:
        if not changed:
            raise
        shown = [key for key in changed if key.startswith("model.")] or changed
        raise CheckpointError(
            f"{str(error).split('; use the config')[0]}; the change of {', '.join(shown[:3])} "
            f"makes it so: keep the model.* keys the run was trained with"
        ) from None
    return checkpoint


def read_json_record(path: Path) -> dict:
    """A run folder's JSON record (status.json, summary.json), or {} when it is missing or
    damaged (a killed write): for views that must not fail on one bad file."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object a run folder holds (summary.json, status.json): {} when absent, a sentence
    when it is damaged (a write cut short)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} ({what}) is damaged and cannot be read ({error}); delete it, or resume the "
            f"run to write it again"
        ) from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} ({what}) is not a JSON object; delete it")
    return record


def load_model(
    path: str | Path, which: str = "best", overrides: Config | None = None
) -> LoadedModel:
    """The model of a run folder or checkpoint, in eval mode on CPU.

    ``overrides``: a config to build the model from instead of the saved one (its shapes must
    match the weights, else a :class:`CheckpointError` names the mismatch).
    """
    file = find_checkpoint(path, which)
    checkpoint = read_checkpoint(file)
    config = overrides if overrides is not None else checkpoint_config(checkpoint, file)
    model = _build_model(config, checkpoint, file)
    load_weights(model, checkpoint["state_dict"], file)
    model.eval()
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        run_dir = None
    return LoadedModel(model, config, file, int(checkpoint.get("global_step", 0)), run_dir)
