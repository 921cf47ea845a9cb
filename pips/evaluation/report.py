"""`pips report RUN_DIR`: one self-contained HTML page about a run (images embedded as base64).

Sections: the summary, loss and metric curves, code usage, the best and the worst
reconstructions of validation grids, and the config. Everything is computed from the run folder
and its best checkpoint; nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
import torch

from pips.data.arc import spread_evenly
from pips.data.batch import collate_grids
from pips.evaluation.checkpoints import (
    CheckpointError,
    find_checkpoint,
    load_model,
    read_json_file,
)
from pips.evaluation.commands import data_records
from pips.evaluation.evaluate import predict, reconstruct
from pips.evaluation.plots import plot_code_usage, plot_curves, read_metrics, save_reconstructions
from pips.evaluation.runs import format_seconds, is_run_dir, run_row

SECTIONS = (
    "Summary",
    "Curves",
    "Code usage",
    "Best reconstructions",
    "Worst reconstructions",
    "Config",
)
CURVE_PANELS = [
    ("loss", ["train/loss", "train/loss_cells", "val/loss_cells", "train/loss_quantizer"]),
    (
        "accuracy",
        ["train/cell_accuracy", "val/cell_accuracy", "val/grid_accuracy", "val/size_accuracy"],
    ),
    ("codebook perplexity", ["quantizer/perplexity", "val/codebook_perplexity"]),
    (
        "schedules",
        ["schedule/lr", "schedule/temperature", "schedule/hardness", "schedule/noise_scale"],
    ),
]


def _png(draw) -> str:
    """``draw(file)`` writes a PNG into a buffer; returns an <img> tag with it embedded."""
    buffer = io.BytesIO()
    draw(buffer)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="">'


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _format(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


@torch.no_grad()
def _score_grids(model, records, pad_weight: float, batch_size: int = 128):
    """Per grid: cell accuracy (own cells, the decoder told the size) and exact (size + cells),
    plus the code counts of all grids."""
    accuracy = np.zeros(len(records))
    exact = np.zeros(len(records), dtype=bool)
    code_rows = []
    order = sorted(range(len(records)), key=lambda i: (records[i].grid.shape, i))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = collate_grids([records[i].grid for i in chosen], eos=model.eos)
        output = model(batch)
        colours, sizes = predict(model, output, batch, pad_weight)
        mask = batch.grid_mask
        right = ((colours == batch.tokens) & mask).sum(-1)
        total = mask.sum(-1)
        size_right = (sizes == batch.shapes).all(-1)
        for row, i in enumerate(chosen):
            accuracy[i] = float(right[row]) / max(float(total[row]), 1.0)
            exact[i] = bool(size_right[row]) and int(right[row]) == int(total[row])
        indices = output.encoded.quantizer.indices
        if indices is not None:
            if indices.dim() == 2:
                indices = indices.unsqueeze(-1)
            keep = ~output.encoded.latent_padding
            if model.spatial:
                code_rows.append(indices[keep])  # [M, S]: one codebook per level
            else:
                code_rows.append(indices.flatten(1))  # [B, N*S]: one column per slot
    return accuracy, exact, code_rows


def _usage_counts(code_rows, spatial: bool, codebook_size: int):
    """Dense [rows, K] counts (rows = slots, or levels for spatial codes), or for codebooks
    over 65,536 codes the counts of the used codes only."""
    if not code_rows:
        return None
    codes = torch.cat(code_rows)  # [M, S] spatial; [G, N*S] pooled
    if codebook_size > 65536:
        return torch.unique(codes.reshape(-1), return_counts=True)[1].numpy()
    columns = codes.shape[1]
    counts = torch.zeros(columns, codebook_size, dtype=torch.float64)
    for column in range(columns):
        counts[column] = torch.bincount(codes[:, column], minlength=codebook_size).double()
    if spatial:
        counts = counts.sum(0, keepdim=True)
    return counts.numpy()


def _reconstruction_panel(model, records, chosen, pad_weight, title) -> str:
    if not chosen:
        return "<p>No validation grids.</p>"
    grids = [records[i].grid for i in chosen]
    rebuilt = reconstruct(model, collate_grids(grids, eos=model.eos), pad_weight)
    names = [
        f"{records[i].task_id} {records[i].subset} {records[i].pair_index} {records[i].role}"
        for i in chosen
    ]
    panel = _png(lambda f: save_reconstructions(grids, rebuilt, f, title=title))
    listing = ", ".join(html.escape(n) for n in names)
    return f"{panel}<p class='note'>Top to bottom: {listing}.</p>"


def write_report(run_dir: str | Path, out: str | Path | None = None, max_grids: int = 512) -> Path:
    """Write ``report.html`` (or ``out``) for a run folder; returns its path."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(
            f"{run_dir} is not a run folder (no config.yaml); give a folder that pips train wrote"
        )
    find_checkpoint(run_dir)  # a run without checkpoints fails here, before any work
    loaded = load_model(run_dir)
    if loaded.config.task != "grids":
        return _write_task_report(run_dir, loaded, out)
    model, config = loaded.model, loaded.config
    torch.set_grad_enabled(False)
    pad_weight = config.loss.pad_weight
    row = run_row(run_dir)
    summary_path = run_dir / "summary.json"
    summary = read_json_file(summary_path, "the run's final metrics")

    records = spread_evenly(data_records(loaded, None)[0], max_grids)
    accuracy, exact, code_rows = _score_grids(model, records, pad_weight)
    ranking = sorted(range(len(records)), key=lambda i: (accuracy[i], records[i].grid.size))
    shown = min(6, len(records) // 2)
    worst = ranking[:shown]
    best = sorted(
        range(len(records)),
        key=lambda i: (exact[i], accuracy[i], records[i].grid.size),
        reverse=True,
    )[:shown]

    sections: dict[str, str] = {}
    facts = _run_facts(row, loaded, f"{config.model.layout} layout", summary)
    facts += [
        (
            f"report: mean per-grid cell accuracy on {len(records)} validation grids",
            _format(accuracy.mean()),
        ),
        (f"report: exact grids on {len(records)} validation grids", _format(exact.mean())),
    ]
    sections["Summary"] = _table(facts)

    series = read_metrics(run_dir / "metrics.csv")
    term_keys = sorted(
        k
        for k in series
        if k.startswith(("loss/", "weight/")) and not k.startswith("loss/clamped_")
    )
    panels = CURVE_PANELS + ([("latent terms and weights", term_keys)] if term_keys else [])
    curves = io.BytesIO()
    drawn = plot_curves(series, panels, curves, title=row["name"])
    sections["Curves"] = (
        _png(lambda f: f.write(curves.getvalue())) if drawn else "<p>No metrics logged yet.</p>"
    )

    codebook_size = model.quantizer.codebook_size
    counts = _usage_counts(code_rows, model.spatial, codebook_size)
    if counts is None or codebook_size < 2:
        sections["Code usage"] = "<p>This model has no codes (quantizer none).</p>"
    else:
        huge = codebook_size > 65536
        sections["Code usage"] = _png(
            lambda f: plot_code_usage(
                counts,
                f,
                title=f"{len(records)} validation grids",
                codebook_size=codebook_size if huge else None,
            )
        )
    sections["Best reconstructions"] = _reconstruction_panel(
        model, records, best, pad_weight, "best: input | reconstruction | differing cells"
    )
    sections["Worst reconstructions"] = _reconstruction_panel(
        model, records, worst, pad_weight, "worst: input | reconstruction | differing cells"
    )
    config_text = (run_dir / "config.yaml").read_text()
    sections["Config"] = f"<pre>{html.escape(config_text)}</pre>"

    out = Path(out) if out is not None else run_dir / "report.html"
    out.write_text(_page(row["name"], sections))
    return out


def _run_facts(row: dict, loaded, model: str, summary: dict) -> list[tuple[str, str]]:
    """The summary table's rows: the run, its model and checkpoint, then summary.json."""
    config = loaded.config
    facts = [
        ("run", row["name"]),
        ("status", row["status"]),
        ("task", config.task),
        ("model", f"{model}, {config.model.quantizer.kind} quantizer"),
        ("checkpoint", f"{loaded.checkpoint.name} (step {loaded.step})"),
        ("steps", _format(row["steps"])),
        ("wall time", format_seconds(row["wall_seconds"])),
    ]
    return facts + [
        (key, _format(value))
        for key, value in summary.items()
        if key not in ("status", "steps", "wall_seconds")
    ]


# images and sequences runs: their loss, their validation metrics, code usage, schedules
TASK_CURVE_PANELS = {
    "images": [
        ("loss", ["train/loss", "train/loss_pixels", "val/loss_pixels", "train/loss_quantizer"]),
        ("PSNR (dB)", ["train/psnr", "val/psnr"]),
    ],
    "sequences": [
        ("loss", ["train/loss", "train/loss_tokens", "val/loss_tokens", "train/loss_quantizer"]),
        ("accuracy", ["train/token_accuracy", "val/token_accuracy", "val/sequence_accuracy"]),
    ],
}


def _latest_image(folder: Path, pattern: str) -> str | None:
    """The newest ``pattern`` PNG the run wrote (by step in its name), embedded; None if none."""
    files = sorted(folder.glob(pattern))
    if not files:
        return None
    return _png(lambda f: f.write(files[-1].read_bytes())) + (
        f"<p class='note'>{html.escape(files[-1].name)}</p>"
    )


def _write_task_report(run_dir: Path, loaded, out: str | Path | None) -> Path:
    """The report of an images or sequences run: its summary, curves, the code usage and
    reconstruction images written during training, and the config."""
    config = loaded.config
    row = run_row(run_dir)
    summary_path = run_dir / "summary.json"
    summary = read_json_file(summary_path, "the run's final metrics")
    model = (
        f"{config.images.backbone} backbone"
        if config.task == "images"
        else f"{config.model.layout} layout"
    )
    sections = {"Summary": _table(_run_facts(row, loaded, model, summary))}
    series = read_metrics(run_dir / "metrics.csv")
    panels = TASK_CURVE_PANELS[config.task] + CURVE_PANELS[2:]
    curves = io.BytesIO()
    drawn = plot_curves(series, panels, curves, title=row["name"])
    sections["Curves"] = (
        _png(lambda f: f.write(curves.getvalue())) if drawn else "<p>No metrics logged yet.</p>"
    )
    images = run_dir / "images"
    sections["Code usage"] = _latest_image(images, "code_usage_step*.png") or (
        "<p>No code-usage image was written (trainer.image_every=0 or no codes).</p>"
    )
    if config.task == "images":
        sections["Reconstructions"] = _latest_image(images, "reconstructions_step*.png") or (
            "<p>No reconstruction image was written (trainer.image_every=0).</p>"
        )
    config_text = (run_dir / "config.yaml").read_text()
    sections["Config"] = f"<pre>{html.escape(config_text)}</pre>"
    out = Path(out) if out is not None else run_dir / "report.html"
    out.write_text(_page(row["name"], sections))
    return out


def _page(name: str, sections: dict[str, str]) -> str:
    navigation = " · ".join(
        f'<a href="#{title.lower().replace(" ", "-")}">{title}</a>' for title in sections
    )
    body = "".join(
        f'<section id="{title.lower().replace(" ", "-")}"><h2>{title}</h2>{content}</section>'
        for title, content in sections.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>PIPS report: {html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1050px; margin: 2em auto; padding: 0 1em;
       color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid #eee; }}
th {{ font-weight: 600; }} img {{ max-width: 100%; }} .note {{ font-size: 0.8em; color: #666; }}
pre {{ background: #f6f6f6; padding: 1em; font-size: 0.8em; overflow-x: auto; }}
nav {{ font-size: 0.9em; margin-bottom: 1em; }}
</style></head>
<body><h1>PIPS run report: {html.escape(name)}</h1><nav>{navigation}</nav>{body}</body></html>
"""
