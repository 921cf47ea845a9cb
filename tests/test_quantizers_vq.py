"""VectorQuantizer, ResidualVQ and GroupVQ against hand-made cases and brute-force references."""

from __future__ import annotations

import pytest
import torch

from pips.quantizers import GroupVQ, ResidualVQ, VectorQuantizer


def set_codebook(vq: VectorQuantizer, codes: list[list[float]], counts: list[float] | None = None):
    """Hand-set the codes and counts (of a quantizer built with ``codebook_init="gaussian"``, so the
    first training batch does not replace them)."""
    assert vq.codebook_init == "gaussian"
    codebook = torch.tensor(codes).unsqueeze(0)  # [1, K, dim]
    ema_count = torch.tensor(counts).unsqueeze(0) if counts else torch.ones(1, len(codes))
    vq.codebooks.data.copy_(codebook)
    vq.ema_count.copy_(ema_count)
    if vq.ema_decay is not None:
        vq.ema_sum.copy_(codebook * ema_count.unsqueeze(-1))


def brute_force_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z - e_k||^2 with explicit differences: ``[N, dim]``, ``[K, dim]`` -> ``[N]``."""
    return (z.unsqueeze(1) - codebook.unsqueeze(0)).pow(2).sum(-1).argmin(-1)


def test_ema_update_equals_formula_on_hand_made_batch():
    vq = VectorQuantizer(
        2, 3, ema_decay=0.9, epsilon=1e-5, codebook_init="gaussian", dead_code_threshold=None
    )
    set_codebook(vq, [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [11.0, -1.0], [-1.0, 9.0]])
    out = vq(z)
    assert out.indices.tolist() == [0, 0, 1, 1, 2]
    # counts [2, 2, 1]; sums [[1, 1], [20, 0], [-1, 9]]; previous counts 1, sums = codes.
    ema_count = torch.tensor([0.9 + 0.1 * 2, 0.9 + 0.1 * 2, 0.9 + 0.1 * 1])
    ema_sum = torch.tensor([[0.1, 0.1], [9.0 + 2.0, 0.0], [-0.1, 9.0 + 0.9]])
    total = ema_count.sum()
    smoothed = (ema_count + 1e-5) / (total + 3 * 1e-5) * total  # Laplace smoothing
    torch.testing.assert_close(vq.ema_count[0], ema_count)
    torch.testing.assert_close(vq.ema_sum[0], ema_sum)
    torch.testing.assert_close(vq.codebook, ema_sum / smoothed.unsqueeze(-1))
    # The output of this step uses the codebook before the update.
    torch.testing.assert_close(
        out.quantized, torch.tensor([[0.0, 0], [0, 0], [10, 0], [10, 0], [0, 10]])
    )


def test_nearest_codes_match_brute_force_for_one_and_several_codebooks():
    torch.manual_seed(0)
    single = VectorQuantizer(8, 64)
    z = torch.randn(300, 8)
    assert torch.equal(
        single.nearest_codes(z.unsqueeze(1))[:, 0], brute_force_nearest(z, single.codebook)
    )
    multi = VectorQuantizer(8, 64, num_codebooks=3)
    z = torch.randn(300, 3, 8)
    indices = multi.nearest_codes(z)  # [N, 3]
    for head in range(3):
        assert torch.equal(indices[:, head], brute_force_nearest(z[:, head], multi.codebooks[head]))


def test_dead_code_is_replaced_by_a_current_input_below_a_share_of_the_uniform_usage():
    vq = VectorQuantizer(2, 3, ema_decay=0.5, dead_code_threshold=0.3, codebook_init="gaussian")
    set_codebook(vq, [[0.0, 0.0], [1.0, 0.0], [100.0, 100.0]], counts=[1, 1, 10])
    noise = 0.1 * torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    z = noise + torch.tensor([[0.0, 0.0]] * 10 + [[1.0, 0.0]] * 10)  # 10 inputs on codes 0 and 1
    # Counts of the unused code 2 / 0.3 x the uniform share: 5 / 1.6, 2.5 / 1.8, then 1.25 / 1.9.
    for _ in range(2):
        vq(z)
        torch.testing.assert_close(vq.codebook[2], torch.tensor([100.0, 100.0]), atol=0.01, rtol=0)
    vq(z)  # replaced by one of the current inputs, and given the uniform share 19 / 3
    replacement = vq.codebook[2]
    assert (z - replacement).abs().sum(-1).min() < 1e-6
    torch.testing.assert_close(vq.ema_count[0, 2], torch.tensor(19 / 3))


def test_dead_codes_are_the_same_at_any_batch_size():
    def dead_after(repeats: int) -> torch.Tensor:
        vq = VectorQuantizer(
            2, 4, ema_decay=0.9, dead_code_threshold=None, codebook_init="gaussian"
        )
        set_codebook(vq, [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
        z = torch.tensor([[0.0, 0.1]] * 6 + [[1.0, 0.1]] * 3 + [[0.1, 1.0]]).repeat(repeats, 1)
        for _ in range(30):
            vq(z)
        return vq._dead(0.5)  # below half the uniform share

    assert torch.equal(dead_after(1), dead_after(50))
    assert dead_after(1).tolist() == [[False, False, True, True]]  # used 1/10 of the time, unused


def test_distance_reset_picks_the_worst_quantised_inputs_in_order():
    vq = VectorQuantizer(
        2,
        4,
        ema_decay=0.5,
        dead_code_threshold=0.5,
        reset_strategy="distance",
        codebook_init="gaussian",
    )
    set_codebook(vq, [[0.0, 0.0], [1.0, 0.0], [50.0, 50.0], [60.0, 60.0]], counts=[8, 8, 0.6, 0.6])
    z = torch.tensor([[0.1, 0.0], [0.9, 0.1], [5.0, 5.0], [0.0, -3.0], [1.2, 0.0]])
    vq(z)  # codes 2 and 3 fall to 0.3 < 0.5 x 11.1 / 4; worst errors: [5, 5] then [0, -3]
    torch.testing.assert_close(vq.codebook[2], torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(vq.codebook[3], torch.tensor([0.0, -3.0]))


def test_overused_code_is_reset():
    vq = VectorQuantizer(
        2,
        4,
        ema_decay=0.9,
        overused_threshold=2.0,
        reset_strategy="distance",
        codebook_init="gaussian",
        dead_code_threshold=None,
    )
    set_codebook(vq, [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], counts=[1, 1, 1, 1])
    z = torch.tensor([[0.0, 0.1]] * 30 + [[3.0, 3.0]])  # every input on code 0 -> share > 2/K
    vq(z)
    torch.testing.assert_close(vq.codebook[0], torch.tensor([3.0, 3.0]))


def test_resets_are_seeded_and_survive_a_checkpoint():
    def make():
        return VectorQuantizer(4, 16, dead_code_threshold=0.9, ema_decay=0.8, seed=3)

    batches = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    first, second = make(), make()
    for batch in batches[:3]:
        first(batch), second(batch)
    torch.testing.assert_close(first.codebook, second.codebook)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for batch in batches[3:]:
        first(batch), resumed(batch)
    torch.testing.assert_close(first.codebook, resumed.codebook)


@pytest.mark.parametrize(
    "kwargs", [{}, {"ema_decay": None}, {"cosine": True}, {"num_codebooks": 2}]
)
def test_codes_to_quantized_reproduces_quantized_in_eval(kwargs):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 32, **kwargs)
    shape = (4, 6, 2, 8) if kwargs.get("num_codebooks") else (4, 6, 8)
    vq(torch.randn(shape))  # one training update first
    vq.eval()
    out = vq(torch.randn(shape))
    assert torch.equal(vq.codes_to_quantized(out.indices), out.quantized)


@pytest.mark.parametrize("ema_decay", [0.99, None])
def test_input_gradient_is_straight_through(ema_decay):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 32, ema_decay=ema_decay, commitment_weight=0.25)
    z = torch.randn(50, 8, requires_grad=True)
    upstream = torch.randn(50, 8)
    out = vq(z)
    (grad,) = torch.autograd.grad((out.quantized * upstream).sum(), z, retain_graph=True)
    torch.testing.assert_close(grad, upstream)  # identity through the quantizer
    (loss_grad,) = torch.autograd.grad(out.loss, z, retain_graph=True)
    codes = out.quantized.detach()  # the codes before this step's EMA update
    torch.testing.assert_close(loss_grad, 0.25 * 2 * (z.detach() - codes) / z.numel())
    if ema_decay is None:  # the codebook learns through the codebook loss only
        (codebook_grad,) = torch.autograd.grad(out.loss, vq.codebooks)
        assert codebook_grad.abs().sum() > 0


def test_kmeans_init_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    z = centers.repeat(50, 1) + 0.1 * torch.randn(200, 2, generator=generator)
    vq = VectorQuantizer(2, 4, codebook_init="kmeans", seed=1)
    vq(z)
    assert bool(vq.initialized)
    distance_to_nearest_code = torch.cdist(centers, vq.codebook).min(-1).values
    assert distance_to_nearest_code.max() < 0.5


def test_sample_init_takes_distinct_vectors_of_the_first_batch_at_their_scale():
    z = 1e-3 * torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    vq = VectorQuantizer(4, 16, ema_decay=None, seed=2)  # a codebook the forward does not move
    out = vq(z)
    distances = (vq.codebook.detach().unsqueeze(1) - z).abs().sum(-1)  # [K, N]
    assert distances.min(-1).values.max() == 0  # each code is one of the inputs
    assert len(set(distances.argmin(-1).tolist())) == 16  # without repeats
    assert out.stats["used_codes"] > 8  # a Gaussian codebook would give every input one code
    torch.testing.assert_close(vq.ema_count.sum(), torch.tensor(100.0), rtol=0.02, atol=0)
    gaussian = VectorQuantizer(4, 16, codebook_init="gaussian", dead_code_threshold=None)
    assert gaussian(z).stats["used_codes"] <= 2


def test_default_vq_does_not_collapse_on_small_features():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64)
    centers = 0.05 * torch.randn(64, 8)  # 64 clusters at a scale far below a unit Gaussian
    for _ in range(60):
        z = centers[torch.randint(64, (256,))] + 0.002 * torch.randn(256, 8)
        out = vq(z)
    assert out.stats["used_codes"] >= 48 and out.stats["dead_codes"] <= 8
    vq.eval()
    assert vq(centers).stats["used_codes"] >= 40  # most clusters have a code of their own


def test_bad_codebook_init_is_named():
    with pytest.raises(ValueError, match="codebook_init must be one of sample, kmeans, gaussian"):
        VectorQuantizer(4, 8, codebook_init="zeros")


def test_cosine_codes_are_unit_vectors_matched_by_angle():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, cosine=True)
    z = torch.randn(40, 8) * 7
    out = vq(z)
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(40))
    vq.eval()
    out = vq(z)
    expected = (torch.nn.functional.normalize(z, dim=-1) @ vq.codebook.t()).argmax(-1)
    assert torch.equal(out.indices, expected)


def test_vq_stats_keys_and_bad_arguments():
    out = VectorQuantizer(4, 8)(torch.randn(10, 4))
    assert {"perplexity", "used_codes", "dead_codes", "ema_perplexity"} <= set(out.stats)
    with pytest.raises(
        ValueError, match="reset_strategy must be one of usage, distance; got 'random'"
    ):
        VectorQuantizer(4, 8, reset_strategy="random")
    with pytest.raises(ValueError, match=r"expects z of shape \[\.\.\., 4\]; got \(10, 5\)"):
        VectorQuantizer(4, 8)(torch.randn(10, 5))


# --- ResidualVQ ----------------------------------------------------------------------------------


def test_rvq_quantisation_error_does_not_grow_with_stages():
    torch.manual_seed(0)
    rvq = ResidualVQ(8, 32, num_stages=4, codebook_init="kmeans")
    z = torch.randn(512, 8)
    for _ in range(3):
        rvq(z)
    rvq.eval()
    indices = rvq(z).indices  # [N, 4]
    errors = [
        (z - rvq.codes_to_quantized(indices[:, : stage + 1])).pow(2).sum(-1).mean().item()
        for stage in range(4)
    ]
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.5 * errors[0]


def test_rvq_commitment_loss_is_against_each_stage_residual():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 16, num_stages=3, commitment_weight=0.25).eval()
    z = torch.randn(64, 4)
    out = rvq(z)
    expected, residual = torch.zeros(()), z
    for stage in range(3):
        code = rvq.stage(stage).codes_to_quantized(out.indices[:, stage])
        expected = expected + 0.25 * (residual - code).pow(2).mean()
        residual = residual - code
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.quantized, rvq.codes_to_quantized(out.indices))


def test_rvq_gradient_is_one_straight_through_and_shared_codebook_has_one_module():
    rvq = ResidualVQ(4, 16, num_stages=3, shared_codebook=True)
    assert len(rvq.stages) == 1
    z = torch.randn(10, 4, requires_grad=True)
    upstream = torch.randn(10, 4)
    (grad,) = torch.autograd.grad((rvq(z).quantized * upstream).sum(), z)
    torch.testing.assert_close(grad, upstream)


# --- GroupVQ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_codebook", [False, True])
def test_gvq_quantises_each_group_to_its_nearest_code(shared_codebook):
    torch.manual_seed(0)
    gvq = GroupVQ(12, 16, groups=3, shared_codebook=shared_codebook).eval()
    z = torch.randn(5, 7, 12)
    out = gvq(z)
    assert out.indices.shape == (5, 7, 3) and out.quantized.shape == (5, 7, 12)
    grouped = z.reshape(-1, 3, 4)
    for group in range(3):
        codebook = gvq.vq.codebooks[0 if shared_codebook else group]
        expected = brute_force_nearest(grouped[:, group], codebook)
        assert torch.equal(out.indices.reshape(-1, 3)[:, group], expected)
    assert torch.equal(gvq.codes_to_quantized(out.indices), out.quantized)


def test_gvq_rejects_indivisible_dim():
    with pytest.raises(ValueError, match="dim must be divisible by groups; got dim=10, groups=3"):
        GroupVQ(10, 16, groups=3)
