"""2D RoPE: attention scores depend only on the (row, col) offset, each axis on its own half."""

from __future__ import annotations

import pytest
import torch

from pips.nn.rope import Rope2D, apply_rope_2d

HEAD_DIM = 16


def _rotated(x: torch.Tensor, rope: Rope2D, row: int, col: int) -> torch.Tensor:
    """x [hd] placed at (row, col) -> rotated [hd]."""
    positions = torch.tensor([[[row, col]]], dtype=torch.long)  # [1, 1, 2]
    return apply_rope_2d(x.view(1, 1, 1, -1), rope(positions)).view(-1)


def _score(q, k, rope, q_pos, k_pos) -> torch.Tensor:
    return _rotated(q, rope, *q_pos) @ _rotated(k, rope, *k_pos)


def _half_scores(q, k, rope, q_pos, k_pos) -> tuple[torch.Tensor, torch.Tensor]:
    """The score split into its row half and its column half."""
    q, k = _rotated(q, rope, *q_pos), _rotated(k, rope, *k_pos)
    half = HEAD_DIM // 2
    return q[:half] @ k[:half], q[half:] @ k[half:]


@pytest.fixture
def vectors():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(HEAD_DIM, generator=generator, dtype=torch.float64).float()
    k = torch.randn(HEAD_DIM, generator=generator, dtype=torch.float64).float()
    return q, k


@pytest.fixture
def rope():
    return Rope2D(HEAD_DIM, base_row=100.0, base_col=30.0)


def test_rotation_preserves_the_norm(vectors, rope):
    q, _ = vectors
    assert _rotated(q, rope, 7, 19).norm() == pytest.approx(q.norm().item(), rel=1e-6)


def test_position_zero_is_the_identity(vectors, rope):
    q, _ = vectors
    torch.testing.assert_close(_rotated(q, rope, 0, 0), q)


@pytest.mark.parametrize("shift", [(1, 0), (0, 1), (5, 3), (29, 29), (-2, 7)])
def test_score_is_unchanged_when_both_positions_shift_together(vectors, rope, shift):
    q, k = vectors
    dr, dc = shift
    for q_pos, k_pos in [((0, 0), (0, 0)), ((2, 3), (5, 1)), ((0, 10), (12, 0))]:
        base = _score(q, k, rope, q_pos, k_pos)
        shifted = _score(q, k, rope, (q_pos[0] + dr, q_pos[1] + dc), (k_pos[0] + dr, k_pos[1] + dc))
        assert abs(float(base - shifted)) < 1e-5


@pytest.mark.parametrize("offset", [(1, 0), (0, 1), (3, -2)])
def test_score_changes_when_the_offset_changes(vectors, rope, offset):
    q, k = vectors
    base = _score(q, k, rope, (4, 4), (4, 4))
    moved = _score(q, k, rope, (4, 4), (4 + offset[0], 4 + offset[1]))
    assert abs(float(base - moved)) > 1e-3


def test_a_row_shift_changes_only_the_row_half(vectors, rope):
    q, k = vectors
    row_before, col_before = _half_scores(q, k, rope, (2, 3), (2, 3))
    row_after, col_after = _half_scores(q, k, rope, (2, 3), (6, 3))
    assert abs(float(col_after - col_before)) < 1e-5
    assert abs(float(row_after - row_before)) > 1e-3


def test_a_column_shift_changes_only_the_column_half(vectors, rope):
    q, k = vectors
    row_before, col_before = _half_scores(q, k, rope, (2, 3), (2, 3))
    row_after, col_after = _half_scores(q, k, rope, (2, 3), (2, 9))
    assert abs(float(row_after - row_before)) < 1e-5
    assert abs(float(col_after - col_before)) > 1e-3


def test_rows_and_columns_are_not_interchangeable(vectors, rope):
    q, k = vectors
    assert (
        abs(float(_score(q, k, rope, (0, 0), (3, 0)) - _score(q, k, rope, (0, 0), (0, 3)))) > 1e-3
    )


def test_batched_application_matches_one_position_at_a_time(rope):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, HEAD_DIM, generator=generator)  # [B, H, L, hd]
    positions = torch.randint(0, 30, (2, 5, 2), generator=generator)  # [B, L, 2]
    cos, sin = rope(positions)
    assert cos.shape == sin.shape == (2, 1, 5, HEAD_DIM // 2)
    batched = apply_rope_2d(x, (cos, sin))
    for b in range(2):
        for h in range(3):
            for i in range(5):
                row, col = positions[b, i].tolist()
                torch.testing.assert_close(batched[b, h, i], _rotated(x[b, h, i], rope, row, col))


@pytest.mark.parametrize("head_dim", [2, 6, 10, 18])
def test_head_dim_not_divisible_by_four_raises(head_dim):
    with pytest.raises(ValueError, match="divisible by 4"):
        Rope2D(head_dim)
