"""The `pips` command line: parses, calls one function, prints. No logic lives here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pips.config import ConfigError, describe_options

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="PIPS: learn discrete codes of ARC grids (and more). Each verb has its own --help.",
)


def _options_table() -> str:
    lines = [
        "**Config keys** (set with key.sub=value; a schedule also takes key.start=, key.end=, "
        "key.kind=, key.steps=, key.warmup=):\n\n"
    ]
    for key, default, help_text in describe_options():
        lines.append(f"- `{key}` = {default}  {help_text}\n")
    return "".join(lines)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _split_config(arguments: list[str]) -> tuple[str | None, list[str]]:
    if arguments and arguments[0].endswith((".yaml", ".yml")):
        return arguments[0], arguments[1:]
    return None, arguments


def _report(run_dir: Path, summary: dict) -> None:
    typer.echo(f"run folder: {run_dir}")
    shown = {
        k: summary[k]
        for k in (
            "cell_accuracy",
            "grid_accuracy",
            "codebook_perplexity",
            "bits_per_grid",
            "steps",
            "wall_seconds",
            "grids_per_second",
        )
        if k in summary
    }
    typer.echo("final validation: " + json.dumps(shown, indent=None))


@app.command(epilog=_options_table())
def train(
    arguments: list[str] = typer.Argument(
        None,
        metavar="[CONFIG.yaml] [KEY=VALUE]...",
        help="an optional preset from configs/ followed by key=value overrides",
    ),
) -> None:
    """Train a grid discrete VAE and write a run folder (default: configs/arc_demo.yaml).

    Example: pips train configs/arc_demo.yaml trainer.max_steps=500 name=quick
    """
    from pips.training.run import RunError
    from pips.training.run import train as run_train

    config_path, overrides = _split_config(list(arguments or []))
    if config_path is None:
        default = Path(__file__).resolve().parent.parent / "configs" / "arc_demo.yaml"
        config_path = str(default) if default.is_file() else None
    try:
        run_dir, summary = run_train(config_path, overrides)
    except (ConfigError, RunError) as error:
        _fail(str(error))
    _report(run_dir, summary)


@app.command(epilog=_options_table())
def resume(
    run_dir: Path = typer.Argument(..., help="a run folder written by pips train"),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="overrides, e.g. trainer.max_steps=4000"
    ),
) -> None:
    """Continue a run from its checkpoints/last.ckpt (e.g. with a larger trainer.max_steps).

    Example: pips resume runs/quick trainer.max_steps=1000
    """
    from pips.training.run import RunError
    from pips.training.run import resume as run_resume

    try:
        run_dir, summary = run_resume(run_dir, list(overrides or []))
    except (ConfigError, RunError) as error:
        _fail(str(error))
    _report(run_dir, summary)


if __name__ == "__main__":
    app()
