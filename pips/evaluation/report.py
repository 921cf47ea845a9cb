"""`pips report RUN_DIR`: one self-contained HTML page about a run (images embedded as base64).

Sections: the summary, loss and metric curves, the task's own sections (grids: code usage, the
best and the worst reconstructions of validation grids; others: the code-usage and reconstruction
images written in training), and the config. Everything is computed from the run folder and its
best checkpoint; nothing is fetched.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

import torch

from pips.evaluation.runs import format_seconds, is_run_dir, run_row
from pips.plots import html_image, plot_curves, read_metrics
from pips.tasks import get_task
from pips.tasks.checkpoints import (
    CheckpointError,
    find_checkpoint,
    load_model,
    read_json_file,
)

# curves every run has, after the task's own (loss, its metric)
COMMON_PANELS = [
    ("codebook perplexity", ["quantizer/perplexity", "val/codebook_perplexity"]),
    (
        "schedules",
        ["schedule/lr", "schedule/temperature", "schedule/hardness", "schedule/noise_scale"],
    ),
]


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _format(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for a run folder; returns its path."""
    with torch.no_grad():  # not set_grad_enabled(False): the caller's grad mode stays its own
        return _write_report(Path(run_dir), out)


def _write_report(run_dir: Path, out: str | Path | None) -> Path:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(
            f"{run_dir} is not a run folder (no config.yaml); give a folder that pips train wrote"
        )
    find_checkpoint(run_dir)  # a run without checkpoints fails here, before any work
    loaded = load_model(run_dir)
    task = get_task(loaded.config)
    row = run_row(run_dir)
    summary = read_json_file(run_dir / "summary.json", "the run's final metrics")

    sections = {"Summary": _table(_run_facts(row, loaded, task.model_description(), summary))}
    series = read_metrics(run_dir / "metrics.csv")
    term_keys = sorted(
        k
        for k in series
        if k.startswith(("loss/", "weight/")) and not k.startswith("loss/clamped_")
    )
    panels = task.curve_panels + COMMON_PANELS
    panels += [("latent terms and weights", term_keys)] if term_keys else []
    curves = io.BytesIO()
    drawn = plot_curves(series, panels, curves, title=row["name"])
    sections["Curves"] = (
        html_image(lambda f: f.write(curves.getvalue()))
        if drawn
        else "<p>No metrics logged yet.</p>"
    )
    sections.update(task.report_sections(loaded.model, run_dir))
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
        ("model", model),
        ("checkpoint", f"{loaded.checkpoint.name} (step {loaded.step})"),
        ("steps", _format(row["steps"])),
        ("wall time", format_seconds(row["wall_seconds"])),
    ]
    return facts + [
        (key, _format(value))
        for key, value in summary.items()
        if key not in ("status", "steps", "wall_seconds")
    ]


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
