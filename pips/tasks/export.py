"""``pips export``: a run's model as one ``.safetensors`` file, the format the ecosystem trusts.

The file holds the model's tensors (safetensors stores raw tensors only: reading it can never run
code) and, in its string metadata, the run's resolved config, the data shape the model was built
for, the step and any JSON extra state (a VQ's k-means flag). Every verb and ``pips.load`` read
it like a checkpoint: ``pips evaluate model.safetensors``, ``pips.load("model.safetensors")``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pips.config import to_dict
from pips.tasks.base import output_file

PREFIX = "model."  # the LightningModule's name for the model: checkpoints' state_dict keys
EXTRA = "::"  # tensors of an extra-state dict are stored as "<key>::<name>"


def export_model(model: torch.nn.Module, config, hyper_parameters: dict, step: int, out) -> Path:
    """Write ``model``'s weights and what rebuilds it to ``out`` (``.safetensors`` added)."""
    tensors, extra = {}, {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous().clone()  # no shared storage
        elif isinstance(value, dict):  # a module's extra state (e.g. a VQ's generator state)
            extra[key] = {}
            for name, item in value.items():
                if isinstance(item, torch.Tensor):
                    tensors[f"{key}{EXTRA}{name}"] = item.detach().cpu().contiguous().clone()
                else:
                    extra[key][name] = item
        else:
            raise ValueError(f"{key} of this model is neither a tensor nor a dict; cannot export")
    metadata = {
        "format": "pips",
        "config": json.dumps(to_dict(config)),
        "hyper_parameters": json.dumps(
            {k: v for k, v in hyper_parameters.items() if k != "config"}
        ),
        "global_step": str(int(step)),
        "extra_state": json.dumps(extra),
    }
    path = output_file(out, "model.safetensors", ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)  # atomic: a reader sees the old file or the whole new one
    return path


def read_exported(path: Path) -> dict:
    """An exported file as the checkpoint dict the loaders expect (``state_dict`` with the
    ``model.`` prefix, ``hyper_parameters`` with the config, ``global_step``). Raises ValueError
    with a sentence for a file that is not a pips export."""
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        metadata = header.get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .safetensors file ({error})") from None
    if metadata.get("format") != "pips" or "config" not in metadata:
        raise ValueError(f"{path} is a .safetensors file but not a pips export (no pips config)")
    extra = json.loads(metadata.get("extra_state", "{}"))
    state = {}
    for key, value in tensors.items():
        if EXTRA in key:
            owner, name = key.split(EXTRA, 1)
            extra.setdefault(owner, {})[name] = value
        else:
            state[PREFIX + key] = value
    state.update({PREFIX + key: value for key, value in extra.items()})
    hyper_parameters = json.loads(metadata["hyper_parameters"])
    hyper_parameters["config"] = json.loads(metadata["config"])
    return {
        "state_dict": state,
        "hyper_parameters": hyper_parameters,
        "global_step": int(metadata.get("global_step", 0)),
    }
