"""An item's codes as a token sequence for a prior, in one fixed order over small vocabularies.

Order of one item's tokens:

- pooled codes ``[N]`` / ``[N, S]``: slot by slot; a slot's ``S`` indices (residual stages,
  groups) next to each other; each index as its ``G`` parts (below).
- spatial codes ``[rows, cols]`` / ``[rows, cols, S]``: the code map's height, then its width,
  then the positions in raster order (each position's ``S`` indices, each as ``G`` parts), then
  one end token, so a variable-size grid's size is part of what the prior models.

An index whose codebook exceeds ``2**16`` values (FSQ ``8**8``, a Gumbel product of ``2**48``) is
written as ``G`` parts along the quantizer's own factors (``Quantizer.index_factors``: FSQ
channels, LFQ bits, Gumbel digits): consecutive factors are grouped, as few groups as fit and
then as even as possible, so each part has at most ``2**16`` values and the split loses nothing.

The vocabulary is one flat range of ids in which each field (height, width, each part, end) has
its own sub-range. Given the tokens before it, exactly one field is allowed at every position
(:meth:`CodeLayout.allowed`), so a prior masks the rest: under uniform logits its code length is
exactly the code string's capacity (:meth:`CodeLayout.capacity_bits`), and forced tokens (the end
token, the padding after it) cost nothing.

Each code token also has 2D coordinates (:meth:`CodeLayout.coordinates`), ``(row + 1, col + 1,
part + 1)``, 0 for the tokens that are not codes, so a prior can tell where in a variable-width
code map a token sits without counting positions. They depend only on the size tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_PART_VALUES = 2**16


def _refine(factors: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Factors with a radix over ``limit`` split into base-``limit`` digits (lossless; only a
    codebook that is not a product needs it)."""
    refined = []
    for radix, weight in factors:
        while radix > limit:
            refined.append((limit, weight))
            radix, weight = -(-radix // limit), weight * limit
        refined.append((radix, weight))
    return refined


def _group(radices: list[int], limit: int) -> list[list[int]]:
    """Contiguous groups of factor positions: the fewest groups whose value counts are all at
    most ``limit``, and among those the one with the smallest largest group."""
    count = len(radices)
    logs = [math.log(r) for r in radices]
    for groups in range(1, count + 1):
        # best[i][g]: (largest log-size, split points) over the first i factors in g groups
        best = {(0, 0): (0.0, [])}
        for i in range(1, count + 1):
            for g in range(1, groups + 1):
                options = [
                    (max(best[(j, g - 1)][0], sum(logs[j:i])), best[(j, g - 1)][1] + [j])
                    for j in range(i)
                    if (j, g - 1) in best and math.prod(radices[j:i]) <= limit
                ]
                if options:
                    best[(i, g)] = min(options, key=lambda option: option[0])
        if (count, groups) in best:
            starts = best[(count, groups)][1] + [count]
            return [list(range(starts[k], starts[k + 1])) for k in range(groups)]
    raise ValueError(f"a factor of {max(radices)} values exceeds the part limit {limit}")


class IndexSplit:
    """Code indices <-> ``G`` parts of at most ``limit`` values each, along the index's factors.

    ``factors``: ``(radix, weight)`` pairs, ``index = sum(digit * weight)`` (what
    ``Quantizer.index_factors`` returns). Part ``g`` is the mixed-radix number of its group's
    digits, the group's first factor least significant.
    """

    def __init__(self, factors: list[tuple[int, int]], limit: int = MAX_PART_VALUES):
        self.limit = int(limit)
        factors = _refine([(int(r), int(w)) for r, w in factors], limit)
        self.radices = np.array([r for r, _ in factors], dtype=np.int64)  # [F]
        self.weights = np.array([w for _, w in factors], dtype=np.int64)  # [F]
        self.groups = _group(self.radices.tolist(), limit)
        self.part_sizes = [int(math.prod(self.radices[g].tolist())) for g in self.groups]
        # a digit's place value inside its part
        self.local_weights = np.ones_like(self.radices)
        for group in self.groups:
            self.local_weights[group] = np.cumprod([1] + self.radices[group[:-1]].tolist())

    @classmethod
    def for_quantizer(cls, quantizer, limit: int = MAX_PART_VALUES) -> IndexSplit:
        return cls(quantizer.index_factors, limit)

    @property
    def num_parts(self) -> int:
        return len(self.groups)

    def split(self, indices: np.ndarray) -> np.ndarray:
        """indices [...] -> parts [..., G]."""
        indices = np.asarray(indices, dtype=np.int64)
        digits = (indices[..., None] // self.weights) % self.radices  # [..., F]
        weighted = digits * self.local_weights
        return np.stack([weighted[..., group].sum(-1) for group in self.groups], axis=-1)

    def join(self, parts: np.ndarray) -> np.ndarray:
        """parts [..., G] -> indices [...]."""
        parts = np.asarray(parts, dtype=np.int64)
        indices = np.zeros(parts.shape[:-1], dtype=np.int64)
        for part, group in enumerate(self.groups):
            for factor in group:
                digit = (parts[..., part] // self.local_weights[factor]) % self.radices[factor]
                indices += digit * self.weights[factor]
        return indices


class CodeLayout:
    """Base of the layouts: items' codes <-> token rows, and the field allowed at each position."""

    vocab_size: int
    max_length: int

    def tokens(self, codes: np.ndarray) -> np.ndarray:
        """One item's codes -> its tokens [T]."""
        raise NotImplementedError

    def codes(self, tokens: np.ndarray) -> np.ndarray:
        """One item's tokens [T] (padding after the end allowed) -> its codes."""
        raise NotImplementedError

    def allowed(self, prefix: torch.Tensor, positions: torch.Tensor):
        """The ids allowed at ``positions`` [T] given ``prefix`` [B, P] (the tokens before, at
        least those the rule reads): ``low, high`` [B, T], allowed ``low <= id < high``."""
        raise NotImplementedError

    coordinate_sizes: tuple[int, int, int]
    """How many values each coordinate of :meth:`coordinates` takes (0 included)."""

    def coordinates(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``(row + 1, col + 1, part + 1)`` of the code token at each of ``positions`` [T] of the
        items that the rows of ``tokens`` [B, P] begin (at least the tokens the rule reads), 0
        for the positions that hold no code -> [B, T, 3] long. ``part`` is the token's index
        among its position's (slot's) ``levels * G`` tokens."""
        raise NotImplementedError

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Real tokens (through the end token) of the items that each row of ``tokens`` [B, P]
        begins, as far as the row tells -> [B]."""
        raise NotImplementedError

    def complete(self, prefix: torch.Tensor) -> torch.Tensor:
        """Whether each row of ``prefix`` [B, P] already holds a whole item -> [B] bool."""
        return self.lengths(prefix) <= prefix.shape[1]

    def batch(self, codes: list) -> torch.Tensor:
        """Items' codes -> tokens [B, T], rows padded to the longest with forced tokens."""
        return self.pad([self.tokens(item) for item in codes])

    def pad(self, rows: list) -> torch.Tensor:
        """Token rows -> [B, T], padded to the longest with forced tokens."""
        rows = [np.asarray(row) for row in rows]
        width = max(len(row) for row in rows)
        out = np.stack([np.pad(r, (0, width - len(r)), constant_values=self.pad_id) for r in rows])
        return torch.as_tensor(out, dtype=torch.long)

    pad_id: int = 0

    def capacity_bits(self, tokens: torch.Tensor) -> torch.Tensor:
        """log2 of the number of token strings the layout allows, per row [B]: the code string's
        capacity (spatial: plus the size fields), what a prior with uniform logits spends."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        low, high = self.allowed(tokens, positions)
        real = positions < self.lengths(tokens)[:, None]
        return ((high - low).double().log2() * real).sum(-1)


class PooledLayout(CodeLayout):
    """``num_slots`` slots of ``levels`` indices each, every index as ``split.num_parts`` parts:
    fixed length ``num_slots * levels * G``; part ``g`` has ids ``offset_g + value``.

    Coordinates: ``(slot + 1, 0, part + 1)``, ``part < levels * G`` (a slot is a row of its own;
    there is no column, so that coordinate is always 0), 0 past ``max_length``."""

    def __init__(self, num_slots: int, split: IndexSplit, levels: int = 1):
        self.num_slots, self.levels, self.split = num_slots, levels, split
        sizes = split.part_sizes
        self.offsets = np.cumsum([0] + sizes[:-1]).tolist()
        self.vocab_size = int(sum(sizes))
        self.per_position = levels * split.num_parts
        self.max_length = num_slots * self.per_position
        self.coordinate_sizes = (num_slots + 1, 1, self.per_position + 1)
        low = torch.tensor(self.offsets * (num_slots * levels))
        self._low, self._high = low, low + torch.tensor(sizes * (num_slots * levels))

    def tokens(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64).reshape(self.num_slots, self.levels)
        return (self.split.split(codes) + np.array(self.offsets)).reshape(-1)  # [N * S * G]

    def codes(self, tokens: np.ndarray) -> np.ndarray:
        parts = np.asarray(tokens, dtype=np.int64)[: self.max_length]
        parts = parts.reshape(self.num_slots, self.levels, -1) - np.array(self.offsets)
        codes = self.split.join(parts)  # [N, S]
        return codes[:, 0] if self.levels == 1 else codes

    def allowed(self, prefix: torch.Tensor, positions: torch.Tensor):
        positions = positions.clamp_max(self.max_length - 1).cpu()
        shape = (prefix.shape[0], len(positions))
        low = self._low[positions].to(prefix.device).expand(shape)
        return low, self._high[positions].to(prefix.device).expand(shape)

    def coordinates(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.to(tokens.device).long()  # [T]
        real = (positions >= 0) & (positions < self.max_length)
        slot = positions.div(self.per_position, rounding_mode="floor") + 1
        part = positions % self.per_position + 1
        coords = torch.stack([slot, torch.zeros_like(slot), part], -1) * real[:, None]  # [T, 3]
        return coords.expand(tokens.shape[0], -1, -1)

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.full((tokens.shape[0],), self.max_length, device=tokens.device)


class SpatialLayout(CodeLayout):
    """A code map of at most ``max_rows x max_cols`` positions: ids ``[0, max_rows)`` the height
    minus one, then ``max_cols`` ids for the width minus one, then the parts' ranges, then the
    end id (also the padding).

    Coordinates: ``(row + 1, col + 1, part + 1)`` of a code token, from its raster index and the
    width (token 1); ``part < levels * G`` is its index among its position's tokens. The size
    tokens, the end token and the padding get 0."""

    def __init__(self, max_rows: int, max_cols: int, split: IndexSplit, levels: int = 1):
        self.max_rows, self.max_cols, self.levels, self.split = max_rows, max_cols, levels, split
        sizes = split.part_sizes
        self.offsets = (max_rows + max_cols + np.cumsum([0] + sizes[:-1])).tolist()
        self.end_id = int(max_rows + max_cols + sum(sizes))
        self.pad_id = self.end_id
        self.vocab_size = self.end_id + 1
        self.per_position = levels * split.num_parts
        self.max_length = 3 + max_rows * max_cols * self.per_position
        self.coordinate_sizes = (max_rows + 1, max_cols + 1, self.per_position + 1)
        self._part_low = torch.tensor(self.offsets)
        self._part_high = self._part_low + torch.tensor(sizes)

    def tokens(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        rows, cols = codes.shape[:2]
        if not (1 <= rows <= self.max_rows and 1 <= cols <= self.max_cols):
            raise ValueError(
                f"a {rows} x {cols} code map does not fit this layout's "
                f"{self.max_rows} x {self.max_cols}"
            )
        parts = self.split.split(codes.reshape(rows * cols, self.levels)) + np.array(self.offsets)
        size = [rows - 1, self.max_rows + cols - 1]
        return np.concatenate([size, parts.reshape(-1), [self.end_id]])

    def codes(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        rows, cols = int(tokens[0]) + 1, int(tokens[1]) - self.max_rows + 1
        count = rows * cols * self.per_position
        parts = tokens[2 : 2 + count].reshape(rows * cols, self.levels, -1) - np.array(self.offsets)
        codes = self.split.join(parts).reshape(rows, cols, self.levels)
        return codes[..., 0] if self.levels == 1 else codes

    def _code_tokens(self, prefix: torch.Tensor) -> torch.Tensor:
        """Part tokens of each row [B] from its size tokens (0 before they are known)."""
        if prefix.shape[1] < 2:
            return torch.zeros(prefix.shape[0], dtype=torch.long, device=prefix.device)
        rows = (prefix[:, 0] + 1).clamp(1, self.max_rows)
        cols = (prefix[:, 1] - self.max_rows + 1).clamp(1, self.max_cols)
        return rows * cols * self.per_position

    def allowed(self, prefix: torch.Tensor, positions: torch.Tensor):
        if int(positions.max()) >= 2 and prefix.shape[1] < 2:
            raise ValueError("the fields after the size need the two size tokens in the prefix")
        device = prefix.device
        positions = positions.to(device)[None]  # [1, T]
        count = self._code_tokens(prefix)[:, None]  # [B, 1]
        part = ((positions - 2) % self.split.num_parts).clamp_min(0)
        low = self._part_low.to(device)[part]
        high = self._part_high.to(device)[part]
        is_code = (positions >= 2) & (positions < 2 + count)  # [B, T]
        end = torch.full_like(low, self.end_id)
        low = torch.where(is_code, low, end)
        high = torch.where(is_code, high, end + 1)
        low = torch.where(positions == 1, self.max_rows, torch.where(positions == 0, 0, low))
        high = torch.where(
            positions == 1,
            self.max_rows + self.max_cols,
            torch.where(positions == 0, self.max_rows, high),
        )
        return low.expand(prefix.shape[0], -1), high.expand(prefix.shape[0], -1)

    def coordinates(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        device = tokens.device
        positions = positions.to(device).long()[None]  # [1, T]
        if tokens.shape[1] < 2:
            if positions.numel() and int(positions.max()) >= 2:
                raise ValueError("the coordinates after the size need the two size tokens")
            return torch.zeros(
                tokens.shape[0], positions.shape[1], 3, dtype=torch.long, device=device
            )
        count = self._code_tokens(tokens)[:, None]  # [B, 1]
        cols = (tokens[:, 1:2] - self.max_rows + 1).clamp(1, self.max_cols)  # [B, 1]
        index = (positions - 2).clamp_min(0)  # raster index of the token among the code tokens
        cell = index.div(self.per_position, rounding_mode="floor")  # [1, T]
        row, col = cell.div(cols, rounding_mode="floor"), cell % cols  # [B, T]
        part = (index % self.per_position).expand_as(row)
        is_code = (positions >= 2) & (positions < 2 + count)  # [B, T]
        return torch.stack([row + 1, col + 1, part + 1], -1) * is_code[..., None]

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Through the end token (a prefix without both size tokens: 3, the least)."""
        return 3 + self._code_tokens(tokens)


def layout_spec(layout: CodeLayout) -> dict:
    """A layout as plain values (saved in a prior's checkpoint), rebuilt by :func:`layout_from_spec`."""
    split = layout.split
    factors = [[int(r), int(w)] for r, w in zip(split.radices, split.weights, strict=True)]
    if isinstance(layout, SpatialLayout):
        return {
            "kind": "spatial",
            "max_rows": layout.max_rows,
            "max_cols": layout.max_cols,
            "levels": layout.levels,
            "factors": factors,
            "part_values": layout.split.limit,
        }
    return {
        "kind": "pooled",
        "num_slots": layout.num_slots,
        "levels": layout.levels,
        "factors": factors,
        "part_values": layout.split.limit,
    }


def layout_from_spec(spec: dict) -> CodeLayout:
    """The layout :func:`layout_spec` describes; a ValueError names a damaged description."""
    try:
        limit = int(spec.get("part_values", MAX_PART_VALUES))
        split = IndexSplit([tuple(pair) for pair in spec["factors"]], limit)
        if spec["kind"] == "spatial":
            return SpatialLayout(
                int(spec["max_rows"]), int(spec["max_cols"]), split, spec["levels"]
            )
        if spec["kind"] == "pooled":
            return PooledLayout(int(spec["num_slots"]), split, int(spec["levels"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"a code layout description lacks or mistypes {error}") from None
    raise ValueError(f"unknown code layout kind {spec.get('kind')!r}; expected spatial or pooled")
