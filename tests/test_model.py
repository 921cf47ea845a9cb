"""The grid DVAE: shapes, batch independence (padding masks), overfitting, every quantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pips.config import QUANTIZER_KINDS, load_config
from pips.data import MAX_GRID_SIZE, VOCAB, collate_grids, load_grids
from pips.models.grid_dvae import GridDVAE, predict_grids
from pips.tasks.grids import GridDVAEModule

SMALL_MODEL = [
    "model.width=32",
    "model.heads=2",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.num_latents=6",
    "model.quantizer.codebook_size=32",
    "model.quantizer.levels=[5,5,5]",
    "model.quantizer.num_stages=2",
    "model.quantizer.groups=2",
    "model.quantizer.base=2",  # radial: 32 codes = 2^5
]


def _model(*overrides: str, seed: int = 0) -> GridDVAE:
    torch.manual_seed(seed)
    return GridDVAE(load_config(overrides=[*SMALL_MODEL, *overrides]).model)


def _module(*overrides: str, seed: int = 0) -> GridDVAEModule:
    torch.manual_seed(seed)
    return GridDVAEModule.from_config(load_config(overrides=[*SMALL_MODEL, *overrides]))


@pytest.fixture(scope="module")
def arc_grids() -> list[np.ndarray]:
    return [record.grid for record in load_grids("arc1", "training", max_samples=200)]


@pytest.fixture(scope="module")
def small_grids(arc_grids) -> list[np.ndarray]:
    """8 small ARC grids of mixed sizes (at most 6x6)."""
    grids = [g for g in arc_grids if max(g.shape) <= 6][:8]
    assert len(grids) == 8 and len({g.shape for g in grids}) > 2
    return grids


@pytest.fixture(scope="module")
def large_grids(arc_grids) -> list[np.ndarray]:
    return sorted(arc_grids, key=lambda g: -g.size)[:2]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("patch_tokens", [False, True])
@pytest.mark.parametrize("patch_size", [2, 3])
def test_spatial_output_shapes(small_grids, patch_tokens, patch_size):
    model = _model(
        "model.layout=spatial",
        f"model.patch_tokens={patch_tokens}",
        f"model.patch_size={patch_size}",
    )
    batch = collate_grids(small_grids[:4])  # canvas: largest height x (largest width + EOS)
    output = model(batch)
    rows = -(-batch.canvas_height // patch_size)
    cols = -(-batch.canvas_width // patch_size)
    assert output.cell_logits.shape == (4, batch.canvas_height * batch.canvas_width, VOCAB.size)
    assert output.height_logits.shape == output.width_logits.shape == (4, MAX_GRID_SIZE)
    encoded = output.encoded
    assert encoded.latents.shape == (4, rows * cols, 32)
    assert encoded.quantizer.quantized.shape == encoded.latents.shape
    assert encoded.quantizer.indices.shape == (4, rows * cols)
    assert encoded.latent_positions.shape == (4, rows * cols, 2)
    assert encoded.latent_padding.shape == (4, rows * cols)
    # a latent is padding exactly when its patch holds no cell and no EOS of its grid
    first = small_grids[0].shape
    expected = (-(-first[0] // patch_size)) * (-(-(first[1] + 1) // patch_size))
    assert int((~encoded.latent_padding[0]).sum()) == expected


@pytest.mark.parametrize("patch_tokens", [False, True])
def test_pooled_output_shapes(small_grids, patch_tokens):
    model = _model("model.layout=pooled", f"model.patch_tokens={patch_tokens}")
    batch = collate_grids(small_grids[:4])
    output = model(batch)
    assert output.cell_logits.shape == (4, batch.canvas_height * batch.canvas_width, VOCAB.size)
    assert output.height_logits.shape == output.width_logits.shape == (4, MAX_GRID_SIZE)
    assert output.encoded.latents.shape == (4, 6, 32)
    assert output.encoded.quantizer.indices.shape == (4, 6)
    assert not output.encoded.latent_padding.any()


def test_region_slots_start_from_their_regions_and_seed_their_cells(small_grids, large_grids):
    model = _model("model.layout=pooled", "model.slots=regions", "model.num_latents=9")
    batch = collate_grids([large_grids[0], small_grids[0]])
    output = model(batch)
    assert output.encoded.quantizer.indices.shape == (2, 9)
    # the decoder's bottom-right cell of a grid (its last EOS; regions span the EOS column too)
    # sees the bottom-right slot in its seeded query and every slot through cross-attention:
    # its gradient with respect to that slot's latent is the largest
    latents = output.encoded.latents.detach().requires_grad_(True)
    cells, _, _ = model.decode(
        latents,
        output.encoded.latent_positions,
        output.encoded.latent_padding,
        batch.canvas_height,
        batch.canvas_width,
        batch.pad_mask,
    )
    height, width = small_grids[0].shape
    cell = (height - 1) * batch.canvas_width + width
    cells[1, cell].sum().backward()
    per_slot = latents.grad[1].norm(dim=-1)  # [9]
    assert int(per_slot.argmax()) == 8
    assert latents.grad[0].abs().sum() == 0  # grids do not mix


def test_local_slots_pool_only_from_their_own_region(large_grids):
    """slots=local: each slot's pooling cross-attention sees exactly the tokens its region
    averages (a per-query mask), and a per-query mask hides those keys from that query alone."""
    from pips.nn.transformer import Attention

    model = _model("model.layout=pooled", "model.slots=local", "model.num_latents=4").eval()
    batch = collate_grids(large_grids[:2])
    _, _, padding, (hp, wp) = model.embed_tokens(
        batch.tokens, batch.canvas_height, batch.canvas_width
    )
    h = torch.randn(2, hp * wp, model.width)
    means, inside = model._region_means(h, padding, hp, wp)
    for b in range(2):
        for slot in range(4):
            keys = inside[b, slot]
            assert keys.any() and not (keys & padding[b]).any()
            torch.testing.assert_close(means[b, slot], h[b, keys].mean(0))

    torch.manual_seed(0)
    attention = Attention(16, 2).eval()
    x, context = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    hidden = torch.zeros(1, 3, 5, dtype=torch.bool)
    hidden[0, 0, 3:] = True  # query 0 may not look at keys 3 and 4
    changed = context.clone()
    changed[0, 3:] += 1.0
    with torch.no_grad():
        out = attention(x, context, key_padding_mask=hidden)
        out_changed = attention(x, changed, key_padding_mask=hidden)
    torch.testing.assert_close(out[0, 0], out_changed[0, 0])
    assert (out[0, 1:] - out_changed[0, 1:]).abs().max() > 1e-3


def test_region_offsets_tell_each_patch_where_it_sits_in_its_region():
    """model.region_offsets: the place embedding of a patch is that of its row offset and its
    region's height (in patches) plus the same along columns; zero-offset rows at padding."""
    model = _model(
        "model.layout=pooled",
        "model.slots=regions",
        "model.num_latents=4",
        "model.region_offsets=true",
    )
    # a 3 x 4 board of patches holding a 3 x 3 grid of patches: 2 regions a side, so rows split
    # [0] [1 2] and columns [0] [1 2] (region of a position: floor((2i + 1) R / 2n))
    padding = torch.ones(1, 3, 4, dtype=torch.bool)
    padding[0, :3, :3] = False
    place = model._region_place(model._region_members(padding.view(1, -1), 3, 4))
    place = place.view(3, 4, -1)
    table = model.place_embedding.weight.view(4, MAX_GRID_SIZE + 1, -1).detach()
    offset, extent = [0, 0, 1, 0], [1, 2, 2, 0]
    for i in range(3):
        for j in range(4):
            expected = table[0][offset[i]] + table[1][extent[i]]
            expected = expected + table[2][offset[j]] + table[3][extent[j]]
            torch.testing.assert_close(place[i, j], expected)
    # the option only exists for region slots, and off it changes nothing
    assert _model("model.layout=pooled", "model.region_offsets=true").place_embedding is None
    assert (
        _model("model.layout=pooled", "model.slots=regions", "model.num_latents=4").place_embedding
        is None
    )


def test_region_slots_need_a_square_number_of_slots():
    from pips.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.num_latents.*square.*model.num_latents=4 or 9"):
        load_config(overrides=["model.layout=pooled", "model.slots=regions", "model.num_latents=6"])


def test_region_weights_average_every_real_position_once_per_region():
    from pips.nn.pooling import region_matrix, region_of

    for length in range(1, 13):
        weights = region_matrix(torch.tensor([length]), 12, 4)[0]  # [4, 12]
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, dtype=weights.dtype))
        assert weights[:, length:].sum() == 0  # never padding
        assert (weights[:, :length].sum(0) > 0).all()  # every real position is in a region
        owner = region_of(torch.tensor([length]), 12, 4)[0]  # [12, 4]
        assert owner[:length].sum(-1).eq(1).all() and owner[length:].sum() == 0
        # a position's own region is one that averages it
        assert (weights.t()[:length] * owner[:length]).sum(-1).gt(0).all()
        # regions follow the grid in order
        assert owner[:length].argmax(-1).diff().ge(0).all()


def test_pooled_code_string_has_the_same_length_for_any_grid_size(small_grids, large_grids):
    model = _model("model.layout=pooled").eval()
    with torch.no_grad():
        small = model(collate_grids(small_grids[:1])).encoded.quantizer.indices
        large = model(collate_grids(large_grids[:1])).encoded.quantizer.indices
    assert small.shape == large.shape == (1, 6)


# ----------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize(
    "layout, patch_tokens, kind",
    [
        ("spatial", False, "fsq"),
        ("spatial", True, "fsq"),
        ("pooled", False, "fsq"),
        ("pooled", True, "fsq"),
        ("spatial", False, "vq"),
        ("pooled", False, "gumbel"),
        ("regions", True, "gumbel"),
        ("regions", False, "fsq"),
    ],
)
def test_codes_do_not_depend_on_the_other_grids_in_the_batch(
    small_grids, large_grids, layout, patch_tokens, kind
):
    slots = ["model.slots=regions", "model.num_latents=4"] if layout == "regions" else []
    model = _model(
        f"model.layout={'pooled' if layout == 'regions' else layout}",
        f"model.patch_tokens={patch_tokens}",
        f"model.quantizer.kind={kind}",
        *slots,
    ).eval()
    grid = small_grids[0]
    with torch.no_grad():
        alone = model(collate_grids([grid]))
        crowded_batch = collate_grids([large_grids[0], grid, large_grids[1]])
        crowded = model(crowded_batch)
    a, b = alone.encoded, crowded.encoded
    keep_a, keep_b = ~a.latent_padding[0], ~b.latent_padding[1]
    # the same latents, in the same (row, col) places, with the same codes
    assert a.latent_positions[0][keep_a].tolist() == b.latent_positions[1][keep_b].tolist()
    assert torch.equal(a.quantizer.indices[0][keep_a], b.quantizer.indices[1][keep_b])
    torch.testing.assert_close(a.latents[0][keep_a], b.latents[1][keep_b], atol=1e-5, rtol=1e-5)
    # and the decoder reads the same cells and size from them
    height, width = grid.shape
    cells_alone = alone.cell_logits[0].view(height, width + 1, -1)  # its own canvas + EOS
    cells_crowded = crowded.cell_logits[1].view(
        crowded_batch.canvas_height, crowded_batch.canvas_width, -1
    )
    torch.testing.assert_close(
        cells_alone[:height, :width], cells_crowded[:height, :width], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        alone.height_logits[0], crowded.height_logits[1], atol=1e-4, rtol=1e-4
    )


# ----------------------------------------------------------------------------- every quantizer


@pytest.mark.parametrize("layout", ["spatial", "pooled"])
@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_every_quantizer_trains_in_both_layouts(small_grids, kind, layout):
    module = _module(f"model.layout={layout}", f"model.quantizer.kind={kind}")
    module.train()
    batch = collate_grids(small_grids[:4])
    values = module.schedule_values(0)
    output = module(batch, **values)
    losses = module.compute_losses(output, batch, values["quantizer_weight"])
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    losses["total"].backward()
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the encoder is reached through the quantizer's estimator
    assert module.model.token_embedding.weight.grad is not None
    assert module.model.token_embedding.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- overfitting


def _overfit(module: GridDVAEModule, batch, max_steps: int, lr: float = 5e-3):
    """Adam on one batch until eval-mode cell accuracy and sizes are perfect; returns the step."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    mask = batch.grid_mask
    for step in range(1, max_steps + 1):
        module.train()
        output = module(batch)
        loss = module.compute_losses(output, batch, 1.0)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            module.eval()
            with torch.no_grad():
                output = module(batch)
            colours, sizes = predict_grids(
                output.cell_logits, output.height_logits, output.width_logits, VOCAB.num_colours
            )
            accuracy = float(((colours == batch.tokens) & mask).sum() / mask.sum())
            if accuracy == 1.0 and torch.equal(sizes, batch.shapes):
                return step, float(loss.detach())
    return None, float(loss.detach())


@pytest.fixture(scope="module")
def overfit_fsq(small_grids):
    module = _module(
        "model.width=64",
        "model.patch_size=1",
        "model.quantizer.kind=fsq",
        "model.quantizer.levels=[8,8,8]",
    )
    batch = collate_grids(small_grids)
    steps, loss = _overfit(module, batch, max_steps=300)
    return module, batch, steps, loss


def test_loss_falls_to_near_zero_when_overfitting_one_batch_without_quantizer(small_grids):
    module = _module("model.width=64", "model.patch_size=1", "model.quantizer.kind=none")
    steps, loss = _overfit(module, collate_grids(small_grids), max_steps=200)
    assert steps is not None, f"not perfect after 200 steps; loss {loss:.3f}"
    assert loss < 0.5


def test_loss_falls_to_near_zero_when_overfitting_one_batch_with_fsq(overfit_fsq):
    _, _, steps, loss = overfit_fsq
    assert steps is not None, f"not perfect after 300 steps; loss {loss:.3f}"
    assert loss < 0.5


def test_reconstruct_after_overfitting_returns_the_original_grids(overfit_fsq, small_grids):
    module, batch, steps, _ = overfit_fsq
    assert steps is not None
    module.eval()
    grids = module.model.reconstruct(batch)
    assert len(grids) == len(small_grids)
    for rebuilt, original in zip(grids, small_grids, strict=True):
        np.testing.assert_array_equal(rebuilt, original)


# ----------------------------------------------------------------------------- reconstruct


@pytest.mark.parametrize("layout", ["spatial", "pooled"])
def test_reconstruct_returns_grids_of_the_predicted_sizes(small_grids, layout):
    model = _model(f"model.layout={layout}", seed=3).eval()
    batch = collate_grids(small_grids)
    with torch.no_grad():
        output = model(batch)
    _, sizes = predict_grids(
        output.cell_logits, output.height_logits, output.width_logits, VOCAB.num_colours
    )
    grids = model.reconstruct(batch)
    assert [g.shape for g in grids] == [tuple(s) for s in sizes.tolist()]
    assert all(g.min() >= 0 and g.max() < VOCAB.num_colours for g in grids)
