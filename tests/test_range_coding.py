"""The decoder part of the two-part code as a real bit string: ``encode_grid`` / ``decode_grid``
and ``encode_sequence`` / ``decode_sequence`` on constriction's range-coder queue, alone and in
one stream with the prior part (``encode_codes`` / ``decode_codes``).

The receiver is a separately built copy of the model (same seed, so the same weights), left in
train mode, and is given only the codes (and, for sequences, the length) and the stream.
"""

from __future__ import annotations

import constriction
import numpy as np
import pytest
import torch

from pips.config import load_config
from pips.data import VOCAB
from pips.models.code_tokens import IndexSplit, PooledLayout
from pips.models.grid_dvae import GridDVAE
from pips.models.prior import CodePrior
from pips.models.range_coding import (
    compress,
    decode_codes,
    decode_grid,
    decode_sequence,
    encode_codes,
    encode_grid,
    encode_sequence,
)
from pips.models.sequence_ae import SequenceAutoencoder

torch.set_num_threads(1)

SMALL = [
    "model.width=32",
    "model.heads=2",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.quantizer.codebook_size=32",
    "model.quantizer.num_stages=2",
]
GRID_MODELS = {
    "spatial-cells": (
        ["model.layout=spatial", "model.size_from=cells", "loss.pad_weight=1.0"]
        + ["model.patch_size=2", "model.quantizer.kind=vq"],
        True,
    ),
    "spatial-heads-no-eos": (
        ["model.layout=spatial", "model.size_from=heads", "model.patch_size=3"],
        False,
    ),
    "pooled": (
        ["model.layout=pooled", "model.size_from=heads", "model.num_latents=4"]
        + ["model.quantizer.kind=rvq"],
        True,
    ),
}
SEQUENCE_MODELS = {
    "spatial": ["model.layout=spatial", "model.quantizer.kind=vq"],
    "pooled-regions-rvq": [
        "model.layout=pooled",
        "model.slots=regions",
        "model.quantizer.kind=rvq",
    ],
}


def _grid_model(name: str) -> GridDVAE:
    overrides, eos = GRID_MODELS[name]
    torch.manual_seed(0)
    return GridDVAE(load_config(overrides=[*SMALL, *overrides]).model, eos=eos).eval()


def _sequence_model(name: str) -> SequenceAutoencoder:
    torch.manual_seed(0)
    overrides = [*SMALL[:4], "model.patch_size=2", "model.num_latents=4"]
    overrides += ["model.quantizer.codebook_size=32", *SEQUENCE_MODELS[name]]
    config = load_config(overrides=overrides).model
    return SequenceAutoencoder(config, vocab_size=8, max_length=16).eval()


def _grids(seed: int = 0, count: int = 6) -> list[np.ndarray]:
    """Random grids of mixed sizes (1..7 per side), one 1 x 1 and one uniform."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(int(v) for v in rng.integers(1, 8, size=2)) for _ in range(count - 2)]
    grids = [rng.integers(0, VOCAB.num_colours, size=shape) for shape in shapes]
    return [*grids, np.zeros((1, 1), dtype=np.int64), np.full((3, 5), 7)]


def _sequences(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 8, (length,), generator=generator) for length in (1, 5, 12, 16)]


def _sequence_indices(model: SequenceAutoencoder, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(tokens[None]).quantizer.indices[0]


def _decoder(encoder) -> constriction.stream.queue.RangeDecoder:
    return constriction.stream.queue.RangeDecoder(encoder.get_compressed())


def _assert_length(encoder, model_bits: float) -> None:
    coded = 32 * len(encoder.get_compressed())
    assert abs(coded - model_bits) <= 0.01 * model_bits + 64, (coded, model_bits)


@pytest.mark.parametrize("name", list(GRID_MODELS))
def test_grid_stream_round_trips_from_the_codes_alone(name):
    sender, receiver = _grid_model(name), _grid_model(name).train()
    grids = _grids()
    codes = sender.encode_grids(grids)
    expected = sender.decoder_bits(grids, codes)
    encoder = constriction.stream.queue.RangeEncoder()
    coded = [encode_grid(encoder, sender, g, c) for g, c in zip(grids, codes, strict=True)]
    for grid, code, bits in zip(grids, codes, coded, strict=True):  # one grid at a time
        assert bits == pytest.approx(sender.decoder_bits([grid], [code])[0], rel=1e-12)
    np.testing.assert_allclose(coded, expected, rtol=1e-6)  # batched: float32 rounding apart
    _assert_length(encoder, float(np.sum(expected)))
    decoder = _decoder(encoder)
    for grid, code in zip(grids, codes, strict=True):
        received = decode_grid(decoder, receiver, code)
        assert received.dtype == np.int64
        np.testing.assert_array_equal(received, grid)
    assert receiver.training  # its mode is left as it was


@pytest.mark.parametrize("name", list(SEQUENCE_MODELS))
def test_sequence_stream_round_trips_from_the_codes_and_length(name):
    sender, receiver = _sequence_model(name), _sequence_model(name).train()
    sequences = _sequences()
    indices = [_sequence_indices(sender, tokens) for tokens in sequences]
    expected = [
        float(sender.decoder_bits(t[None], i[None])[0])
        for t, i in zip(sequences, indices, strict=True)
    ]
    encoder = constriction.stream.queue.RangeEncoder()
    coded = [
        encode_sequence(encoder, sender, t, i) for t, i in zip(sequences, indices, strict=True)
    ]
    np.testing.assert_allclose(coded, expected, rtol=1e-12)
    _assert_length(encoder, sum(expected))
    decoder = _decoder(encoder)
    for tokens, index in zip(sequences, indices, strict=True):
        received = decode_sequence(decoder, receiver, index.numpy(), len(tokens))
        assert received.dtype == torch.long
        assert torch.equal(received, tokens)
    assert receiver.training


def _prior() -> CodePrior:
    torch.manual_seed(0)
    layout = PooledLayout(num_slots=6, split=IndexSplit([(16, 1)]), levels=2)
    return CodePrior(layout, width=32, depth=2, heads=2).eval()


def test_one_stream_holds_the_prior_part_then_the_decoder_parts_or_both_interleaved():
    prior, grid_model, sequence_model = _prior(), _grid_model("pooled"), _sequence_model("spatial")
    rng = np.random.default_rng(0)
    items = [prior.layout.tokens(rng.integers(0, 16, size=(6, 2))) for _ in range(3)]
    grids = _grids(seed=1, count=3)
    codes = grid_model.encode_grids(grids)
    sequences = _sequences(seed=1)[1:]
    indices = [_sequence_indices(sequence_model, tokens) for tokens in sequences]
    _, expected = compress(prior, items)  # the prior part's bits, as one stream of its own
    expected += float(grid_model.decoder_bits(grids, codes).sum())
    for tokens, index in zip(sequences, indices, strict=True):
        expected += float(sequence_model.decoder_bits(tokens[None], index[None])[0])

    def encode(order):
        encoder, bits = constriction.stream.queue.RangeEncoder(), 0.0
        for kind, i in order:
            if kind == "prior":
                bits += encode_codes(encoder, prior, items[i])
            elif kind == "grid":
                bits += encode_grid(encoder, grid_model, grids[i], codes[i])
            else:
                bits += encode_sequence(encoder, sequence_model, sequences[i], indices[i])
        return encoder, bits

    def decode(decoder, order):  # the receiver: codes, a sequence's length, and the stream
        for kind, i in order:
            if kind == "prior":
                assert decode_codes(decoder, prior).tolist() == items[i].tolist()
            elif kind == "grid":
                np.testing.assert_array_equal(decode_grid(decoder, grid_model, codes[i]), grids[i])
            else:
                received = decode_sequence(decoder, sequence_model, indices[i], len(sequences[i]))
                assert torch.equal(received, sequences[i])

    in_parts = [(kind, i) for kind in ("prior", "grid", "sequence") for i in range(3)]
    interleaved = [(kind, i) for i in range(3) for kind in ("prior", "grid", "sequence")]
    for order in (in_parts, interleaved):
        encoder, bits = encode(order)
        assert bits == pytest.approx(expected, rel=1e-6)
        _assert_length(encoder, expected)
        decode(_decoder(encoder), order)


def test_decoder_distribution_contract_and_errors():
    model = _grid_model("pooled")
    grid = np.arange(6).reshape(2, 3)
    (codes,) = model.encode_grids([grid])
    heads = model.decoder_distribution(codes)
    assert heads.cells is None and heads.charged is None
    assert heads.height.shape == heads.width.shape == (30,)
    np.testing.assert_allclose(np.exp(heads.height).sum(), 1.0, rtol=1e-12)
    coding = model.decoder_distribution(codes, (2, 3))
    np.testing.assert_array_equal(coding.height, heads.height)  # one path whatever the size
    assert coding.cells.shape == (2, 4, VOCAB.size) and coding.charged.all()
    cells = _grid_model("spatial-cells")
    (cell_codes,) = cells.encode_grids([grid])
    coding = cells.decoder_distribution(cell_codes)
    assert coding.height is None and coding.charged.shape == coding.cells.shape[:2]
    heads_model = _grid_model("spatial-heads-no-eos")
    (small,) = heads_model.encode_grids([np.zeros((1, 1), dtype=np.int64)])
    encoder = constriction.stream.queue.RangeEncoder()
    with pytest.raises(ValueError, match="does not fit"):
        encode_grid(encoder, heads_model, np.zeros((5, 5), dtype=np.int64), small)
    with pytest.raises(ValueError, match="colours must lie"):
        encode_grid(encoder, model, grid + VOCAB.num_colours, codes)
