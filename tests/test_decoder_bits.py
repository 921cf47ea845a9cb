"""Decoder code lengths: ``GridDVAE.decoder_bits`` and ``SequenceAutoencoder.decoder_bits``.

Each is checked against a slow reference written here (one grid / sequence at a time, one cell at
a time, float64 log-sum-exp in Python), against uniform logits (exactly ``cells * log2(V)``), and,
for grids, as a real lossless code: a range coder driven by the same probabilities, whose receiver
holds only the codes, gets every grid back exactly, in about as many bits.
"""

from __future__ import annotations

import math

import constriction
import numpy as np
import pytest
import torch

from pips.config import load_config
from pips.data import MAX_GRID_SIZE, VOCAB, collate_grids
from pips.models.grid_dvae import GridDVAE, GridDVAEOutput, grid_positions
from pips.models.sequence_ae import SequenceAutoencoder

SMALL = [
    "model.width=32",
    "model.heads=2",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.quantizer.codebook_size=32",
    "model.quantizer.num_stages=2",
]
SPATIAL_CELLS = ["model.layout=spatial", "model.size_from=cells", "loss.pad_weight=1.0"]
SPATIAL_HEADS = ["model.layout=spatial", "model.size_from=heads"]
POOLED = ["model.layout=pooled", "model.size_from=heads", "model.num_latents=4"]

GRID_MODELS = {
    "spatial-cells": (SPATIAL_CELLS + ["model.patch_size=2", "model.quantizer.kind=vq"], True),
    "spatial-cells-no-eos": (SPATIAL_CELLS + ["model.patch_size=2"], False),
    "spatial-cells-p3-rvq": (
        SPATIAL_CELLS + ["model.patch_size=3", "model.quantizer.kind=rvq"],
        True,
    ),
    "spatial-heads": (SPATIAL_HEADS + ["model.patch_size=2"], True),
    "spatial-heads-no-eos": (SPATIAL_HEADS + ["model.patch_size=3"], False),
    "pooled": (POOLED + ["model.quantizer.kind=vq"], True),
    "pooled-regions-patches-rvq": (
        POOLED
        + [
            "model.slots=regions",
            "model.patch_tokens=true",
            "model.patch_size=2",
            "model.quantizer.kind=rvq",
        ],
        True,
    ),
    "pooled-no-eos": (POOLED, False),
}
LN2 = math.log(2.0)


def _grid_model(name: str, seed: int = 0) -> GridDVAE:
    overrides, eos = GRID_MODELS[name]
    torch.manual_seed(seed)
    return GridDVAE(load_config(overrides=[*SMALL, *overrides]).model, eos=eos).eval()


def _grids(seed: int = 0, count: int = 9) -> list[np.ndarray]:
    """Random grids of mixed sizes (1..7 per side), some sizes repeated, one 1 x 1."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(int(v) for v in rng.integers(1, 8, size=2)) for _ in range(count - 3)]
    shapes += [shapes[0], shapes[1], (1, 1)]
    return [rng.integers(0, VOCAB.num_colours, size=shape) for shape in shapes]


def _true_canvas(grid: np.ndarray, height: int, width: int, eos: bool) -> np.ndarray:
    """The training target on a height x width canvas, by hand: colours top-left, EOS closing
    each grid row (when ``eos``), PAD everywhere else."""
    canvas = np.full((height, width), VOCAB.pad_id, dtype=np.int64)
    rows, cols = grid.shape
    canvas[:rows, :cols] = grid
    if eos:
        canvas[:rows, cols] = VOCAB.eos_id
    return canvas


def _log_softmax(logits: list[float], index: int) -> float:
    """float64 log softmax of one logit vector at ``index``, in plain Python."""
    top = max(logits)
    return logits[index] - top - math.log(sum(math.exp(x - top) for x in logits))


# ---------------------------------------------------------------------- the receiver's view
# A receiver holds one grid's codes. These helpers compute, from the codes alone and one grid at
# a time, the probabilities it decodes with: the size heads (when used), then the cells.


def _code_tensor(model: GridDVAE, codes: np.ndarray) -> torch.Tensor:
    array = torch.as_tensor(np.asarray(codes)).long()
    if array.dim() == (3 if model.spatial else 2):  # [.., S] with S > 1
        return array.reshape(1, -1, array.shape[-1])
    return array.reshape(1, -1)


def _head_logits(model: GridDVAE, codes: np.ndarray):
    quantized = model.quantizer.codes_to_quantized(_code_tensor(model, codes))
    padding = torch.zeros(quantized.shape[:2], dtype=torch.bool)
    height, width = model.predict_shape(model.code_projection(quantized), padding)
    return height[0].double().tolist(), width[0].double().tolist()


def _cell_logits(model: GridDVAE, codes: np.ndarray, size: tuple[int, int]):
    """The [canvas_height, canvas_width, V] cell logits the receiver decodes on, and the cells
    it reads (row-major): spatial: the code map's canvas, every cell (size from the cells) or
    the rectangle and EOS column of ``size`` (size heads); pooled: the canvas of ``size``."""
    quantized = model.quantizer.codes_to_quantized(_code_tensor(model, codes))
    slots = quantized.shape[1]
    eos = int(model.eos)
    height, width = size
    if model.spatial:
        rows, cols = np.asarray(codes).shape[:2]
        p = model.output_patch
        canvas_height, canvas_width = rows * p, cols * p
        positions = grid_positions(rows, cols, quantized.device).unsqueeze(0)
        canvas_padding = torch.zeros(1, canvas_height * canvas_width, dtype=torch.bool)
    else:
        canvas_height, canvas_width = height, width + eos
        positions = torch.zeros(1, slots, 2, dtype=torch.long)
        canvas_padding = torch.zeros(1, canvas_height * canvas_width, dtype=torch.bool)
    logits, _, _ = model.decode(
        quantized,
        positions,
        torch.zeros(1, slots, dtype=torch.bool),
        canvas_height,
        canvas_width,
        canvas_padding,
    )
    logits = logits[0].double().view(canvas_height, canvas_width, -1)
    if model.spatial and model.sizes_from_cells:
        cells = [(r, c) for r in range(canvas_height) for c in range(canvas_width)]
    else:
        cells = [(r, c) for r in range(height) for c in range(width + eos)]
    return logits, cells


def _reference_bits(model: GridDVAE, grid: np.ndarray, codes: np.ndarray) -> float:
    height, width = grid.shape
    total = 0.0
    if not model.sizes_from_cells:
        height_logits, width_logits = _head_logits(model, codes)
        total -= _log_softmax(height_logits, height - 1) + _log_softmax(width_logits, width - 1)
    logits, cells = _cell_logits(model, codes, grid.shape)
    canvas = _true_canvas(grid, logits.shape[0], logits.shape[1], model.eos)
    for r, c in cells:
        total -= _log_softmax(logits[r, c].tolist(), int(canvas[r, c]))
    return total / LN2


def _grid_from_tokens(model: GridDVAE, tokens: np.ndarray, size) -> np.ndarray:
    """A receiver's grid from a decoded canvas of tokens [H, W]: the size by the model's own rule
    (``predict``, on logits whose argmax is each token) or the decoded head size, then crop."""
    canvas_height, canvas_width = tokens.shape
    if model.sizes_from_cells:
        logits = torch.nn.functional.one_hot(torch.as_tensor(tokens).view(1, -1), VOCAB.size)
        heads = torch.zeros(1, MAX_GRID_SIZE)
        covered = torch.ones(1, canvas_height * canvas_width, dtype=torch.bool)
        output = GridDVAEOutput(logits.float(), heads, heads, None, covered)
        _, sizes = model.predict(output, canvas_width)
        size = tuple(int(v) for v in sizes[0])
    height, width = size
    return tokens[:height, :width]


# ------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(GRID_MODELS))
def test_grid_decoder_bits_match_a_per_cell_reference(name):
    model = _grid_model(name)
    grids = _grids()
    codes = model.encode_grids(grids)
    bits = model.decoder_bits(grids, codes)
    assert bits.dtype == np.float64 and bits.shape == (len(grids),)
    assert (bits > 0).all()
    with torch.no_grad():
        expected = np.array(
            [_reference_bits(model, g, c) for g, c in zip(grids, codes, strict=True)]
        )
    np.testing.assert_allclose(bits, expected, rtol=1e-6)
    # batches of mixed sizes give the same lengths as batches of one
    np.testing.assert_allclose(model.decoder_bits(grids, codes, batch_size=4), bits, rtol=1e-6)


@pytest.mark.parametrize("name", list(GRID_MODELS))
def test_charged_canvas_gives_back_the_grid(name):
    """The true tokens charged, read by the model's size rule (or the true head size), are the
    grid: the code is lossless. In the cells rule's case the true canvas alone gives the size."""
    model = _grid_model(name)
    grids = _grids(seed=1)
    for grid, codes in zip(grids, model.encode_grids(grids), strict=True):
        height, width = grid.shape
        if model.spatial:
            rows, cols = np.asarray(codes).shape[:2]
            p = model.output_patch
            canvas_height, canvas_width = rows * p, cols * p
        else:
            canvas_height, canvas_width = height, width + int(model.eos)
        canvas = _true_canvas(grid, canvas_height, canvas_width, model.eos)
        # exactly the tokens the training batch puts there
        batch = collate_grids(
            [grid], eos=model.eos, canvas_size=(canvas_height, canvas_width - int(model.eos))
        )
        np.testing.assert_array_equal(batch.tokens.view(canvas_height, canvas_width), canvas)
        with torch.no_grad():
            _, cells = _cell_logits(model, codes, grid.shape)
        received = np.full_like(canvas, VOCAB.pad_id)
        for r, c in cells:  # the receiver knows only the charged cells
            received[r, c] = canvas[r, c]
        np.testing.assert_array_equal(_grid_from_tokens(model, received, grid.shape), grid)


@pytest.mark.parametrize("name", ["spatial-cells", "spatial-heads-no-eos", "pooled"])
def test_range_coder_round_trip(name):
    """A range coder on these probabilities: the receiver, holding only the codes and the bit
    stream, decodes the size (heads), then the cells, and gets every grid back exactly; the
    stream is about ``decoder_bits`` long."""
    model = _grid_model(name)
    grids = _grids(seed=2, count=5)
    codes = model.encode_grids(grids)
    bits = model.decoder_bits(grids, codes)
    categorical = constriction.stream.model.Categorical
    for grid, code, length in zip(grids, codes, bits, strict=True):
        encoder = constriction.stream.queue.RangeEncoder()
        with torch.no_grad():
            if not model.sizes_from_cells:
                for logits, value in zip(_head_logits(model, code), grid.shape, strict=True):
                    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).numpy()
                    encoder.encode(value - 1, categorical(probs, perfect=False))
            logits, cells = _cell_logits(model, code, grid.shape)
            canvas = _true_canvas(grid, logits.shape[0], logits.shape[1], model.eos)
            probs = torch.softmax(logits, dim=-1).numpy()
            for r, c in cells:
                encoder.encode(int(canvas[r, c]), categorical(probs[r, c], perfect=False))
            compressed = encoder.get_compressed()

            decoder = constriction.stream.queue.RangeDecoder(compressed)
            size = None
            if not model.sizes_from_cells:
                size = tuple(
                    int(decoder.decode(categorical(p, perfect=False))) + 1
                    for p in (
                        torch.softmax(torch.tensor(h, dtype=torch.float64), 0).numpy()
                        for h in _head_logits(model, code)
                    )
                )
                cell_size = size
            else:
                cell_size = (0, 0)  # unused: the spatial canvas comes from the code map
            logits, cells = _cell_logits(model, code, cell_size)
            probs = torch.softmax(logits, dim=-1).numpy()
            received = np.full(logits.shape[:2], VOCAB.pad_id, dtype=np.int64)
            for r, c in cells:
                received[r, c] = decoder.decode(categorical(probs[r, c], perfect=False))
        np.testing.assert_array_equal(_grid_from_tokens(model, received, size), grid)
        assert length <= 32 * len(compressed) <= length + 64


@pytest.mark.parametrize("name", list(GRID_MODELS))
def test_uniform_logits_cost_log2_v_per_cell(name):
    model = _grid_model(name)
    with torch.no_grad():
        for layer in (model.cell_head, model.shape_head[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
    grids = _grids(seed=3)
    codes = model.encode_grids(grids)
    eos, p = int(model.eos), model.output_patch
    expected = []
    for grid, code in zip(grids, codes, strict=True):
        height, width = grid.shape
        if model.sizes_from_cells:
            rows, cols = np.asarray(code).shape[:2]
            expected.append(rows * p * cols * p * math.log2(VOCAB.size))
        else:
            cells = height * (width + eos)
            expected.append(cells * math.log2(VOCAB.size) + 2 * math.log2(MAX_GRID_SIZE))
    np.testing.assert_allclose(model.decoder_bits(grids, codes), expected, rtol=1e-12)


def test_grid_decoder_bits_keeps_the_mode_and_checks_its_inputs():
    model = _grid_model("spatial-cells").train()
    grids = _grids(count=5)
    codes = model.encode_grids(grids)
    model.train()
    model.decoder_bits(grids, codes)
    assert model.training
    with pytest.raises(ValueError, match="grids but"):
        model.decoder_bits(grids, codes[:-1])
    small = np.zeros((1, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="does not fit"):
        model.decoder_bits([np.zeros((5, 5), dtype=np.int64)], model.encode_grids([small]))
    with pytest.raises(ValueError, match="colours must lie"):
        model.decoder_bits([small + VOCAB.num_colours], model.encode_grids([small]))


# ------------------------------------------------------------------------------- sequences

SEQUENCE_SMALL = [
    "model.width=32",
    "model.heads=2",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.patch_size=2",
    "model.num_latents=4",
    "model.quantizer.codebook_size=32",
]
SEQUENCE_MODELS = [
    ["model.layout=spatial", "model.quantizer.kind=vq"],
    ["model.layout=pooled", "model.slots=regions", "model.quantizer.kind=rvq"],
]


def _sequence_model(overrides) -> SequenceAutoencoder:
    torch.manual_seed(0)
    config = load_config(overrides=[*SEQUENCE_SMALL, *overrides]).model
    return SequenceAutoencoder(config, vocab_size=8, max_length=16).eval()


@pytest.mark.parametrize("overrides", SEQUENCE_MODELS)
def test_sequence_decoder_bits_match_a_per_token_reference(overrides):
    model = _sequence_model(overrides)
    tokens = torch.randint(0, 8, (3, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        indices = model.encode(tokens).quantizer.indices
        logits = model.decode_codes(indices, tokens.shape[1])
    bits = model.decoder_bits(tokens, indices)
    assert bits.dtype == torch.float64 and bits.shape == (3,) and (bits > 0).all()
    expected = [
        -sum(_log_softmax(logits[b, t].double().tolist(), int(tokens[b, t])) for t in range(15))
        / LN2
        for b in range(3)
    ]
    np.testing.assert_allclose(bits.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("overrides", SEQUENCE_MODELS)
def test_sequence_uniform_logits_cost_t_log2_v(overrides):
    model = _sequence_model(overrides)
    with torch.no_grad():
        model.token_head.weight.zero_()
        model.token_head.bias.zero_()
    tokens = torch.randint(0, 8, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        indices = model.encode(tokens).quantizer.indices
    bits = model.decoder_bits(tokens, indices)
    np.testing.assert_allclose(bits.numpy(), 11 * math.log2(8), rtol=1e-12)
    with pytest.raises(ValueError, match="code indices for"):
        model.decoder_bits(tokens, indices[:1])
