"""Compressor baselines: the sizes are the codecs' own, the xz stream decodes into the items."""

import lzma
import math
import zlib

import numpy as np
import pytest

from pips.data.compressors import (
    XZ_SEPARATOR,
    arc_baselines,
    arc_text,
    compressor_baselines,
    order0_bits,
    text_symbols,
    xz_bits,
    xz_compress,
    xz_items,
    zlib_bits,
)


def _grids() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 10, size=(h, w)) for h, w in [(1, 1), (3, 5), (30, 30), (7, 2)]]
    return grids + [np.zeros((4, 4), dtype=np.int64), grids[1]]  # a blank grid, a repeat


def test_arc_text_is_one_line_of_digits_per_row():
    assert arc_text(np.array([[0, 1, 2], [9, 8, 7]])) == b"012\n987"
    assert arc_text(np.array([[5]])) == b"5"
    with pytest.raises(ValueError):
        arc_text(np.array([[10]]))


def test_zlib_and_xz_sizes_are_the_codecs_own():
    texts = [arc_text(grid) for grid in _grids()]
    for text in texts:
        assert zlib_bits(text) == 8 * len(zlib.compress(text, 9))
    joined = b"\n\n".join(texts)
    expected = len(lzma.compress(joined, preset=9 | lzma.PRESET_EXTREME))
    assert xz_bits(texts) == 8 * expected


def test_the_xz_stream_decodes_into_exactly_the_items():
    texts = [arc_text(grid) for grid in _grids()]
    assert xz_items(xz_compress(texts)) == texts
    assert lzma.decompress(xz_compress(texts)).split(XZ_SEPARATOR) == texts
    for unframed in ([b"a\n\nb"], [b"a\n", b"b"], [b"a", b"\n\n"]):  # would not split back
        with pytest.raises(ValueError, match="framed"):
            xz_compress(unframed)


def test_order0_matches_a_hand_computed_case():
    entropy = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert order0_bits(text_symbols(b"aab")) == pytest.approx(3 * entropy)
    assert order0_bits(np.array([3, 1, 4, 1])) == pytest.approx(2 * 1 + 1 * 2 + 1 * 2)
    assert order0_bits(np.array([7] * 50)) == 0
    assert order0_bits(np.array([], dtype=np.int64)) == 0


def test_baselines_are_means_per_item():
    grids = _grids()
    texts = [arc_text(grid) for grid in grids]
    symbols = [text_symbols(text) for text in texts]
    baselines = compressor_baselines(texts, symbols)
    assert baselines == arc_baselines(grids)
    assert baselines["zlib_bits"] == pytest.approx(np.mean([zlib_bits(t) for t in texts]))
    assert baselines["xz_bits"] == pytest.approx(xz_bits(texts) / len(texts))
    assert baselines["order0_bits"] == pytest.approx(np.mean([order0_bits(s) for s in symbols]))
    # the text's symbols: digits and row ends (a 1 x 1 grid has no row end)
    assert set(np.concatenate(symbols).tolist()) <= set(b"0123456789\n")
    with pytest.raises(ValueError):
        compressor_baselines(texts, symbols[:-1])


def test_items_of_one_length_need_no_separator():
    import lzma

    from pips.data.compressors import xz_compress, xz_items

    items = [bytes([1, 10, 10, 2]), bytes([10, 10, 3, 4])]  # hold the default separator
    stream = xz_compress(items, b"")
    assert lzma.decompress(stream) == b"".join(items)
    assert xz_items(stream, b"", length=4) == items
    with pytest.raises(ValueError, match="different lengths"):
        xz_compress([b"ab", b"c"], b"")
