"""General-purpose compressors as baselines for a learned prior's code length, on the same items.

Three numbers per item, in bits (:func:`compressor_baselines`):

- ``zlib_bits``: zlib level 9 on each item alone (what a per-item codec with no shared model
  spends; the 2-byte header and 4-byte Adler-32 trailer included, as ``8 * len(zlib.compress)``).
- ``xz_bits``: xz (LZMA2, preset ``9 | PRESET_EXTREME``, ``xz -9e``) over the whole set at once,
  divided by the item count: a compressor that learns across items, as a prior does. The items
  are joined by :data:`XZ_SEPARATOR` so the stream decodes back into exactly the items
  (:func:`xz_items`); the ``.xz`` container's header, index and CRC-64 are included.
- ``order0_bits``: each item's empirical order-0 entropy times its length. Not a code: the
  histogram it is measured under is not charged for, so it is an optimistic reference, not a
  compressed size.

ARC grids are measured as text (:func:`arc_text`): one line of digits per row, rows joined by
``"\\n"``, no trailing newline; a grid's order-0 symbols are the bytes of that text, digits and
row ends (:func:`arc_baselines`).
"""

from __future__ import annotations

import lzma
import zlib

import numpy as np

XZ_SEPARATOR = b"\n\n"
"""Between consecutive items in the xz stream (not after the last: the stream's end is known).
ARC text never holds an empty line, so splitting the decompressed stream on it gives the items
back; :func:`xz_compress` refuses items for which it would not."""

XZ_PRESET = 9 | lzma.PRESET_EXTREME


def arc_text(grid: np.ndarray) -> bytes:
    """An ARC grid [H, W] (colours 0-9) as text: one row of digits per line, joined by ``"\\n"``,
    no trailing newline."""
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.size == 0 or grid.min() < 0 or grid.max() > 9:
        raise ValueError(f"an ARC grid is a non-empty 2D array of digits 0-9; got {grid.shape}")
    return b"\n".join(bytes((grid_row + ord("0")).astype(np.uint8)) for grid_row in grid)


def text_symbols(data: bytes) -> np.ndarray:
    """An item's bytes as a symbol sequence [len(data)] for :func:`order0_bits`."""
    return np.frombuffer(data, dtype=np.uint8)


def zlib_bits(data: bytes) -> float:
    """zlib level 9 compressed size of ``data`` in bits (``8 * len(zlib.compress(data, 9))``)."""
    return float(8 * len(zlib.compress(data, 9)))


def xz_compress(items: list[bytes], separator: bytes = XZ_SEPARATOR) -> bytes:
    """The xz stream (preset ``9 | PRESET_EXTREME``) of the items joined by ``separator``.

    Raises ``ValueError`` if splitting the joined bytes on ``separator`` would not give the items
    back (an item holding the separator, or one ending in a newline before the next), so the
    stream always decodes into exactly the items (:func:`xz_items`)."""
    items = [bytes(item) for item in items]
    joined = separator.join(items)
    if not separator:  # items of one length frame themselves
        if len({len(item) for item in items}) > 1:
            raise ValueError("items of different lengths need a separator to be framed")
    elif joined.split(separator) != items:
        raise ValueError(
            f"the items cannot be framed by {separator!r}: splitting the joined items on it does "
            "not give them back (an item holds it, or ends with part of it)"
        )
    return lzma.compress(joined, preset=XZ_PRESET)


def xz_items(stream: bytes, separator: bytes = XZ_SEPARATOR, length: int = 0) -> list[bytes]:
    """The items back from an :func:`xz_compress` stream (``separator=b""``: items of one
    length; give ``length``)."""
    data = lzma.decompress(stream)
    if not separator:
        if not length:
            raise ValueError("items framed by their length need the length")
        return [data[i : i + length] for i in range(0, len(data), length)]
    return data.split(separator)


def xz_bits(items: list[bytes], separator: bytes = XZ_SEPARATOR) -> float:
    """Size in bits of one xz stream holding every item, separators included (not per item)."""
    return float(8 * len(xz_compress(items, separator)))


def order0_bits(symbols: np.ndarray) -> float:
    """The sequence's empirical order-0 entropy times its length: ``sum over the symbols of
    -log2(count(symbol) / n)``. The histogram itself (which symbols, how often) is not charged
    for, so no decodable code is this short; a constant sequence costs 0 bits."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    return float((counts * np.log2(symbols.size / counts)).sum())


def compressor_baselines(
    items: list[bytes], symbols: list[np.ndarray], separator: bytes = XZ_SEPARATOR
) -> dict[str, float]:
    """Mean bits per item of the three baselines on the same items: ``zlib_bits`` (each item
    alone), ``xz_bits`` (one stream over the whole set, :data:`XZ_SEPARATOR` between items,
    divided by the item count) and ``order0_bits`` (each item's ``symbols`` under its own
    histogram). Items of one length (sequences) need no separator: ``separator=b""``. For ARC, ``items`` are :func:`arc_text` and ``symbols`` the bytes of that text
    (digits and row ends; :func:`arc_baselines` does both)."""
    if not items or len(items) != len(symbols):
        raise ValueError(
            f"give one symbol sequence per item and at least one item; got {len(items)} items "
            f"and {len(symbols)} symbol sequences"
        )
    count = len(items)
    return {
        "zlib_bits": sum(zlib_bits(item) for item in items) / count,
        "xz_bits": xz_bits(items, separator) / count,
        "order0_bits": sum(order0_bits(s) for s in symbols) / count,
    }


def arc_baselines(grids: list[np.ndarray]) -> dict[str, float]:
    """:func:`compressor_baselines` of ARC grids as text, symbols the text's bytes."""
    texts = [arc_text(grid) for grid in grids]
    return compressor_baselines(texts, [text_symbols(text) for text in texts])
