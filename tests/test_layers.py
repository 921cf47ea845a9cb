"""The layers of DESIGN.md, enforced: imports point down only (the import-linter contract in
pyproject.toml), and the task-independent code never asks which task it holds."""

from __future__ import annotations

import re
from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent


def test_no_package_imports_a_layer_above_it():
    assert lint_imports(str(REPO / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_runner_and_verbs_do_not_branch_on_the_task():
    """Outside pips/tasks nothing compares the task's name or checks a task's class."""
    pattern = re.compile(r"\.task\s*[!=]=|task\s*==\s*['\"]|isinstance\([^)]*(Module|Task)\b")
    offenders = []
    for folder in ("training", "evaluation"):
        for path in sorted((REPO / "pips" / folder).glob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    cli = (REPO / "pips" / "cli.py").read_text().splitlines()
    offenders += [
        f"pips/cli.py:{n}: {line}" for n, line in enumerate(cli, 1) if pattern.search(line)
    ]
    assert not offenders, "\n".join(offenders)
