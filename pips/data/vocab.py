"""The token vocabulary of grids: ten colours, then PAD, EOS and MASK.

Every other module asks this object for the special ids; none is hard-coded elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_COLOURS = 10
MAX_GRID_SIZE = 30


@dataclass(frozen=True)
class Vocabulary:
    """Token ids: colours ``0..num_colours-1``, then PAD, EOS and MASK."""

    num_colours: int = NUM_COLOURS

    @property
    def pad_id(self) -> int:
        return self.num_colours

    @property
    def eos_id(self) -> int:
        return self.num_colours + 1

    @property
    def mask_id(self) -> int:
        return self.num_colours + 2

    @property
    def size(self) -> int:
        return self.num_colours + 3


VOCAB = Vocabulary()
