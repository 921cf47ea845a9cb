"""The `pips` command line: parses, calls one function, prints. No logic lives here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pips.config import QUANTIZER_KINDS, ConfigError, describe_options

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


def _fail(message: str, code: int = 2) -> None:
    """One sentence on stderr and exit ``code`` (2: the user's input; 1: the run failed)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def _split_config(arguments: list[str], default_demo: bool = False) -> tuple[str | None, list[str]]:
    """(config file, overrides); with ``default_demo`` a missing file is configs/arc_demo.yaml
    when this is a checkout that has it."""
    if arguments and arguments[0].endswith((".yaml", ".yml")):
        return arguments[0], arguments[1:]
    if default_demo:
        demo = Path(__file__).resolve().parent.parent / "configs" / "arc_demo.yaml"
        if demo.is_file():
            return str(demo), arguments
    return None, arguments


def _report(run_dir: Path, summary: dict) -> None:
    from pips.training.run import is_rank_zero

    if not is_rank_zero():  # the other processes of a distributed run stay quiet
        return
    typer.echo(f"run folder: {run_dir}")
    if summary.get("status") == "interrupted":
        from pips.training.signals import exit_status

        step = summary.get("steps")
        where = f"stopped at step {step}" if step is not None else "stopped before a checkpoint"
        typer.echo(f"{where}: continue with pips resume {run_dir}")
        raise typer.Exit(exit_status(summary.get("signal")))  # 128 + N for signal N, as shells
    # the task's headline metrics, steps and speed (not the status, nor every val_/train_ count)
    shown = {
        k: v for k, v in summary.items() if k != "status" and not k.startswith(("val_", "train_"))
    }
    typer.echo("final validation: " + json.dumps(shown, indent=None))


@app.command(epilog=_options_table())
def train(
    arguments: list[str] = typer.Argument(
        None,
        metavar="[CONFIG.yaml] [KEY=VALUE]...",
        help="an optional preset from configs/ followed by key=value overrides",
    ),
    init_from: Path = typer.Option(
        None,
        "--from",
        help="start from the weights of this run folder (its last.ckpt) or .ckpt file; the "
        "config (schedules, loss, data) is the new one, the model shape must match",
    ),
) -> None:
    """Train a grid discrete VAE and write a run folder (default: configs/arc_demo.yaml).

    Example: pips train configs/arc_demo.yaml trainer.max_steps=500 name=quick

    Fine-tune: pips train --from runs/quick model.quantizer.temperature=0.5 name=quick-cold
    """
    from pips.tasks.checkpoints import CheckpointError
    from pips.training.callbacks import NonFiniteLoss
    from pips.training.run import RunError
    from pips.training.run import train as run_train

    config_path, overrides = _split_config(list(arguments or []), default_demo=True)
    try:
        run_dir, summary = run_train(config_path, overrides, init_from)
    except (ConfigError, RunError, CheckpointError) as error:
        _fail(str(error))
    except NonFiniteLoss as error:
        _fail(str(error), code=1)
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
    from pips.training.callbacks import NonFiniteLoss
    from pips.training.run import RunError
    from pips.training.run import resume as run_resume

    try:
        run_dir, summary = run_resume(run_dir, list(overrides or []))
    except (ConfigError, RunError) as error:
        _fail(str(error))
    except NonFiniteLoss as error:
        _fail(str(error), code=1)
    _report(run_dir, summary)


def _checkpoint_errors():
    """The errors of the evaluation verbs that are a user's to fix (exit 2, one sentence)."""
    from pips.data.arc import GridError
    from pips.evaluation.codes import CodesError
    from pips.tasks import TaskError
    from pips.tasks.checkpoints import CheckpointError

    return (CheckpointError, CodesError, TaskError, ConfigError, GridError, OSError)


RUN_OR_CHECKPOINT = typer.Argument(..., help="a run folder (its best checkpoint) or a .ckpt file")
DATA_OPTION = typer.Option(
    None,
    "--data",
    help="arc1 or arc2 (bundled), or a folder of task JSON; add :training, :evaluation or :all "
    "(default: the run's validation split)",
)
LAST_OPTION = typer.Option(False, "--last", help="use checkpoints/last.ckpt, not the best one")


@app.command()
def evaluate(
    run: Path = RUN_OR_CHECKPOINT,
    data: str = DATA_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    last: bool = LAST_OPTION,
) -> None:
    """Reconstruction and codebook metrics of a trained model: on its validation split, or (ARC
    grid runs) on a split or folder of ARC grids.

    Example: pips evaluate runs/quick --data arc1:evaluation
    """
    from pips.evaluation.commands import evaluate_run

    try:
        result = evaluate_run(run, data, "last" if last else "best")
    except _checkpoint_errors() as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    typer.echo(f"{result['checkpoint']} (step {result['step']}): {result['data']}")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        whole = isinstance(value, float) and value.is_integer() and abs(value) >= 1
        table.add_row(key, f"{value:.0f}" if whole else f"{value:.4f}")
    Console().print(table)


@app.command()
def encode(
    run: Path = RUN_OR_CHECKPOINT,
    out: Path = typer.Option(..., "--out", help="the codes file to write (.npz)"),
    data: str = DATA_OPTION,
    last: bool = LAST_OPTION,
) -> None:
    """Every item's code indices into a .npz file (ARC grids: with each grid's task, pair and
    role; other tasks: the validation items, with their index).

    Example: pips encode runs/quick --data arc1:evaluation --out codes.npz
    """
    from pips.evaluation.commands import encode_to_file

    try:
        result = encode_to_file(run, data, out, "last" if last else "best")
    except _checkpoint_errors() as error:
        _fail(str(error))
    typer.echo(
        f"encoded {result['items']} {result['unit']} ({result['data']}) into {result['out']}"
    )


@app.command()
def decode(
    run: Path = RUN_OR_CHECKPOINT,
    codes: Path = typer.Argument(..., help="a codes file written by pips encode"),
    out: Path = typer.Option(
        ..., "--out", help="the file to write: ARC task JSON for grid runs, else an .npz"
    ),
    last: bool = LAST_OPTION,
) -> None:
    """Codes back to items: ARC task JSON for grid runs (the tasks and pairs the codes came
    from), an .npz of items (and a PNG sheet of images) for other tasks.

    Example: pips decode runs/quick codes.npz --out grids.json
    """
    from pips.evaluation.commands import decode_to_file

    try:
        result = decode_to_file(run, codes, out, "last" if last else "best")
    except _checkpoint_errors() as error:
        _fail(str(error))
    typer.echo(f"decoded {result['written']}")


@app.command()
def generate(
    run: Path = RUN_OR_CHECKPOINT,
    text: str = typer.Option(None, "--text", help="the text to encode to codes and decode back"),
    codes: Path = typer.Option(None, "--codes", help="a codes file (pips encode) to decode"),
    interpolate: tuple[str, str] | None = typer.Option(
        None, "--interpolate", help="two texts: decode points between their latents"
    ),
    steps: int = typer.Option(5, "--steps", help="--interpolate: points, both ends included"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy", min=0),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass", min=0, max=1),
    seed: int = typer.Option(0, "--seed", help="seeds the sampling"),
    last: bool = LAST_OPTION,
) -> None:
    """Text runs: text encoded to codes and decoded back from the codes alone (--text), given
    codes decoded (--codes), or a walk between two texts' Gaussian latents (--interpolate).

    Example: pips generate runs/text --text "The capital of France is Paris."
    """
    from pips.evaluation.commands import generate_text

    given = [value for value in (text, codes, interpolate) if value is not None]
    if len(given) != 1:
        _fail('give one of --text, --codes or --interpolate "A" "B"')
    try:
        result = generate_text(
            run,
            text,
            temperature,
            top_p,
            seed,
            "last" if last else "best",
            codes=codes,
            interpolate=interpolate,
            steps=steps,
        )
    except _checkpoint_errors() as error:
        _fail(str(error))
    for piece, decoded in result.get("pieces", []):
        typer.echo(f"text:    {piece!r}\ndecoded: {decoded!r}")
    for number, decoded in enumerate(result.get("decoded", [])):
        typer.echo(f"span {number}: {decoded!r}")
    for t, decoded in result.get("interpolation", []):
        typer.echo(f"t={t:.2f}: {decoded!r}")


@app.command()
def sample(
    run: Path = RUN_OR_CHECKPOINT,
    n: int = typer.Option(64, "-n", help="how many items to draw", min=1),
    out: Path = typer.Option(..., "--out", help="the folder to write the samples into"),
    temperature: float = typer.Option(1.0, "--temperature", help="divides the logits", min=0),
    top_k: int = typer.Option(None, "--top-k", help="keep the k most likely tokens", min=1),
    top_p: float = typer.Option(None, "--top-p", help="nucleus sampling mass", min=0, max=1),
    seed: int = typer.Option(0, "--seed", help="seeds the sampling"),
    last: bool = LAST_OPTION,
) -> None:
    """Prior runs: draw code strings, decode them with the tokenizer and write them (ARC: task
    JSON and a PNG sheet), with the share well-formed, the share copied from training and the
    distance of their size and colour histograms to the validation items'.

    Example: pips sample runs/arc_prior -n 64 --temperature 0.9 --out samples/
    """
    from pips.evaluation.commands import sample_run

    try:
        result = sample_run(
            run, n, out, temperature, top_k, top_p, seed, "last" if last else "best"
        )
    except _checkpoint_errors() as error:
        _fail(str(error))
    typer.echo(f"{result['samples']} {result['unit']} sampled into {', '.join(result['files'])}")
    for key in ("well_formed", "identical_to_training", "size_tv", "colour_tv"):
        if key in result:
            reference = result.get(f"{key}_of_training_grids")
            same = "" if reference is None else f" (as many training grids: {reference:.3f})"
            typer.echo(f"  {key}: {result[key]:.3f}{same}")


@app.command()
def compress(
    run: Path = RUN_OR_CHECKPOINT,
    items: Path = typer.Argument(..., help="the items to compress: an ARC task JSON file"),
    out: Path = typer.Option(..., "--out", help="the file to write"),
    last: bool = LAST_OPTION,
) -> None:
    """Prior runs: an ARC task file as one lossless bit string (range coding under the prior,
    then the tokenizer's decoder); prints its length beside the model's codelength.

    Example: pips compress runs/arc_prior task.json --out task.pips
    """
    from pips.evaluation.commands import compress_file

    try:
        result = compress_file(run, items, out, "last" if last else "best")
    except _checkpoint_errors() as error:
        _fail(str(error))
    count = result["items"]
    typer.echo(
        f"{count} {result['unit']} into {result['out']}: {result['payload_bits']} bits of payload "
        f"({result['payload_bits'] / count:.1f} per item; the model's codelength "
        f"{result['codelength_bits'] / count:.1f} = prior {result['prior_bits'] / count:.1f} + "
        f"decoder {result['decoder_bits'] / count:.1f}) and a {result['header_bytes']}-byte header"
    )


@app.command()
def decompress(
    run: Path = RUN_OR_CHECKPOINT,
    stream: Path = typer.Argument(..., help="a file written by pips compress with this run"),
    out: Path = typer.Option(..., "--out", help="the ARC task JSON to write"),
    last: bool = LAST_OPTION,
) -> None:
    """Prior runs: a pips compress file back to its items, exactly.

    Example: pips decompress runs/arc_prior task.pips --out task.json
    """
    from pips.evaluation.commands import decompress_file

    try:
        result = decompress_file(run, stream, out, "last" if last else "best")
    except _checkpoint_errors() as error:
        _fail(str(error))
    typer.echo(f"decompressed {result['written']}")


@app.command()
def export(
    run: Path = RUN_OR_CHECKPOINT,
    out: Path = typer.Option(..., "--out", help="the .safetensors file (or folder) to write"),
    last: bool = LAST_OPTION,
) -> None:
    """The model as one .safetensors file (weights, config and data shape; reading it never runs
    code), usable wherever a checkpoint is: pips evaluate/encode/decode/probe, pips.load.

    Example: pips export runs/quick --out quick.safetensors
    """
    from pips.evaluation.commands import export_run

    try:
        result = export_run(run, out, "last" if last else "best")
    except _checkpoint_errors() as error:
        _fail(str(error))
    typer.echo(f"exported {result['checkpoint']} (step {result['step']}) to {result['out']}")


@app.command()
def probe(
    run: Path = RUN_OR_CHECKPOINT,
    target: str = typer.Option(
        ...,
        "--target",
        help="the grid property to recover (height, width, colours, dominant), or for a "
        "sequences run a hidden GSSM node (e.g. phase)",
    ),
    features: str = typer.Option("codes", "--features", help="codes or activations"),
    hidden: int = typer.Option(0, "--hidden", min=0, help="MLP hidden units (0: linear probe)"),
    layer: int = typer.Option(
        None,
        "--layer",
        min=0,
        help="sequences runs, --features activations: after this many encoder blocks "
        "(0: the embeddings; default: the encoder's output)",
    ),
    data: str = DATA_OPTION,
    grids: int = typer.Option(
        2000, "--grids", min=10, help="at most this many grids (or sequences)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """How well a probe recovers a grid property from the codes: held-out accuracy beside the
    chance and majority baselines (70/30 split of the grids). For a sequences run the target is
    a hidden GSSM node, probed at every position, beside the Bayes-optimal accuracy of the true
    model (forward-backward), and the share of it the codes recover.

    Example: pips probe runs/quick --target height --features codes
    Example: pips probe runs/gssm --target phase --hidden 64
    """
    from pips.evaluation.commands import probe_run
    from pips.tasks.probe import ProbeError

    try:
        result = probe_run(run, target, features, hidden, data, grids, layer=layer)
    except (*_checkpoint_errors(), ProbeError) as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if "bayes_optimal" in result:  # a hidden GSSM node, position by position
        line = (
            f"{result['target']} from {result['features']} ({result['probe']} probe): held-out "
            f"accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}, majority "
            f"{result['majority']:.3f}"
        )
        if result["bayes_optimal"] is not None:
            line += f", Bayes-optimal {result['bayes_optimal']:.3f}"
        line += f"; {result['test_sequences']} held-out of {result['sequences']} {result['data']})"
        if result["recovered"] is not None:
            line += (
                f"\nthe {result['features']} recover {100 * result['recovered']:.0f}% of what the "
                f"whole sequence tells about {result['target']} beyond the majority guess"
            )
        typer.echo(line)
        return
    typer.echo(
        f"{result['target']} from {result['features']} ({result['probe']} probe): held-out "
        f"accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}, majority "
        f"{result['majority']:.3f}; {int(result['train_size'])} train / "
        f"{int(result['test_size'])} test grids of {result['data']})"
    )


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run folder written by pips train"),
    out: Path = typer.Option(None, "--out", help="where to write it (default RUN_DIR/report.html)"),
) -> None:
    """One self-contained HTML page about a run: summary, curves, code usage, the best and the
    worst reconstructions, and the config.

    Example: pips report runs/quick  (then open runs/quick/report.html)
    """
    from pips.evaluation.report import write_report

    try:
        path = write_report(run_dir, out)
    except _checkpoint_errors() as error:
        _fail(str(error))
    typer.echo(f"report: {path}")


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value)


def _print_table(rows: list[dict], columns: list[tuple[str, str]], title: str = "") -> None:
    """A rich table: ``columns`` are (key in each row, header)."""
    from rich.console import Console
    from rich.table import Table

    from pips.evaluation.runs import format_seconds

    table = Table(title=title or None)
    for _, header in columns:
        table.add_column(header, justify="left" if header in ("run", "status") else "right")
    for row in rows:
        table.add_row(
            *(
                format_seconds(row.get(key)) if key == "wall_seconds" else _cell(row.get(key))
                for key, _ in columns
            )
        )
    Console(width=max(120, Console().width)).print(table)


@app.command()
def runs(
    folder: Path = typer.Argument(Path("runs"), help="a folder of run folders (default: runs)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """A table of runs: name, status (running/finished/interrupted/crashed), steps, best
    validation metrics and wall time, newest first.

    Example: pips runs runs/
    """
    from pips.evaluation.runs import find_runs, run_row

    found = find_runs(folder)
    if not found:
        _fail(f"no run folders in {folder} (a run folder holds config.yaml); train one first")
    rows = [run_row(path) for path in found]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(
        rows,
        [
            ("name", "run"),
            ("status", "status"),
            ("task", "task"),
            ("quantizer", "quantizer"),
            ("steps", "steps"),
            ("result", "final"),
            ("best_cell_accuracy", "best cell acc"),
            ("best_grid_accuracy", "best grid acc"),
            ("wall_seconds", "wall"),
        ],
    )


COMPARE_COLUMNS = [
    ("name", "run"),
    ("quantizer", "quantizer"),
    ("bits_per_grid", "bits/grid"),
    ("cell_accuracy", "cell acc"),
    ("grid_accuracy", "grid acc"),
    ("codebook_perplexity", "perplexity"),
    ("dead_codes", "dead codes"),
    ("grids_per_second", "grids/s"),
    ("steps", "steps"),
    ("wall_seconds", "wall"),
]


def _run_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The columns of a table of runs: each run's own headline metric, and the columns some run
    has a value for (grid runs: bits/grid, cell and grid accuracy, dead codes...; "-" where a
    run has none, e.g. the dead codes of a continuous run)."""
    columns = [
        column
        for column in COMPARE_COLUMNS[1:]
        if any(row.get(column[0]) is not None for row in rows)
    ]
    keys = {key for key, _ in columns}
    head = [("name", "run")]
    if len({row["task"] for row in rows}) > 1:
        head.append(("task", "task"))
    if any(row["headline"] not in keys for row in rows):
        head.append(("result", "final"))
    return head + columns


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="run folders to put side by side"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Final validation metrics of several runs side by side (from each summary.json).

    Example: pips compare runs/fsq runs/vq runs/gumbel
    """
    from pips.evaluation.runs import is_run_dir, run_row

    for path in run_dirs:
        if not is_run_dir(path):
            _fail(
                f"{path} is not a run folder (no config.yaml); give folders that pips train wrote"
            )
    rows = [run_row(path) for path in run_dirs]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows, _run_columns(rows))


@app.command()
def launch(
    arguments: list[str] = typer.Argument(
        ..., metavar="CONFIG.yaml [KEY=VALUE]...", help="a preset and overrides shared by all runs"
    ),
    sweep: list[str] = typer.Option(
        None, "--sweep", help="key=v1,v2,... (repeat for a grid: the cartesian product)"
    ),
    torchrun: int = typer.Option(None, "--torchrun", min=1, help="processes per run (torchrun)"),
    slurm: bool = typer.Option(False, "--slurm", help="write (and submit) an sbatch script"),
    partition: str = typer.Option(None, "--partition", help="SLURM partition"),
    account: str = typer.Option(None, "--account", help="SLURM account"),
    gpus: int = typer.Option(1, "--gpus", min=1, help="SLURM GPUs (= processes) per node"),
    nodes: int = typer.Option(1, "--nodes", min=1, help="SLURM nodes per run"),
    cpus: int = typer.Option(8, "--cpus", min=1, help="SLURM CPUs per task"),
    time_limit: str = typer.Option("24:00:00", "--time", help="SLURM time limit"),
    name: str = typer.Option("run", "--name", help="run name (sweeps append key_value parts)"),
    out: Path = typer.Option(Path("launch"), "--out", help="folder for the script and logs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="write and print, start nothing"),
) -> None:
    """Start one run or a sweep with torchrun (one after another) or as a SLURM job array.

    Example: pips launch configs/arc_base.yaml --sweep optim.lr.start=1e-4,3e-4 --slurm --gpus 4 --dry-run
    """
    import subprocess

    from pips.training.launch import SlurmOptions, write_launch

    config_path, overrides = _split_config(list(arguments or []))
    if config_path is None:
        _fail("pips launch needs a config file first, e.g. configs/arc_base.yaml")
    options = None
    if slurm:
        options = SlurmOptions(partition, nodes, gpus, cpus, time_limit, account)
    try:
        script, commands = write_launch(
            config_path, overrides, list(sweep or []), out, torchrun, options, name
        )
    except ConfigError as error:
        _fail(str(error))
    typer.echo(script.read_text())
    typer.echo(f"# written to {script}")
    if dry_run:
        return
    if commands is None:
        result = subprocess.run(["sbatch", str(script)], check=False)
        raise typer.Exit(result.returncode)
    for command in commands:
        result = subprocess.run(command, check=False)
        if result.returncode:
            raise typer.Exit(result.returncode)


@app.command(name="lr-find", epilog=_options_table())
def lr_find(
    arguments: list[str] = typer.Argument(
        None, metavar="[CONFIG.yaml] [KEY=VALUE]...", help="the model, data and optimizer"
    ),
    min_lr: float = typer.Option(1e-6, "--min", help="smallest learning rate tried"),
    max_lr: float = typer.Option(1e-1, "--max", help="largest learning rate tried"),
    steps: int = typer.Option(100, "--steps", min=5, help="steps of the search"),
) -> None:
    """Lightning's learning-rate finder on the real model and data: saves lr_find.png and
    lr_find.json in a run folder and prints the suggestion (set it with optim.lr.start=...).

    Example: pips lr-find configs/arc_demo.yaml --steps 100
    """
    from pips.training.lr_find import find_learning_rate
    from pips.training.run import RunError

    config_path, overrides = _split_config(list(arguments or []), default_demo=True)
    try:
        run_dir, suggestion = find_learning_rate(config_path, overrides, min_lr, max_lr, steps)
    except (ConfigError, RunError) as error:
        _fail(str(error))
    typer.echo(f"suggested learning rate: {suggestion:.3g}  (plot: {run_dir / 'lr_find.png'})")
    typer.echo(f"use it with: optim.lr.start={suggestion:.3g}")


KIND_NAMES = QUANTIZER_KINDS  # = shootout.KINDS (tested), without importing the runner


@app.command()
def shootout(
    arguments: list[str] = typer.Argument(
        None,
        metavar="[CONFIG.yaml] [KEY=VALUE]...",
        help="the shared model, data and optimizer (default: configs/arc_demo.yaml)",
    ),
    bits: int = typer.Option(10, "--bits", help="bits per code for every quantizer"),
    steps: int = typer.Option(150, "--steps", min=1, help="training steps per quantizer"),
    minutes: float = typer.Option(None, "--minutes", help="wall-clock cap per quantizer"),
    kinds: str = typer.Option(",".join(KIND_NAMES), "--kinds", help="quantizers to train"),
    out: Path = typer.Option(None, "--out", help="folder for the runs (default runs/shootout-*)"),
    final_grids: int = typer.Option(
        512, "--final-grids", min=1, help="validation grids in each run's final evaluation"
    ),
) -> None:
    """Train the same grid model with each quantizer at matched bits per code and print one
    table: bits per grid, cell and grid accuracy, perplexity, dead codes, grids/s.

    Example: pips shootout --steps 600 --bits 10   (the default budget takes ~10 min on 2 cores)
    """
    from pips.evaluation.shootout import run_shootout
    from pips.training.run import RunError

    config_path, overrides = _split_config(list(arguments or []), default_demo=True)
    chosen = tuple(kind.strip() for kind in kinds.split(",") if kind.strip())
    try:
        root, rows = run_shootout(
            config_path,
            overrides,
            bits,
            steps,
            minutes,
            out,
            chosen,
            final_grids,
            on_start=lambda kind: typer.echo(f"shootout: training {kind}", err=True),
        )
    except (ConfigError, RunError) as error:
        _fail(str(error))
    _print_table(rows, _run_columns(rows), title=f"{bits} bits per code, {steps} steps each")
    typer.echo(f"runs and shootout.json in {root}")


if __name__ == "__main__":
    app()
