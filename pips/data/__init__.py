"""ARC grids as token batches: vocabulary, loading, augmentation, size-bucketed batching."""

from pips.data.arc import (
    PACKAGE_SOURCES,
    SPLITS,
    GridError,
    GridRecord,
    grid_information_bits,
    grid_key,
    load_grids,
    validate_grid,
)
from pips.data.augment import (
    DIHEDRAL_NAMES,
    DIHEDRAL_TRANSFORMS,
    GridAugmenter,
    apply_colour_permutation,
    dihedral,
    inverse_dihedral,
    is_transposing,
    random_colour_permutation,
    random_colour_permutations,
)
from pips.data.batch import Batch, batch_to_grids, collate_grids, flatten_grid, unflatten_grid
from pips.data.loader import GridBatches, make_dataloader
from pips.data.sampler import BatchIndices, BucketBatchSampler, padding_efficiency
from pips.data.vocab import MAX_GRID_SIZE, NUM_COLOURS, VOCAB, Vocabulary

__all__ = [
    "DIHEDRAL_NAMES",
    "DIHEDRAL_TRANSFORMS",
    "MAX_GRID_SIZE",
    "NUM_COLOURS",
    "PACKAGE_SOURCES",
    "SPLITS",
    "VOCAB",
    "Batch",
    "BatchIndices",
    "BucketBatchSampler",
    "GridAugmenter",
    "GridBatches",
    "GridError",
    "GridRecord",
    "Vocabulary",
    "apply_colour_permutation",
    "batch_to_grids",
    "collate_grids",
    "dihedral",
    "flatten_grid",
    "grid_information_bits",
    "grid_key",
    "inverse_dihedral",
    "is_transposing",
    "load_grids",
    "make_dataloader",
    "padding_efficiency",
    "random_colour_permutation",
    "random_colour_permutations",
    "unflatten_grid",
    "validate_grid",
]
