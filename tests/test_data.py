"""ARC loading and validation, augmentation, size-bucketed sampling and the DataLoader."""

import json
import pickle
from collections import Counter

import numpy as np
import pytest

from pips.data import (
    MAX_GRID_SIZE,
    BatchIndices,
    BucketBatchSampler,
    GridAugmenter,
    GridBatches,
    GridError,
    batch_to_grids,
    dihedral,
    grid_information_bits,
    inverse_dihedral,
    load_grids,
    make_dataloader,
    padding_efficiency,
    random_colour_permutation,
    random_colour_permutations,
)
from pips.data.arc import is_evaluation_task

# ----------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def arc1_training():
    return load_grids("arc1", "training")


@pytest.fixture(scope="module")
def arc1_evaluation():
    return load_grids("arc1", "evaluation")


def keys(records):
    return [record.key for record in records]


def test_arc1_counts_are_those_of_the_bundled_data(arc1_training, arc1_evaluation):
    # 400 + 400 tasks, ~8.5 grids each before de-duplication
    assert len(arc1_training) == 3341
    assert len(arc1_evaluation) == 3528
    assert len({record.task_id for record in arc1_training}) == 400
    assert len({record.task_id for record in arc1_evaluation}) == 400


def test_arc2_evaluation_loads():
    records = load_grids("arc2", "evaluation")
    assert len(records) == 1051
    assert len({record.task_id for record in records}) == 120


def test_loaded_grids_are_valid_distinct_and_in_canonical_order(arc1_training):
    assert len(set(keys(arc1_training))) == len(arc1_training)
    for record in arc1_training[:500]:
        assert record.grid.dtype == np.int64 and record.grid.ndim == 2
        assert 1 <= min(record.grid.shape) and max(record.grid.shape) <= MAX_GRID_SIZE
        assert 0 <= record.grid.min() and record.grid.max() <= 9
    order = [
        (
            r.task_id,
            ("train", "test").index(r.subset),
            r.pair_index,
            ("input", "output").index(r.role),
        )
        for r in arc1_training
    ]
    assert order == sorted(order)


def test_loading_is_deterministic(arc1_training):
    again = load_grids("arc1", "training")
    assert keys(again) == keys(arc1_training)
    assert [(r.task_id, r.subset, r.pair_index, r.role) for r in again] == [
        (r.task_id, r.subset, r.pair_index, r.role) for r in arc1_training
    ]


def test_exclude_drops_validation_grids_seen_in_training(arc1_training, arc1_evaluation):
    evaluation = load_grids("arc1", "evaluation", exclude=arc1_training)
    training_keys = set(keys(arc1_training))
    overlap = [key for key in keys(arc1_evaluation) if key in training_keys]
    assert overlap, "ARC-AGI-1 shares some grids between its splits, e.g. small blank ones"
    assert len(evaluation) == len(arc1_evaluation) - len(overlap)
    assert not training_keys & set(keys(evaluation))


def test_max_samples_is_a_deterministic_subset_spread_across_tasks(arc1_training):
    subset = load_grids("arc1", "training", max_samples=200)
    assert len(subset) == 200
    chosen = np.sort(np.random.default_rng(0).permutation(len(arc1_training))[:200])
    assert keys(subset) == [arc1_training[i].key for i in chosen]
    full_positions = {key: i for i, key in enumerate(keys(arc1_training))}
    positions = [full_positions[key] for key in keys(subset)]
    assert positions == sorted(positions)  # a subsequence of the full list
    assert len({record.task_id for record in subset}) > 100


def test_grid_information_bits_grows_with_content():
    blank = np.zeros((30, 30), dtype=np.int64)
    noise = np.random.default_rng(0).integers(0, 10, size=(30, 30))
    assert isinstance(grid_information_bits(blank), float)
    assert grid_information_bits(blank) < 200  # 17 bytes of zlib overhead and one long run
    assert grid_information_bits(noise) > 0.9 * 900 * np.log2(10)  # noise is incompressible


# ----------------------------------------------------------------------------- folders and errors


def write_task(folder, task_id, train, test=()):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task_id}.json"
    path.write_text(json.dumps({"train": list(train), "test": list(test)}))
    return path


def pair(seed, height=3, width=4, output=True):
    rng = np.random.default_rng(seed)
    grids = {"input": rng.integers(0, 10, size=(height, width)).tolist()}
    if output:
        grids["output"] = rng.integers(0, 10, size=(width, height)).tolist()
    return grids


@pytest.mark.parametrize(
    "bad_grid, problem",
    [
        ([[0, 1], [2, 12]], "colour 12 at row 1, column 1 is outside 0-9"),
        ([[0, 1], [2]], "row 1 has 1 cells but row 0 has 2; grids are rectangular"),
        ([[0]] * 31, "the grid is 31x1; grids have 1 to 30 rows and columns"),
        ([[0] * 31], "the grid is 1x31"),
        ([], "the grid is empty"),
        ([[]], "the grid is empty"),
        ([[0, 1.0]], "cell at row 0, column 1 is 1.0 (float), not an integer colour 0-9"),
        ([[True, 1]], "cell at row 0, column 0 is True (bool), not an integer colour 0-9"),
        ([[-1]], "colour -1 at row 0, column 0 is outside 0-9"),
        ("0123", "expected a list of rows"),
    ],
    ids=[
        "colour-12",
        "ragged",
        "31-rows",
        "31-columns",
        "empty",
        "empty-row",
        "float",
        "bool",
        "negative",
        "string",
    ],
)
def test_bad_grid_error_names_file_task_pair_and_problem(tmp_path, bad_grid, problem):
    write_task(tmp_path, "good", [pair(0)])
    bad_pair = {"input": bad_grid, "output": [[0]]}
    path = write_task(tmp_path / "nested", "abc", [pair(1), pair(2), bad_pair])
    with pytest.raises(GridError) as caught:
        load_grids(str(tmp_path), "all")
    message = str(caught.value)
    assert message.startswith(f"{path}: task nested/abc, train pair 2 input: ")  # its path
    assert problem in message
    assert message.endswith("; fix the file or remove the task.")


def test_invalid_json_and_missing_input_are_grid_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(GridError, match=r"broken\.json: task broken: not valid JSON"):
        load_grids(str(tmp_path), "all")
    (tmp_path / "broken.json").unlink()
    write_task(tmp_path, "noinput", [{"output": [[1]]}])
    with pytest.raises(
        GridError, match="task noinput, train pair 0 input: the pair has no 'input'"
    ):
        load_grids(str(tmp_path), "all")


def test_a_pair_that_is_not_an_object_is_a_grid_error(tmp_path):
    write_task(tmp_path, "odd", [pair(0), [[1]]])
    with pytest.raises(GridError, match="task odd, train pair 1: expected an object with 'input'"):
        load_grids(str(tmp_path), "all")


def test_missing_test_outputs_are_skipped_and_inputs_kept(tmp_path):
    write_task(tmp_path, "hidden", [pair(0)], test=[pair(1, output=False)])
    records = load_grids(str(tmp_path), "all")
    assert [(r.subset, r.pair_index, r.role) for r in records] == [
        ("train", 0, "input"),
        ("train", 0, "output"),
        ("test", 0, "input"),
    ]


def test_missing_folder_or_empty_folder_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_grids(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="holds no .json files"):
        load_grids(str(tmp_path))


def test_unknown_source_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown ARC source 'arc3'; use arc1, arc2, or a path"):
        load_grids("arc3")
    with pytest.raises(ValueError, match="split must be one of training, evaluation, all"):
        load_grids("arc1", "train")


def test_folder_split_is_deterministic_disjoint_and_complete(tmp_path):
    for index in range(60):
        write_task(tmp_path / f"group{index % 3}", f"task{index:03d}", [pair(index, 2, 2)])
    load = lambda split: load_grids(str(tmp_path), split, val_fraction=0.25)  # noqa: E731
    training, evaluation, everything = load("training"), load("evaluation"), load("all")
    training_ids = {r.task_id for r in training}
    evaluation_ids = {r.task_id for r in evaluation}
    assert not training_ids & evaluation_ids
    assert training_ids | evaluation_ids == {r.task_id for r in everything}
    assert len(everything) == 120 and len(training) + len(evaluation) == 120
    assert 5 <= len(evaluation_ids) <= 25  # ~25% of 60 tasks
    assert keys(load("evaluation")) == keys(evaluation)
    names = [f"group{i % 3}/task{i:03d}" for i in range(60)]  # ids: paths in the folder
    assert evaluation_ids == {name for name in names if is_evaluation_task(name, 0.25)}


# ----------------------------------------------------------------------------- augmentation

ASYMMETRIC = np.arange(12).reshape(3, 4) % 10  # no symmetry: all 8 images differ


def test_dihedral_elements_are_distinct_and_match_numpy():
    images = [dihedral(ASYMMETRIC, k) for k in range(8)]
    assert len({(image.shape, image.tobytes()) for image in map(np.ascontiguousarray, images)}) == 8
    references = [
        ASYMMETRIC,
        np.rot90(ASYMMETRIC, 2),
        np.flipud(ASYMMETRIC),
        np.fliplr(ASYMMETRIC),
        ASYMMETRIC.T,
        np.rot90(ASYMMETRIC, 1),
        np.rot90(ASYMMETRIC, -1),
        np.rot90(ASYMMETRIC, 2).T,
    ]
    for image, reference in zip(images, references, strict=True):
        np.testing.assert_array_equal(image, reference)


def test_dihedral_inverse_undoes_and_the_elements_form_a_group():
    as_key = lambda grid: (grid.shape, np.ascontiguousarray(grid).tobytes())  # noqa: E731
    elements = {as_key(dihedral(ASYMMETRIC, k)): k for k in range(8)}
    for k in range(8):
        np.testing.assert_array_equal(
            dihedral(dihedral(ASYMMETRIC, k), inverse_dihedral(k)), ASYMMETRIC
        )
        for j in range(8):  # closure: composing two elements gives one of the 8
            assert as_key(dihedral(dihedral(ASYMMETRIC, k), j)) in elements


def test_orientation_classes_first_four_keep_shape_last_four_transpose():
    for k in range(8):
        expected = (3, 4) if k < 4 else (4, 3)
        assert dihedral(ASYMMETRIC, k).shape == expected


def test_colour_permutation_keeps_black_when_asked():
    rng = np.random.default_rng(0)
    kept = [random_colour_permutation(rng, keep_black=True) for _ in range(200)]
    free = [random_colour_permutation(rng, keep_black=False) for _ in range(200)]
    for permutation in kept + free:
        assert sorted(permutation.tolist()) == list(range(10))
    assert all(permutation[0] == 0 for permutation in kept)
    assert any(permutation[0] != 0 for permutation in free)


def test_batched_colour_permutations_are_independent_and_empty_batches_work():
    permutations = random_colour_permutations(np.random.default_rng(0), 64, keep_black=False)
    assert permutations.shape == (64, 10)
    assert len({row.tobytes() for row in permutations}) == 64
    elements, permutations = GridAugmenter().sample(0, np.random.default_rng(0))
    assert elements.shape == (0,) and permutations.shape == (0, 10)


def test_augmenter_draws_one_orientation_per_batch():
    augmenter = GridAugmenter(colour_permutation=False)
    orientations = set()
    for seed in range(50):
        elements, _ = augmenter.sample(16, np.random.default_rng(seed))
        transposed = elements >= 4
        assert transposed.all() or not transposed.any()
        orientations.add(bool(transposed[0]))
    assert orientations == {False, True}


def test_augmenter_applies_each_grids_own_transform_and_is_deterministic():
    augmenter = GridAugmenter()
    rng = np.random.default_rng(3)
    grids = [rng.integers(0, 10, size=(h, w)) for h, w in [(3, 4), (5, 2), (1, 1), (4, 4)]]
    elements, permutations = augmenter.sample(len(grids), np.random.default_rng(7))
    augmented = augmenter(grids, np.random.default_rng(7))
    for grid, k, permutation, result in zip(grids, elements, permutations, augmented, strict=True):
        np.testing.assert_array_equal(result, permutation[dihedral(grid, int(k))])
    again = augmenter(grids, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(augmented, again, strict=True))
    other = augmenter(grids, np.random.default_rng(8))
    assert not all(np.array_equal(a, b) for a, b in zip(augmented, other, strict=True))


def test_augmenter_with_everything_off_is_the_identity():
    grids = [ASYMMETRIC, ASYMMETRIC.T]
    augmented = GridAugmenter(colour_permutation=False, dihedral=False)(
        grids, np.random.default_rng(0)
    )
    assert all(np.array_equal(a, b) for a, b in zip(augmented, grids, strict=True))


def test_each_grid_sees_the_8_transforms_uniformly():
    augmenter = GridAugmenter(colour_permutation=False)
    rng = np.random.default_rng(0)
    counts = Counter(int(k) for _ in range(4000) for k in augmenter.sample(4, rng)[0])
    expected = 4000 * 4 / 8
    assert sorted(counts) == list(range(8))
    assert all(abs(count - expected) < 0.1 * expected for count in counts.values())


# ----------------------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def arc1_shapes(arc1_training):
    return np.array([record.grid.shape for record in arc1_training])


def test_bucketing_is_at_least_twice_as_padding_efficient_as_random_batches(arc1_shapes):
    bucketed = BucketBatchSampler(arc1_shapes, 32, seed=0, bucket=True).epoch_batches(0)
    random = BucketBatchSampler(arc1_shapes, 32, seed=0, bucket=False).epoch_batches(0)
    bucketed_efficiency = padding_efficiency(arc1_shapes, bucketed)
    random_efficiency = padding_efficiency(arc1_shapes, random)
    assert bucketed_efficiency >= 2 * random_efficiency
    assert bucketed_efficiency > 0.8  # the docstring of pips.data.sampler says 0.85


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_index_appears_once_per_epoch(arc1_shapes, bucket, drop_last):
    sampler = BucketBatchSampler(arc1_shapes, 32, bucket=bucket, drop_last=drop_last)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    indices = np.concatenate(batches)
    assert len(np.unique(indices)) == len(indices)
    if drop_last:
        assert all(len(batch) == 32 for batch in batches)
        assert len(indices) == len(arc1_shapes) // 32 * 32
    else:
        assert sorted(indices.tolist()) == list(range(len(arc1_shapes)))


def test_sampler_is_deterministic_and_epochs_and_seeds_differ(arc1_shapes):
    def epoch(seed, number):
        sampler = BucketBatchSampler(arc1_shapes, 32, seed=seed)
        sampler.set_epoch(number)
        return [list(batch) for batch in sampler]

    assert epoch(0, 1) == epoch(0, 1)
    assert epoch(0, 1) != epoch(0, 2)
    assert epoch(0, 1) != epoch(1, 1)


def test_unshuffled_sampler_gives_the_same_batches_every_epoch(arc1_shapes):
    sampler = BucketBatchSampler(arc1_shapes, 32, shuffle=False)
    assert sampler.epoch_batches(0) == sampler.epoch_batches(5)


def test_state_dict_resume_yields_exactly_the_remaining_batches(arc1_shapes):
    sampler = BucketBatchSampler(arc1_shapes, 32, seed=4)
    sampler.set_epoch(3)
    full_epoch = sampler.epoch_batches(3)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(10)]
    assert consumed == full_epoch[:10]
    state = sampler.state_dict()
    assert state == {"epoch": 3, "batches_yielded": 10}

    resumed = BucketBatchSampler(arc1_shapes, 32, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer re-announces the epoch: the position is kept
    remaining = list(resumed)
    assert remaining == full_epoch[10:]
    assert [batch.rng_key for batch in remaining] == [batch.rng_key for batch in full_epoch[10:]]
    assert resumed.state_dict() == {"epoch": 3, "batches_yielded": len(full_epoch)}
    resumed.set_epoch(4)
    assert list(resumed) == sampler.epoch_batches(4)


def test_an_abandoned_pass_does_not_shorten_the_next_one(arc1_shapes):
    # Lightning's validation loop stops after len(sampler) batches without exhausting the
    # iterator; the next validation must still see every batch.
    sampler = BucketBatchSampler(arc1_shapes, 32, shuffle=False)
    iterator = iter(sampler)
    first_pass = [next(iterator) for _ in range(len(sampler))]
    assert list(sampler) == first_pass
    partial = iter(sampler)
    next(partial)
    assert list(sampler) == first_pass


def test_state_from_another_dataset_is_refused(arc1_shapes):
    sampler = BucketBatchSampler(arc1_shapes, 32)
    with pytest.raises(ValueError, match="the checkpoint was saved with other data or batch size"):
        sampler.load_state_dict({"epoch": 0, "batches_yielded": len(sampler) + 1})


def test_replicas_get_equal_disjoint_shares_that_cover_the_epoch(arc1_shapes):
    shares = [
        BucketBatchSampler(arc1_shapes, 32, num_replicas=3, rank=rank).epoch_batches(0)
        for rank in range(3)
    ]
    assert len({len(share) for share in shares}) == 1
    numbers = [batch.batch_number for share in shares for batch in share]
    assert len(set(numbers)) == len(numbers)
    covered = {index for share in shares for batch in share for index in batch}
    assert covered == set(range(len(arc1_shapes)))


def test_cell_budget_batches_cover_the_epoch_and_hold_the_budget(arc1_shapes):
    budget, cap = 6144, 64
    sampler = BucketBatchSampler(arc1_shapes, cap, seed=2, max_cells=budget)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(arc1_shapes)))
        for batch in batches:
            side = int(arc1_shapes[batch].max())
            assert len(batch) <= cap
            assert len(batch) == 1 or len(batch) * side * side <= budget
    # large grids get their share of the steps: a grid-count batch of 32 gives the grids of
    # 500 cells or more (4% of them) 4% of the batches, a 6,144-cell budget four times that
    cells = arc1_shapes.prod(axis=1)

    def large_share(batches):
        return np.mean([cells[batch].mean() >= 500 for batch in batches])

    counted = BucketBatchSampler(arc1_shapes, 32, seed=2).epoch_batches(0)
    budgeted = sampler.epoch_batches(0)
    assert large_share(budgeted) > 3 * large_share(counted)
    assert abs(len(budgeted) - len(counted)) <= 0.1 * len(counted)  # as many steps an epoch


def test_cell_budget_batches_resume_and_shard_like_counted_ones(arc1_shapes):
    sampler = BucketBatchSampler(arc1_shapes, 64, seed=1, max_cells=4096)
    full = sampler.epoch_batches(0)
    iterator = iter(sampler)
    [next(iterator) for _ in range(7)]
    resumed = BucketBatchSampler(arc1_shapes, 64, seed=1, max_cells=4096)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == full[7:]
    shares = [
        BucketBatchSampler(arc1_shapes, 64, max_cells=4096, num_replicas=2, rank=r).epoch_batches(0)
        for r in range(2)
    ]
    assert len(shares[0]) == len(shares[1])
    assert {i for share in shares for batch in share for i in batch} == set(range(len(arc1_shapes)))


def test_a_cell_budget_needs_bucketed_batches(arc1_shapes):
    with pytest.raises(ValueError, match="max_cells.*bucket"):
        BucketBatchSampler(arc1_shapes, 32, bucket=False, max_cells=4096)


def test_batch_indices_survive_pickling_for_workers():
    batch = BatchIndices([3, 1, 2], seed=5, epoch=6, batch_number=7)
    copy = pickle.loads(pickle.dumps(batch))
    assert copy == [3, 1, 2] and copy.rng_key == (5, 6, 7)


# ----------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def small_records(arc1_training):
    return arc1_training[:300]


def batches_as_arrays(loader, epoch):
    loader.batch_sampler.set_epoch(epoch)
    return [(batch.tokens.numpy(), batch.shapes.numpy()) for batch in loader]


def test_validation_loader_yields_every_grid_once_unchanged(small_records):
    loader = make_dataloader(small_records, 32, shuffle=False, seed=0)
    grids = [
        grid
        for batch in loader
        for grid in batch_to_grids(batch.tokens, batch.shapes, batch.canvas_width, eos=True)
    ]
    assert sorted(record.key for record in small_records) == sorted(
        (grid.shape, grid.astype(np.int64).tobytes()) for grid in grids
    )


def test_augmented_batches_depend_only_on_seed_epoch_and_batch_number(small_records):
    def loader(num_workers):
        return make_dataloader(
            small_records,
            32,
            shuffle=True,
            seed=1,
            augmenter=GridAugmenter(),
            num_workers=num_workers,
        )

    in_process = batches_as_arrays(loader(0), epoch=2)
    with_workers = batches_as_arrays(loader(2), epoch=2)
    assert len(in_process) == len(with_workers)
    for (tokens, shapes), (tokens_w, shapes_w) in zip(in_process, with_workers, strict=True):
        np.testing.assert_array_equal(tokens, tokens_w)
        np.testing.assert_array_equal(shapes, shapes_w)
    other_epoch = batches_as_arrays(loader(0), epoch=3)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(in_process, other_epoch, strict=True))

    resumed = loader(0)
    resumed.batch_sampler.load_state_dict({"epoch": 2, "batches_yielded": 4})
    for (tokens, _), batch in zip(in_process[4:], resumed, strict=True):
        np.testing.assert_array_equal(tokens, batch.tokens.numpy())


def test_pad_to_max_uses_a_full_canvas(small_records):
    batch = next(iter(make_dataloader(small_records, 8, shuffle=False, seed=0, pad_to_max=True)))
    assert (batch.canvas_height, batch.canvas_width) == (MAX_GRID_SIZE, MAX_GRID_SIZE + 1)


def test_augmenting_dataset_refuses_unseeded_batches(small_records):
    dataset = GridBatches(small_records, GridAugmenter())
    with pytest.raises(TypeError, match="needs BatchIndices"):
        dataset.__getitems__([0, 1])
    assert len(dataset.__getitems__(BatchIndices([0, 1], 0, 0, 0))) == 2
