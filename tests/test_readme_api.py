"""The README's "As a library" example runs as written (on the tiny run), and pips.load gives
exactly what pips encode / pips decode give."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import pips
from pips.data import collate_grids

REPO = Path(__file__).resolve().parent.parent


def _library_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## As a library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_example_runs(tiny_run):
    run_dir, _ = tiny_run
    code = _library_example().replace('"runs/demo"', repr(str(run_dir)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    tok, grids, again = namespace["tok"], namespace["grids"], namespace["again"]
    assert len(again) == len(grids) and all(g.ndim == 2 for g in again)
    assert tok.codebook_size == 125 and tok.bits_per_item > 0


def test_load_encode_decode_equal_the_cli(tiny_run, task_folder, tmp_path, cli):
    run_dir, _ = tiny_run
    codes_path = tmp_path / "codes.npz"
    assert cli("encode", run_dir, "--data", task_folder, "--out", codes_path).exit_code == 0
    tok = pips.load(run_dir)
    items = tok.task.items(str(task_folder), distinct=False)
    codes = tok.encode(items.items)
    with np.load(codes_path) as data:
        flat = data["codes"]
    np.testing.assert_array_equal(np.concatenate([c.reshape(-1) for c in codes]), flat)
    rebuilt = tok.decode(codes)
    assert len(rebuilt) == len(items)
    for grid, decoded in zip(items.items[:8], rebuilt[:8], strict=True):
        np.testing.assert_array_equal(decoded, tok.model.reconstruct(collate_grids([grid]))[0])
