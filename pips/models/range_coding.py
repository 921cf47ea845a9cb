"""Token strings to bits and back with a prior: ``constriction``'s range coder (a queue: decoded
in the order encoded), one categorical model per token from the prior's next-token distribution.

Encoder and decoder walk the same :class:`~pips.models.prior.Decoding` (batch 1, KV cache) and feed
it the same tokens, so they compute bit-identical probabilities, the condition of an exact round
trip. Each token is coded within the one field its layout allows there (so no probability is
spent on ids that cannot occur); forced tokens (a field of one id: the end token) cost nothing and
are not coded at all. The coder's length tracks ``-log2 p`` of the prior up to the range coder's
fixed-point precision and its final word.

The second part of the two-part code, the item given its codes, goes into the same queue:
:func:`encode_grid` / :func:`decode_grid` (a :class:`~pips.models.grid_dvae.GridDVAE`) and
:func:`encode_sequence` / :func:`decode_sequence` (a
:class:`~pips.models.sequence_ae.SequenceAutoencoder`) append to / read from a
``constriction.stream.queue.RangeEncoder`` / ``RangeDecoder``, as :func:`encode_codes` /
:func:`decode_codes` do for the prior part, so one stream holds the prior part then the decoder
parts, or the two interleaved item by item: a queue is read back in the order it was written.
The models give the distributions (``decoder_distribution``: one item at a time, eval mode, no
grad, float64 log-softmax), the same ones their ``decoder_bits`` charge, so sender and receiver
code with bit-identical probabilities, and each encoder returns the model's ``-sum log2 p`` of what
it coded, that item's ``decoder_bits``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import constriction
import numpy as np
import torch

from pips.models.prior import CodePrior

if TYPE_CHECKING:
    from constriction.stream.queue import RangeDecoder, RangeEncoder

    from pips.models.grid_dvae import GridDVAE
    from pips.models.sequence_ae import SequenceAutoencoder

# one categorical per symbol, its probabilities given with each batch of symbols
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


def _field(decoding) -> tuple[int, np.ndarray]:
    """The allowed field's first id and its probabilities (float64) at the next position."""
    logits = decoding.next_logits()[0]  # [V], -inf outside the field
    allowed = torch.isfinite(logits).nonzero()[:, 0]
    low, high = int(allowed[0]), int(allowed[-1]) + 1
    probs = torch.softmax(logits[low:high].double(), dim=-1).numpy()
    return low, probs


@torch.no_grad()
def encode_codes(encoder: RangeEncoder, prior: CodePrior, tokens, condition=None) -> float:
    """Append one item's code tokens [T] (padding after its end ignored) to ``encoder`` under
    the prior; returns the model's bits of it, ``-sum log2 p``. Sets ``prior`` to eval mode."""
    prior.eval()
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    length = int(prior.layout.lengths(tokens[None])[0])
    decoding, model_bits = prior.start(1, length, condition), 0.0
    for position in range(length):
        low, probs = _field(decoding)
        symbol = int(tokens[position]) - low
        if not 0 <= symbol < len(probs):
            raise ValueError(
                f"token {int(tokens[position])} at position {position} is not allowed there"
            )
        if len(probs) > 1:
            model = constriction.stream.model.Categorical(probs, perfect=False)
            encoder.encode(symbol, model)
            model_bits -= float(np.log2(probs[symbol]))
        decoding.push(tokens[position : position + 1])
    return model_bits


@torch.no_grad()
def decode_codes(decoder: RangeDecoder, prior: CodePrior, condition=None) -> torch.Tensor:
    """Read one item's code tokens written by :func:`encode_codes` from ``decoder``: [T], the
    tokens it took (up to its end). Sets ``prior`` to eval mode."""
    prior.eval()
    decoding = prior.start(1, prior.layout.max_length, condition)
    while decoding.position < decoding.length and not decoding.complete():
        low, probs = _field(decoding)
        symbol = 0
        if len(probs) > 1:
            symbol = decoder.decode(constriction.stream.model.Categorical(probs, perfect=False))
        decoding.push(torch.tensor([low + int(symbol)]))
    return decoding.seen[0].clone()


def compress(prior: CodePrior, items: list, condition=None) -> tuple[np.ndarray, float]:
    """Items' tokens (rows [T], padding after each end ignored) -> one stream of range-coder
    words (uint32) and the model's code length of them all in bits, ``-sum log2 p`` under the
    probabilities coded. One stream for many items (a task file's grids) spends the coder's
    final word once."""
    encoder = constriction.stream.queue.RangeEncoder()
    model_bits = sum(encode_codes(encoder, prior, item, condition) for item in items)
    return encoder.get_compressed(), float(model_bits)


def decompress(prior: CodePrior, compressed: np.ndarray, count: int, condition=None) -> list:
    """A stream of :func:`compress` and its item count -> the items' tokens, each [T], exactly
    those it took."""
    decoder = constriction.stream.queue.RangeDecoder(np.asarray(compressed, dtype=np.uint32))
    return [decode_codes(decoder, prior, condition) for _ in range(count)]


# ------------------------------------------------------------------- the decoder part


def _encode_symbols(encoder: RangeEncoder, symbols: np.ndarray, log_probs: np.ndarray) -> float:
    """Code ``symbols`` [K], symbol k under ``exp(log_probs[k])`` (float64 [K, V]); returns
    ``-sum log2 p`` of them."""
    if len(symbols) == 0:
        return 0.0
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    encoder.encode(symbols, _CATEGORICAL, np.ascontiguousarray(np.exp(log_probs)))
    return -float(log_probs[np.arange(len(symbols)), symbols].sum()) / math.log(2.0)


def _decode_symbols(decoder: RangeDecoder, log_probs: np.ndarray) -> np.ndarray:
    """The ``len(log_probs)`` symbols :func:`_encode_symbols` coded under ``log_probs``."""
    if len(log_probs) == 0:
        return np.zeros(0, dtype=np.int64)
    probs = np.ascontiguousarray(np.exp(log_probs))
    return np.asarray(decoder.decode(_CATEGORICAL, probs), dtype=np.int64)


def encode_grid(encoder: RangeEncoder, model: GridDVAE, grid, codes) -> float:
    """Append ``grid`` [H, W] given its ``codes`` (as ``model.encode_grids`` gives them) to
    ``encoder``: with size heads the height and width first (their heads' distributions), then
    the charged cells of the canvas (row-major) at their true-canvas tokens; with
    ``size_from=cells`` every cell of the code map's canvas. Returns the model's bits coded,
    ``-sum log2 p``: ``model.decoder_bits([grid], [codes])[0]`` up to float rounding."""
    grid = model._check_grid(grid, "grid")
    bits, size = 0.0, None
    if not model.sizes_from_cells:
        heads = model.decoder_distribution(codes)
        size = grid.shape
        bits += _encode_symbols(encoder, np.array(size) - 1, np.stack([heads.height, heads.width]))
    coding = model.decoder_distribution(codes, size)
    charged = np.flatnonzero(coding.charged)
    canvas = model.true_canvas([grid], coding.charged.shape)[0].numpy()
    cells = coding.cells.reshape(len(coding.charged.reshape(-1)), -1)
    return bits + _encode_symbols(encoder, canvas.reshape(-1)[charged], cells[charged])


def decode_grid(decoder: RangeDecoder, model: GridDVAE, codes) -> np.ndarray:
    """Read the grid :func:`encode_grid` coded for ``codes`` from ``decoder``: the size (size
    heads), then the charged cells; the uncoded cells are PAD and the grid is the canvas cropped
    to the decoded size or, with ``size_from=cells``, to the model's own size rule."""
    size = None
    if not model.sizes_from_cells:
        heads = model.decoder_distribution(codes)
        height, width = _decode_symbols(decoder, np.stack([heads.height, heads.width])) + 1
        size = (int(height), int(width))
    coding = model.decoder_distribution(codes, size)
    charged = np.flatnonzero(coding.charged)
    cells = coding.cells.reshape(len(coding.charged.reshape(-1)), -1)
    canvas = np.full(coding.charged.size, model.vocab.pad_id, dtype=np.int64)
    canvas[charged] = _decode_symbols(decoder, cells[charged])
    return model.grid_from_canvas(canvas.reshape(coding.charged.shape), size)


def encode_sequence(encoder: RangeEncoder, model: SequenceAutoencoder, tokens, indices) -> float:
    """Append one sequence's ``tokens`` [T] given its code ``indices`` [N] (or [N, levels]) to
    ``encoder``, every token under the decoder's distribution at its position; the length ``T``
    is not coded (the receiver is given it). Returns ``-sum log2 p``:
    ``model.decoder_bits(tokens[None], indices[None])[0]`` up to float rounding."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 1:
        raise ValueError(f"one sequence's tokens are [T]; got {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.vocab_size):
        raise ValueError(f"tokens must lie in 0..{model.vocab_size - 1}")
    log_probs = model.decoder_distribution(indices, tokens.shape[0])
    return _encode_symbols(encoder, tokens.cpu().numpy(), log_probs)


def decode_sequence(
    decoder: RangeDecoder, model: SequenceAutoencoder, indices, length: int
) -> torch.Tensor:
    """Read the ``length`` tokens :func:`encode_sequence` coded for ``indices``: [T] long."""
    log_probs = model.decoder_distribution(indices, length)
    return torch.from_numpy(_decode_symbols(decoder, log_probs))
