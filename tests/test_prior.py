"""The code prior: cached decoding equals the full forward, sampling filters, code lengths."""

import math

import numpy as np
import pytest
import torch

from pips.models.code_tokens import IndexSplit, PooledLayout, SpatialLayout
from pips.models.prior import CodePrior, bits_per_token, filter_logits
from pips.models.range_coding import compress, decompress
from pips.quantizers.fsq import FSQ

torch.set_num_threads(1)


def _spatial_prior(seed: int = 0, coordinates: bool = True) -> CodePrior:
    torch.manual_seed(seed)
    layout = SpatialLayout(max_rows=3, max_cols=3, split=IndexSplit([(8, 1), (8, 8)], limit=8))
    prior = CodePrior(
        layout, width=32, depth=2, heads=2, condition_vocab=2, coordinates=coordinates
    )
    return prior.eval()


def _pooled_prior(seed: int = 0, coordinates: bool = True) -> CodePrior:
    torch.manual_seed(seed)
    layout = PooledLayout(num_slots=6, split=IndexSplit([(16, 1)]), levels=2)
    return CodePrior(layout, width=32, depth=2, heads=2, coordinates=coordinates).eval()


def _stepped_logits(prior, tokens, cache, condition=None, guidance=None) -> torch.Tensor:
    """The logits a Decoding gives at every step while ``tokens`` are pushed: [B, T, V]."""
    decoding = prior.start(tokens.shape[0], tokens.shape[1], condition, guidance, cache)
    steps = []
    for position in range(tokens.shape[1]):
        steps.append(decoding.next_logits())
        decoding.push(tokens[:, position])
    return torch.stack(steps, 1)


def _full_logits(prior, tokens, condition=None, guidance=None) -> torch.Tensor:
    with torch.no_grad():
        logits = prior.logits(tokens, condition)
        if guidance is not None:
            unconditional = prior.logits(tokens)
            logits = unconditional + guidance * (logits - unconditional)
            logits = prior.mask(logits, tokens, torch.arange(tokens.shape[1]))
    return logits


PATHS = {"unconditional": None, "conditional": None, "guided": 1.5}  # path -> guidance


@pytest.mark.parametrize("coordinates", [True, False], ids=["coordinates", "no-coordinates"])
@pytest.mark.parametrize("make_prior", [_spatial_prior, _pooled_prior], ids=["spatial", "pooled"])
@pytest.mark.parametrize("path", PATHS, ids=list(PATHS))
def test_cached_logits_equal_full_forward_logits_at_every_step(make_prior, path, coordinates):
    """Sampled, cached, uncached and teacher-forced logits agree (with coordinates: every path
    adds the same coordinate embeddings, a condition prefix shifting none of them)."""
    prior = make_prior(coordinates=coordinates)
    assert prior.coordinates == coordinates and prior.args["coordinates"] == coordinates
    options = {}
    if path != "unconditional":  # tokens, BOS as a separator, and a condition-only id if any
        extra = prior.embed.num_embeddings - 1
        condition = torch.tensor([3, prior.bos_id, 5, extra])
        options = dict(condition=condition, guidance=PATHS[path])
    generator = torch.Generator().manual_seed(0)
    tokens, sampled_logits = prior.sample(6, generator=generator, return_logits=True, **options)
    full = _full_logits(prior, tokens, options.get("condition"), options.get("guidance"))
    finite = torch.isfinite(full)
    for logits in (
        sampled_logits,
        _stepped_logits(prior, tokens, True, options.get("condition"), options.get("guidance")),
        _stepped_logits(prior, tokens, False, options.get("condition"), options.get("guidance")),
    ):
        assert torch.equal(torch.isfinite(logits), finite)  # the same fields masked
        torch.testing.assert_close(logits[finite], full[finite], atol=1e-5, rtol=0)


def test_spatial_coordinates_of_hand_made_items_equal_the_table():
    """A 2 x 3 and a 3 x 1 code map, 2 parts a position: (row + 1, col + 1, part + 1) of each
    code token, 0 for the size tokens, the end and the padding; the width is read per row."""
    layout = _spatial_prior().layout
    assert layout.per_position == 2 and layout.coordinate_sizes == (4, 4, 3)
    tokens = layout.batch([np.arange(6).reshape(2, 3), np.arange(3).reshape(3, 1)])  # [2, 15]
    size = [(0, 0, 0)] * 2
    wide = [(r, c, p) for r in (1, 2) for c in (1, 2, 3) for p in (1, 2)]
    tall = [(r, 1, p) for r in (1, 2, 3) for p in (1, 2)]
    table = torch.tensor(
        [size + wide + [(0, 0, 0)], size + tall + [(0, 0, 0)] * 7]  # end, then padding
    )
    positions = torch.arange(tokens.shape[1])
    assert torch.equal(layout.coordinates(tokens, positions), table)
    # positions from 2 on need only the two size tokens; before them nothing
    assert torch.equal(layout.coordinates(tokens[:, :2], positions), table)
    assert torch.equal(layout.coordinates(tokens[:, :1], positions[:2]), table[:, :2])
    assert torch.equal(layout.coordinates(tokens[:, :0], positions[1:2]), table[:, 1:2])
    with pytest.raises(ValueError, match="size tokens"):
        layout.coordinates(tokens[:, :1], positions[:3])


def test_pooled_coordinates_are_slot_and_part():
    layout = _pooled_prior().layout  # 6 slots of 2 levels, one part each
    assert layout.coordinate_sizes == (7, 1, 3)
    tokens = torch.zeros(2, 12, dtype=torch.long)
    coords = layout.coordinates(tokens, torch.arange(14))  # two positions past the end
    table = [(s, 0, p) for s in range(1, 7) for p in (1, 2)] + [(0, 0, 0)] * 2
    assert torch.equal(coords, torch.tensor([table, table]))


def test_coordinates_leak_nothing_from_the_predicted_token():
    """The logits at positions <= t do not change when token t (or any later one) does, the size
    tokens included: an input's coordinates are its target's, read from tokens before it."""
    prior = _spatial_prior()
    layout = prior.layout
    tokens = layout.batch([np.arange(6).reshape(2, 3)])
    with torch.no_grad():
        base = prior.logits(tokens)
        for t in range(tokens.shape[1] - 1):
            changed = tokens.clone()
            low, high = layout.allowed(changed, torch.tensor([t]))
            changed[0, t] = low[0, 0] + (changed[0, t] - low[0, 0] + 1) % (high - low)[0, 0]
            if t < 2:  # a different size: later fields move, what comes before must not
                changed = changed[:, : t + 1]
            logits = prior.logits(changed)
            torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)


def test_coordinates_change_the_logits_and_are_recorded_in_the_args():
    prior = _spatial_prior()
    tokens = prior.layout.batch([np.arange(6).reshape(2, 3)])
    with torch.no_grad():
        with_coordinates = prior.logits(tokens)
        prior.coordinate_embed[0].weight.zero_()  # rows: the first row's tokens see a change
        without_rows = prior.logits(tokens)
    finite = torch.isfinite(with_coordinates)
    assert not torch.allclose(with_coordinates[finite], without_rows[finite])
    rebuilt = CodePrior(prior.layout, **prior.args)
    assert rebuilt.state_dict().keys() == prior.state_dict().keys()
    assert not any(
        "coordinate" in key for key in CodePrior(prior.layout, coordinates=False).state_dict()
    )


def test_sampling_with_a_fixed_seed_is_reproducible():
    prior = _spatial_prior()

    def draw(seed, **options):
        return prior.sample(8, generator=torch.Generator().manual_seed(seed), **options)

    assert torch.equal(draw(0), draw(0))
    assert torch.equal(draw(0, top_k=3, top_p=0.9), draw(0, top_k=3, top_p=0.9))
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(0, cache=False), draw(0))  # the reference path draws the same


def test_samples_follow_the_layout():
    prior = _spatial_prior()
    tokens = prior.sample(16, generator=torch.Generator().manual_seed(0), temperature=2.0)
    layout = prior.layout
    for row in tokens.numpy():
        codes = layout.codes(row)
        assert (layout.tokens(codes) == row[: len(layout.tokens(codes))]).all()
        assert (row[len(layout.tokens(codes)) :] == layout.end_id).all()


PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(), PROBS),
        (dict(top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0])),
        # the smallest set with mass >= 0.8: 0.5 + 0.2 + 0.15 (0.1 starts at mass 0.85)
        (dict(top_p=0.8), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85),
        (dict(top_p=0.7), torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7),
        (dict(top_p=0.3), torch.tensor([1.0, 0, 0, 0, 0])),
        (dict(temperature=2.0), PROBS.sqrt() / PROBS.sqrt().sum()),
        (dict(temperature=0.5, top_k=3), PROBS[:3] ** 2 / (PROBS[:3] ** 2).sum()),
        (dict(top_k=4, top_p=0.9), torch.tensor([0.5, 0.2, 0.15, 0.1, 0]) / 0.95),
    ],
)
def test_filters_match_hand_computed_distributions(options, expected):
    logits = PROBS.log()[torch.tensor([3, 0, 4, 2, 1])]  # shuffled: filters must not assume order
    expected = torch.nn.functional.pad(expected, (0, 5 - len(expected)))
    probs = filter_logits(logits[None], **options).softmax(-1)[0]
    torch.testing.assert_close(probs, expected[torch.tensor([3, 0, 4, 2, 1])])


def test_uniform_logits_cost_exactly_the_code_strings_capacity():
    quantizer = FSQ([8] * 8)  # split into two parts of 4,096: 24 bits a code either way
    layout = SpatialLayout(4, 5, IndexSplit.for_quantizer(quantizer), levels=2)
    prior = CodePrior(layout, width=32, depth=1, heads=2)
    torch.nn.init.zeros_(prior.head.weight)  # every logit 0: uniform over each allowed field
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 8**8, size=(r, c, 2)) for r, c in [(1, 1), (2, 5), (4, 5)]]
    tokens = layout.batch(items)
    with torch.no_grad():
        bits = prior.bits(tokens).double()
    capacity = [math.log2(4 * 5) + item.size * math.log2(quantizer.codebook_size) for item in items]
    torch.testing.assert_close(bits, torch.tensor(capacity, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(layout.capacity_bits(tokens), bits, rtol=1e-6, atol=0)


def test_a_tiny_prior_overfits_one_batch():
    """Eight distinct sequences: the least a prior can spend on them is which of the eight,
    log2(8) = 3 bits a sequence; everything else it must learn to predict exactly."""
    torch.manual_seed(0)
    layout = PooledLayout(num_slots=12, split=IndexSplit([(16, 1)]))
    prior = CodePrior(layout, width=32, depth=2, heads=2)
    tokens = torch.randint(0, 16, (8, 12))
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        bits_per_token(prior, tokens).backward()
        optimizer.step()
    with torch.no_grad():
        bits = prior.bits(tokens)
    assert bits.mean().item() < math.log2(8) + 0.05, bits  # from 48 bits a sequence at the start


def _coding_prior() -> CodePrior:
    torch.manual_seed(0)
    layout = SpatialLayout(max_rows=6, max_cols=6, split=IndexSplit.for_quantizer(FSQ([8] * 4)))
    return CodePrior(layout, width=32, depth=2, heads=2).eval()


def test_range_coder_round_trips_random_and_sampled_items():
    prior = _coding_prior()
    layout = prior.layout
    rng = np.random.default_rng(0)
    items = [layout.tokens(rng.integers(0, 4096, size=size)) for size in [(1, 1), (6, 6), (2, 5)]]
    sampled = prior.sample(3, generator=torch.Generator().manual_seed(0))
    items += [layout.tokens(layout.codes(row.numpy())) for row in sampled]
    words, _ = compress(prior, items)
    assert words.dtype == np.uint32
    decoded = decompress(prior, words, len(items))
    assert [row.tolist() for row in decoded] == [item.tolist() for item in items]


def test_range_coder_length_matches_the_models_bits():
    prior = _coding_prior()
    rng = np.random.default_rng(1)
    sizes = [(3, 4), (6, 5)] * 8  # about 4,100 bits: the coder's final words, up to ~30 bits,
    items = [prior.layout.tokens(rng.integers(0, 4096, size=size)) for size in sizes]
    words, model_bits = compress(prior, items)  # are spent once per stream
    with torch.no_grad():
        bits = prior.bits(prior.layout.pad(items)).sum().item()
    assert model_bits == pytest.approx(bits, rel=1e-5)  # the coded probabilities are the model's
    coded_bits = 32 * len(words)
    assert abs(coded_bits - model_bits) <= 0.01 * model_bits + 16, (coded_bits, model_bits)
