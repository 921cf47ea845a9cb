"""The task-conditioned prior (``prior.context=task``): whole ARC tasks as sequences, augmented
consistently, scored with precomputed fields, decoded after a task prefix exactly as the
teacher-forced path scores it, trained over raw cells and over a tokenizer's codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pips.config import load_config
from pips.data.arc import load_grids
from pips.data.augment import dihedral, inverse_dihedral
from pips.data.sampler import BatchIndices
from pips.models.code_tokens import IndexSplit, SpatialLayout
from pips.models.prior import CodePrior
from pips.quantizers.fsq import FSQ
from pips.tasks.base import TaskError
from pips.tasks.grids import GridsTask, arc_tasks
from pips.tasks.prior import (
    SEP_IO,
    SEP_PAIR,
    SEPARATOR,
    TEST_OUTPUT,
    TaskRows,
    collate_task_rows,
    grid_fields,
    task_row,
)

torch.set_num_threads(1)

PRESET = str(Path(__file__).resolve().parent.parent / "configs" / "arc_prior.yaml")
TASK_PRESET = Path(__file__).resolve().parent.parent / "configs" / "arc_task_prior.yaml"

SMALL = [
    "prior.context=task",
    "prior.width=32",
    "prior.depth=1",
    "prior.heads=2",
    "prior.augment_copies=2",
    "prior.max_tokens=600",
    "prior.max_tasks=8",
    "prior.solve_samples=2",
    "data.max_final_val_samples=3",
    "data.max_val_samples=3",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_every=2",
    "trainer.log_every=2",
    "trainer.progress=false",
    "trainer.threads=1",
]


# ------------------------------------------------------------------------------ the sequences
def _code_layout() -> SpatialLayout:
    """Code maps of at most 4 x 5 positions, each code (FSQ 8^4) as two tokens of 64 values."""
    return SpatialLayout(4, 5, IndexSplit.for_quantizer(FSQ([8] * 4), 64))


def _code_task(layout: SpatialLayout, pairs: int, seed: int = 0) -> list:
    """Token rows of ``pairs`` (input, output) random code maps, the test pair last."""
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 5)), int(rng.integers(1, 6))) for _ in range(2 * pairs)]
    rows = [layout.tokens(rng.integers(0, 8**4, size=shape)) for shape in shapes]
    return [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]


def _row(layout, pairs, max_tokens: int = 4096):
    fields = grid_fields(layout, [g for pair in pairs for g in pair])
    grids = [(fields[i], fields[i + 1]) for i in range(0, len(fields), 2)]
    return task_row(grids, layout.vocab_size, max_tokens)


def _prior(layout, seed: int = 0) -> CodePrior:
    torch.manual_seed(seed)
    return CodePrior(layout, width=32, depth=2, heads=2, condition_vocab=2).eval()


def test_a_task_is_its_grids_with_separators_and_precomputed_fields():
    """The precomputed [low, high) and coordinates are the layout's at every grid position
    (0 for the separators), and uniform logits cost exactly the grids' capacity."""
    layout = _code_layout()
    pairs = _code_task(layout, 3)
    row = _row(layout, pairs)
    batch = collate_task_rows([row], layout, alone=True)
    vocab = layout.vocab_size
    assert batch.inputs[0, 0] == vocab  # BOS
    torch.testing.assert_close(batch.inputs[0, 1:], torch.as_tensor(row.tokens[:-1]).long())
    start, capacity = 0, 0.0
    for index, grid in enumerate(g for pair in pairs for g in pair):
        if index:  # the separator before this grid: after an input SEP_IO, else SEP_PAIR
            assert row.tokens[start] == vocab + (SEP_IO if index % 2 else SEP_PAIR)
            assert row.role[start] == SEPARATOR and not row.coordinates[start].any()
            start += 1
        tokens = torch.as_tensor(grid)[None]
        positions = torch.arange(len(grid))
        low, high = layout.allowed(tokens, positions)
        where = slice(start, start + len(grid))
        torch.testing.assert_close(batch.low[0, where], low[0])
        torch.testing.assert_close(batch.high[0, where], high[0])
        torch.testing.assert_close(
            batch.coordinates[0, where], layout.coordinates(tokens, positions)[0]
        )
        torch.testing.assert_close(batch.targets[0, where], tokens[0])
        assert (batch.role[0, where] > 0).all()
        capacity += float(layout.capacity_bits(tokens)[0])
        start += len(grid)
    assert start == len(row) and row.test_output == len(row) - len(pairs[-1][1])
    assert (batch.role[0, row.test_output :] == TEST_OUTPUT).all()
    prior = _prior(layout)
    torch.nn.init.zeros_(prior.head.weight)  # uniform over every allowed field
    with torch.no_grad():
        log_probs = batch.log_probs(prior)
    bits = -float(log_probs[batch.role > 0].double().sum()) / math.log(2)
    assert bits == pytest.approx(capacity, rel=1e-6)
    assert torch.isfinite(log_probs).all()  # separators and padding have a target in range


def test_the_test_output_alone_is_the_one_item_sequence():
    """[BOS, out_test] scored as a sequence equals the item path (context=item) on that grid."""
    layout = _code_layout()
    pairs = _code_task(layout, 3, seed=1)
    row = _row(layout, pairs)
    prior = _prior(layout, 1)
    alone = collate_task_rows([row], layout, alone=True).alone
    with torch.no_grad():
        nats = -alone.log_probs(prior)[alone.role == TEST_OUTPUT].sum()
        item = prior.bits(torch.as_tensor(pairs[-1][1])[None].long())[0]
    torch.testing.assert_close(nats / math.log(2), item, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("guidance", [None, 1.5], ids=["conditional", "guided"])
def test_decoding_after_a_task_prefix_equals_the_teacher_forced_logits(cache, guidance):
    """Decoding the test output after [BOS, in_1, ..., in_test, SEP_IO] with the prefix's
    coordinates gives the teacher-forced logits of those positions at every step (guided:
    against the stream [BOS, in_test, SEP_IO], as the teacher-forced task without its
    demonstrations gives them)."""
    layout = _code_layout()
    row = _row(layout, _code_task(layout, 3, seed=2))
    prior = _prior(layout, 2)
    cut = row.test_output
    with torch.no_grad():
        batch = collate_task_rows([row], layout, alone=False)
        full = prior.sequence_logits(batch.inputs, batch.coordinates, batch.low, batch.high)
        full = full[0, cut:]
        if guidance is not None:
            short = row.suffix(row.test_input)
            bare = collate_task_rows([short], layout, alone=False)
            plain = prior(bare.inputs, coordinates=bare.coordinates)[0, short.test_output :]
            conditional = prior(batch.inputs, coordinates=batch.coordinates)[0, cut:]
            mixed = plain + guidance * (conditional - plain)
            keep = torch.isfinite(full)
            full = torch.where(keep, mixed, full)
    condition = torch.as_tensor(row.tokens[:cut]).long()
    coordinates = torch.as_tensor(row.coordinates[:cut]).long()
    options = {}
    if guidance is not None:
        options = dict(
            unconditional=condition[row.test_input :],
            unconditional_coordinates=coordinates[row.test_input :],
        )
    output = torch.as_tensor(row.test_output_tokens).long()
    decoding = prior.start(
        1, len(output), condition, guidance, cache, condition_coordinates=coordinates, **options
    )
    steps = []
    for token in output:
        steps.append(decoding.next_logits()[0])
        decoding.push(token[None])
    stepped = torch.stack(steps)
    finite = torch.isfinite(full)
    assert torch.equal(torch.isfinite(stepped), finite)
    torch.testing.assert_close(stepped[finite], full[finite], atol=1e-5, rtol=0)


def test_a_long_task_drops_its_earliest_demonstrations_never_the_test_pair():
    layout = _code_layout()
    pairs = _code_task(layout, 5, seed=3)
    whole = _row(layout, pairs)
    kept = _row(layout, pairs[2:])
    cut = _row(layout, pairs, max_tokens=len(kept))
    assert cut.dropped == 2 and len(cut) == len(kept) < len(whole)
    np.testing.assert_array_equal(cut.tokens, kept.tokens)
    np.testing.assert_array_equal(cut.test_output_tokens, pairs[-1][1])
    alone = _row(layout, pairs, max_tokens=8)  # even the test pair alone is longer: kept whole
    assert alone.dropped == 4
    np.testing.assert_array_equal(alone.test_input_tokens, pairs[-1][0])


def test_dropped_demonstrations_are_drawn_from_the_batchs_own_seed():
    layout = _code_layout()
    rows = [_row(layout, _code_task(layout, 3, seed=s)) for s in range(16)]
    dataset = TaskRows(rows, drop=0.5)
    batch = dataset.__getitems__(BatchIndices(range(16), seed=0, epoch=1, batch_number=2))
    again = dataset.__getitems__(BatchIndices(range(16), seed=0, epoch=1, batch_number=2))
    dropped = [len(b) < len(r) for b, r in zip(batch, rows, strict=True)]
    assert 0 < sum(dropped) < 16
    assert dropped == [len(b) < len(r) for b, r in zip(again, rows, strict=True)]
    for short, row in zip(batch, rows, strict=True):
        np.testing.assert_array_equal(short.test_output_tokens, row.test_output_tokens)
        if len(short) < len(row):  # [in_test, SEP_IO, out_test]
            assert short.test_input == 0 and short.test_output == len(row.test_input_tokens) + 1


# ---------------------------------------------------------------------------- ARC tasks
def test_arc_tasks_put_one_test_pair_last():
    records = load_grids("arc1", "training", distinct=False)
    tasks = dict(arc_tasks([r for r in records if r.task_id in ("007bbfb7", "239be575")]))
    assert set(tasks) == {"007bbfb7", "239be575#0", "239be575#1"}
    test = [r.grid for r in records if r.task_id == "239be575" and r.subset == "test"]
    assert np.array_equal(tasks["239be575#1"][-1][0], test[2])  # test pair 1's input
    assert len(tasks["239be575#0"]) == len(tasks["239be575#1"])  # the other test pair left out


def test_task_copies_share_one_dihedral_element_and_colour_permutation(task_folder):
    """Undo each copy: one D4 element and one colour permutation map every grid of the task
    (the pairs' rule holds in the copy)."""
    config = load_config(overrides=[f"grids.source={task_folder}"])
    task = GridsTask(config)
    tasks = task.prior_tasks()[0][:6]
    copies = task.augment_tasks(tasks, 4, "dihedral+colours", seed=5)
    assert copies[: len(tasks)] == tasks
    moved = 0
    for index, (task_id, pairs) in enumerate(copies[len(tasks) :]):
        original_id, original = tasks[index % len(tasks)]
        assert task_id == original_id
        grids = [g for pair in original for g in pair]
        views = [g for pair in pairs for g in pair]
        found = []
        for k in range(8):
            undone = [dihedral(v, inverse_dihedral(k)) for v in views]
            if any(u.shape != g.shape for u, g in zip(undone, grids, strict=True)):
                continue
            colours = np.concatenate([g.ravel() for g in grids])
            seen = np.concatenate([u.ravel() for u in undone])
            mapping = {}
            if all(
                mapping.setdefault(int(a), int(b)) == int(b)
                for a, b in zip(colours, seen, strict=True)
            ):
                if len(set(mapping.values())) == len(mapping) and mapping.get(0, 0) == 0:
                    found.append(k)
        assert found, f"copy {index} of {task_id} is no single D4 element and permutation"
        moved += any(
            v.shape != g.shape or (v != g).any() for v, g in zip(views, grids, strict=True)
        )
    assert moved >= len(tasks)  # the copies are real changes, not the originals again


def test_a_source_without_tasks_of_pairs_says_so():
    from pips.tasks.sequences import SequencesTask

    with pytest.raises(TaskError, match="context=task needs a task of pairs"):
        SequencesTask(load_config(overrides=["task=sequences"])).prior_tasks()


# ---------------------------------------------------------------------------- runs
def _train(cli, root: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    result = cli("train", PRESET, f"run_root={root}", f"name={name}", *SMALL, *overrides)
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = root / name
    return run, json.loads((run / "summary.json").read_text())


def test_a_raw_task_prior_trains_and_evaluate_reports_the_solve_rates(cli, task_folder, tmp_path):
    run, summary = _train(
        cli,
        tmp_path,
        "raw",
        "prior.tokenizer=raw",
        f"grids.source={task_folder}",
        "grids.val_fraction=0.25",
        "trainer.max_steps=20",
        "trainer.val_every=10",
    )
    assert summary["status"] == "finished" and summary["steps"] == 20
    assert summary["prior_bits"] == summary["test_output_bits"]
    assert summary["demonstration_gain_bits"] == pytest.approx(
        summary["test_output_bits_alone"] - summary["test_output_bits"]
    )
    assert summary["decoder_bits"] == 0.0 and summary["prior_bits"] < summary["uniform_code_bits"]
    for key in ("solve_rate_greedy", "solve_rate_best_of_k"):
        assert 0.0 <= summary[key] <= 1.0
    assert "val_output_equals_input" in summary and "val_predicted_equals_input" in summary
    result = cli("evaluate", run)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for key in (
        "test_output_bits",
        "test_output_bits_alone",
        "demonstration_gain_bits",
        "solve_rate_greedy",
        "solve_rate_best_of_k",
        "output_equals_input",
        "predicted_equals_input",
        "train_solve_rate_greedy",
    ):
        assert key in result.output
    metrics = json.loads(cli("evaluate", run, "--json").output)["metrics"]
    assert metrics["prior_bits"] == pytest.approx(summary["prior_bits"], rel=1e-5)


def test_a_task_prior_over_a_tokenizers_codes_trains(cli, copy_run, tmp_path):
    tokenizer = copy_run  # a copy: what this test caches in it is its own
    before = set((tokenizer / "prior_cache").glob("tokens-*.npz"))  # other priors' caches
    run, summary = _train(
        cli,
        tmp_path,
        "codes",
        f"prior.tokenizer={tokenizer}",
        "prior.max_tasks=4",
        "prior.drop_demonstrations=0.5",
        "prior.guidance=1.5",
    )
    assert summary["status"] == "finished" and summary["decoder_bits"] > 0
    assert summary["codelength_bits"] == pytest.approx(
        summary["prior_bits"] + summary["decoder_bits"]
    )
    assert 0.0 <= summary["val_solve_rate_ceiling"] <= 1.0
    [cache] = set((tokenizer / "prior_cache").glob("tokens-*.npz")) - before  # encoded once
    stamp = cache.stat().st_mtime_ns
    result = cli("evaluate", run, "--json")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert cache.stat().st_mtime_ns == stamp  # read, not written again
    metrics = json.loads(result.output)["metrics"]
    assert metrics["codelength_bits"] == pytest.approx(summary["codelength_bits"], rel=1e-5)
    assert 0.0 <= metrics["train_solve_rate_greedy"] <= 1.0


def test_the_task_prior_preset_loads():
    config = load_config(TASK_PRESET)
    assert config.task == "prior" and config.prior.context == "task"
    assert config.prior.part_values == 64
