"""What `pips evaluate`, `pips encode`, `pips decode` and `pips probe` do, without the printing.

Each verb loads a run's model, asks the run's task for its items, codes or probe data, and does
the task-independent part itself: timing, the codes file, fitting the probe.
"""

from __future__ import annotations

import time
from pathlib import Path

from pips.evaluation.codes import CodesError, load_codes, save_codes
from pips.tasks import TaskError, get_task
from pips.tasks.checkpoints import load_model, read_checkpoint
from pips.tasks.export import export_model
from pips.tasks.grids import DataSpecError
from pips.tasks.probe import fit_probe

__all__ = [
    "compress_file",
    "decompress_file",
    "DataSpecError",
    "decode_to_file",
    "encode_to_file",
    "evaluate_run",
    "export_run",
    "generate_text",
    "probe_run",
    "sample_run",
]


def evaluate_run(path: str | Path, spec: str | None = None, which: str = "best") -> dict:
    """Validation metrics of a run's checkpoint on the items ``spec`` names (default: the run's
    validation split; --data names ARC grids)."""
    loaded = load_model(path, which)
    task = get_task(loaded.config)
    started = time.perf_counter()
    metrics, count, note = task.evaluate(loaded.model, spec, "cpu")
    seconds = time.perf_counter() - started
    metrics[f"{task.unit}_per_second"] = count / max(seconds, 1e-9)
    return {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "data": note,
        "metrics": metrics,
    }


def encode_to_file(
    path: str | Path, spec: str | None, out: str | Path, which: str = "best"
) -> dict:
    """Every item of ``spec`` (repeats included) -> its codes, saved to ``out`` (.npz)."""
    loaded = load_model(path, which)
    task = get_task(loaded.config)
    items = task.items(spec, distinct=False)
    codes = task.encode(loaded.model, items.items)
    written = save_codes(
        out,
        codes,
        items.metadata,
        task.name,
        loaded.model.quantizer.codebook_size,
        str(loaded.checkpoint),
    )
    return {
        "checkpoint": str(loaded.checkpoint),
        "data": items.note,
        "items": len(items),
        "unit": task.unit,
        "out": str(written),
    }


def decode_to_file(
    path: str | Path, codes_path: str | Path, out: str | Path, which: str = "best"
) -> dict:
    """A codes file -> items, written where ``out`` says (grids: ARC task JSON)."""
    loaded = load_model(path, which)
    task = get_task(loaded.config)
    codes, metadata = load_codes(codes_path)
    try:
        task.check_metadata(metadata, len(codes))
    except TaskError as error:
        raise CodesError(
            f"{codes_path} is not a valid codes file: {error}; write it again with pips encode"
        ) from None
    items = task.decode(loaded.model, codes)
    written = task.write_items(items, metadata, Path(out))
    return {"checkpoint": str(loaded.checkpoint), "items": len(items), "written": written}


def generate_text(
    path: str | Path,
    text: str | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    which: str = "best",
    codes: str | Path | None = None,
    interpolate: tuple[str, str] | None = None,
    steps: int = 5,
) -> dict:
    """A text run: ``text`` encoded to codes and decoded back piece by piece (``pieces``), a
    codes file decoded (``decoded``), or ``steps`` points between two texts' Gaussian latents
    (``interpolation``)."""
    loaded = load_model(path, which)
    task = get_task(loaded.config)
    result = {"checkpoint": str(loaded.checkpoint)}
    if codes is not None:
        arrays, _ = load_codes(codes)
        result["decoded"] = task.generate_from_codes(loaded.model, arrays, temperature, top_p, seed)
    elif interpolate is not None:
        result["interpolation"] = task.interpolate(
            loaded.model, *interpolate, steps, temperature, top_p, seed
        )
    else:
        result["pieces"] = task.generate(loaded.model, text, temperature, top_p, seed)
    return result


def sample_run(
    path: str | Path,
    count: int,
    out: str | Path,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    which: str = "best",
) -> dict:
    """A prior run: ``count`` code strings drawn, decoded and written into ``out``, with what
    they are like (well-formed, copies of training items, histogram distances)."""
    loaded = load_model(path, which)
    task = get_task(loaded.config)
    try:
        result = task.sample(
            loaded.model,
            count,
            Path(out),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
    except ValueError as error:  # the sampling filter's bad values
        raise TaskError(str(error)) from None
    return {"checkpoint": str(loaded.checkpoint), **result}


def compress_file(path: str | Path, items: str | Path, out: str | Path, which="best") -> dict:
    """A prior run: the items of ``items`` (an ARC task file) into one range-coded file."""
    loaded = load_model(path, which)
    result = get_task(loaded.config).compress(loaded.model, Path(items), Path(out))
    return {"checkpoint": str(loaded.checkpoint), **result}


def decompress_file(path: str | Path, stream: str | Path, out: str | Path, which="best") -> dict:
    """A file of :func:`compress_file` back to its items (ARC task JSON), exactly."""
    loaded = load_model(path, which)
    result = get_task(loaded.config).decompress(loaded.model, Path(stream), Path(out))
    return {"checkpoint": str(loaded.checkpoint), **result}


def probe_run(
    path: str | Path,
    target: str,
    features: str = "codes",
    hidden: int = 0,
    spec: str | None = None,
    max_items: int = 2000,
    which: str = "best",
    layer: int | None = None,
) -> dict:
    """Fit a probe from a run's codes (or activations) to a target the task names (a grid
    property, a hidden GSSM node...); held-out accuracy beside its baselines."""
    loaded = load_model(path, which)
    task = get_task(loaded.config)
    data = task.probe(loaded.model, target, features, spec, max_items, layer)
    scores = fit_probe(
        data.features, data.targets, data.train, data.test, codebook=data.codebook, hidden=hidden
    )
    if data.baselines is not None:
        scores.update(data.baselines(scores))
    return {
        "checkpoint": str(loaded.checkpoint),
        "data": data.note,
        "target": target,
        "features": features if layer is None else f"{features} after layer {layer}",
        "probe": f"mlp({hidden})" if hidden else "linear",
        **scores,
    }


def export_run(path: str | Path, out: str | Path, which: str = "best") -> dict:
    """A run's model (best checkpoint by default) -> one ``.safetensors`` file with its config."""
    loaded = load_model(path, which)
    hyper_parameters = read_checkpoint(loaded.checkpoint).get("hyper_parameters") or {}
    written = export_model(loaded.model, loaded.config, hyper_parameters, loaded.step, out)
    return {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "out": str(written)}
