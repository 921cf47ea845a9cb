"""Latent loss terms and input masking in training: what is logged, what is added, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pips.config import LOGIT_TERMS, ConfigError, load_config
from pips.data import collate_grids
from pips.losses import kl_to_uniform
from pips.tasks.grids import GridDVAEModule

TINY_POOLED_GUMBEL = [
    "model.layout=pooled",
    "model.width=32",
    "model.heads=2",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.num_latents=4",
    "model.quantizer.kind=gumbel",
    "model.quantizer.codebook_size=16",
    "trainer.max_steps=20",
]


def _module(*overrides: str, dataset_size: int | None = 100) -> GridDVAEModule:
    torch.manual_seed(0)
    config = load_config(overrides=[*TINY_POOLED_GUMBEL, *overrides])
    return GridDVAEModule.from_config(config, dataset_size=dataset_size).train()


def _batch():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5, 5), (2, 6), (6, 3), (4, 4), (1, 2)]
    return collate_grids([rng.integers(0, 10, size=shape) for shape in shapes])


def _assert_total_is_the_weighted_sum(module: GridDVAEModule, logs: dict, step: int) -> None:
    values = module.schedule_values(step)
    expected = (
        logs["train/loss_cells"]
        + module.config.loss.shape_weight * logs["train/loss_shape"]
        + values["quantizer_weight"] * logs["train/loss_quantizer"]
    )
    for name in module.term_weights:
        if logs[f"weight/{name}"] > 0:
            expected = expected + logs[f"weight/{name}"] * logs[f"loss/{name}"]
    assert torch.allclose(logs["train/loss"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(logs["loss/total"], logs["train/loss"])


@pytest.mark.parametrize("name", LOGIT_TERMS)
def test_each_weight_logs_its_term_and_weight_and_adds_to_the_total(name):
    module = _module(f"loss.{name}=0.5")
    total, logs = module.train_losses(_batch(), step=0, with_logs=True)
    assert logs[f"weight/{name}"] == 0.5
    assert torch.isfinite(logs[f"loss/{name}"])
    assert [key for key in logs if key.startswith("weight/")] == [f"weight/{name}"]
    _assert_total_is_the_weighted_sum(module, logs, step=0)
    total.backward()
    head = module.model.quantizer.head_weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0


def test_every_term_at_once_with_clamping_and_marginal_ema_sums_to_the_total():
    overrides = [f"loss.{name}={0.1 * (i + 1):.1f}" for i, name in enumerate(LOGIT_TERMS)]
    module = _module(*overrides, "loss.clamp_terms=true", "loss.marginal_ema=0.9")
    total, logs = module.train_losses(_batch(), step=3, with_logs=True)
    for name in LOGIT_TERMS:
        assert f"loss/{name}" in logs and f"weight/{name}" in logs
    for name in ("mi", "tc", "dwkl"):
        assert logs[f"loss/clamped_{name}"] in (0.0, 1.0)
        assert logs[f"loss/{name}"] >= 0  # clamped at 0
    _assert_total_is_the_weighted_sum(module, logs, step=3)
    # the signed diversity terms are minus an entropy
    assert logs["loss/slot_diversity"] <= 0 and logs["loss/batch_diversity"] <= 0
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_a_product_codebook_feeds_its_factors_to_every_term_as_latents():
    """model.quantizer.factors=2 (16 codes = 4 x 4): every term runs; the analytic KL to the
    uniform prior over all 16 codes equals the sum over the factors (the posterior is their
    product), and the batch-diversity term is the factors' per-slot marginal entropies."""
    overrides = [f"loss.{name}={0.1 * (i + 1):.1f}" for i, name in enumerate(LOGIT_TERMS)]
    module = _module(*overrides, "loss.marginal_ema=0.9", "model.quantizer.factors=2")
    total, logs = module.train_losses(_batch(), step=3, with_logs=True)
    _assert_total_is_the_weighted_sum(module, logs, step=3)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)

    module.eval()
    output = module(_batch())
    logits = output.encoded.quantizer.logits  # [6, 4, 2, 4]
    full = (logits[..., 0, :, None] + logits[..., 1, None, :]).flatten(-2)  # [6, 4, 16]
    terms, _ = module.latent_terms(output, {"kl": 1.0, "batch_diversity": 1.0}, 1.0)
    torch.testing.assert_close(terms["kl"], kl_to_uniform(full))
    marginals = logits.softmax(-1).mean(0)  # [4, 2, 4] per slot and factor
    entropy = -(marginals * marginals.log()).sum(-1).mean()
    torch.testing.assert_close(terms["batch_diversity"], -entropy)


def test_default_config_logs_no_latent_terms_and_no_mask_fraction():
    module = _module()
    assert module.term_weights == {}
    assert module.slot_marginals is None and module.code_usage is None
    _, logs = module.train_losses(_batch(), step=0, with_logs=True)
    assert not [key for key in logs if key.startswith(("loss/", "weight/"))]
    assert "train/mask_fraction" not in logs
    assert "train/loss" in logs and "train/cell_accuracy" in logs


def test_a_weight_schedule_starting_at_zero_turns_its_term_on_later():
    module = _module("loss.tc={kind: linear, start: 0, end: 1.0, steps: 10}")
    batch = _batch()
    _, early = module.train_losses(batch, step=0, with_logs=True)
    assert early["weight/tc"] == 0.0
    assert "loss/tc" not in early  # not computed while its weight is 0
    _assert_total_is_the_weighted_sum(module, early, step=0)
    _, later = module.train_losses(batch, step=5, with_logs=True)
    assert later["weight/tc"] == pytest.approx(0.5)
    assert {"loss/mi", "loss/tc", "loss/dwkl"} <= set(later)  # the decomposition comes whole
    parts = later["loss/mi"] + later["loss/tc"] + later["loss/dwkl"]
    assert torch.allclose(later["loss/kl"], parts, atol=1e-4)  # unclamped, they sum to the KL
    _assert_total_is_the_weighted_sum(module, later, step=5)


def test_kl_per_latent_divides_the_analytic_kl_by_the_number_of_slots():
    batch = _batch()
    per_grid = _module("loss.kl=1")
    per_slot = _module("loss.kl=1", "loss.kl_per_latent=true")
    _, grid_logs = per_grid.train_losses(batch, step=0, with_logs=True)
    _, slot_logs = per_slot.train_losses(batch, step=0, with_logs=True)
    assert torch.allclose(grid_logs["loss/kl"], 4 * slot_logs["loss/kl"], rtol=1e-5)


def test_monte_carlo_kl_is_finite_and_at_least_the_analytic_one_on_average():
    torch.manual_seed(0)
    module = _module("loss.kl=1", "loss.kl_monte_carlo=true")
    output = module(_batch(), **module.schedule_values(0))
    logits = output.encoded.quantizer.logits.detach()
    estimates = torch.stack(
        [module.latent_terms(output, {"kl": 1.0}, 0.5)[0]["kl"].detach() for _ in range(50)]
    )
    assert torch.isfinite(estimates).all()
    assert estimates.mean() >= kl_to_uniform(logits) - 0.05


def test_spatial_kl_sums_over_the_real_latents_of_each_grid_only():
    module = _module("model.layout=spatial", "model.patch_size=2", "loss.kl=1")
    batch = _batch()
    output = module(batch, **module.schedule_values(0))
    padding = output.encoded.latent_padding  # [B, P]
    assert padding.any()  # small grids on a larger canvas leave latents with no cell
    terms, _ = module.latent_terms(output, {"kl": 1.0}, 1.0)
    log_q = output.encoded.quantizer.logits.log_softmax(-1)  # [B, P, K]
    per_latent = (log_q.exp() * log_q).sum(-1) + np.log(16)  # [B, P]
    expected = (per_latent * ~padding).sum() / len(batch)
    assert torch.allclose(terms["kl"], expected, rtol=1e-5)


def test_stateful_terms_are_submodules_whose_buffers_are_checkpointed():
    module = _module("loss.tc=0.1", "loss.marginal_ema=0.9", "loss.code_usage_kl=0.1")
    state = module.state_dict()
    assert {"slot_marginals.ema", "code_usage.ema", "code_usage.num_updates"} <= set(state)
    module.train_losses(_batch(), step=0)
    assert module.slot_marginals.num_updates.item() == 1
    assert module.code_usage.num_updates.item() == 1


def test_masking_runs_in_training_only_and_logs_the_fraction(monkeypatch):
    module = _module("grids.mask_ratio=0.5")
    batch = _batch()
    _, logs = module.train_losses(batch, step=0, with_logs=True)
    assert 0.0 <= logs["train/mask_fraction"].item() <= 0.75

    def refuse(*args, **kwargs):
        raise AssertionError("validation must not mask")

    monkeypatch.setattr("pips.tasks.grids.mask_cells", refuse)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module.eval()
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("name", ["kl", "posterior_entropy", "lfq_diversity"])
def test_a_logits_term_with_fsq_is_a_config_error_naming_the_key_and_fix(name):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[f"loss.{name}=0.1", "model.quantizer.kind=fsq"])
    message = str(error.value)
    assert f"'loss.{name}'" in message
    assert "model.quantizer.kind=gumbel" in message and "fsq" in message


def test_a_weight_that_only_grows_later_is_still_checked():
    with pytest.raises(ConfigError, match="'loss.kl'"):
        load_config(overrides=["loss.kl={kind: linear, start: 0, end: 1}"])


@pytest.mark.parametrize("name", ["mi", "tc", "dwkl"])
def test_decomposition_with_the_spatial_layout_is_a_config_error(name):
    with pytest.raises(ConfigError) as error:
        load_config(
            overrides=[f"loss.{name}=0.1", "model.layout=spatial", "model.quantizer.kind=gumbel"]
        )
    message = str(error.value)
    assert f"'loss.{name}'" in message and "model.layout=pooled" in message
    assert "slots must mean the same thing" in message


def test_negative_weight_end_and_decay_of_one_are_config_errors():
    with pytest.raises(ConfigError, match="'loss.tc.end'"):
        load_config(overrides=[*TINY_POOLED_GUMBEL, "loss.tc={kind: linear, start: 1, end: -1}"])
    with pytest.raises(ConfigError, match="'loss.marginal_ema'"):
        load_config(overrides=[*TINY_POOLED_GUMBEL, "loss.tc=1", "loss.marginal_ema=1"])
    with pytest.raises(ConfigError, match="'loss.dataset_size'"):
        load_config(overrides=[*TINY_POOLED_GUMBEL, "loss.tc=1", "loss.dataset_size=4"])
