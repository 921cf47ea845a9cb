"""Typed config: defaults, YAML presets, key=value overrides, error sentences, round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pips.config import (
    QUANTIZER_KINDS,
    Config,
    ConfigError,
    describe_options,
    load_config,
    save_config,
    to_dict,
)
from pips.schedules import Schedule

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def _leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        is_section = isinstance(value, dict) and not set(value) <= {
            "kind",
            "start",
            "end",
            "steps",
            "warmup",
        }
        keys.extend(_leaf_keys(value, full) if is_section else [full])
    return keys


# ----------------------------------------------------------------------------- loading


def test_defaults_load_without_a_file():
    config = load_config()
    assert config == Config()
    assert config.model.quantizer.kind == "fsq"
    assert config.optim.lr == Schedule("cosine", 1e-3, 1e-5, None, 100)
    assert config.data.max_samples is None


def test_yaml_preset_merges_over_defaults_and_keeps_the_rest():
    config = load_config(TINY_CONFIG)
    assert config.model.width == 32
    assert config.model.quantizer.levels == [5, 5, 5]
    assert config.trainer.max_steps == 30
    # keys the preset does not set keep their defaults, even inside a section it touches
    assert config.model.layout == Config().model.layout
    assert config.model.quantizer.codebook_size == Config().model.quantizer.codebook_size
    assert config.optim == Config().optim


def test_yaml_preset_reads_exponent_numbers_and_schedule_mappings(tmp_path):
    path = tmp_path / "preset.yaml"
    # YAML 1.1 reads 1e-3 (no dot) as a string; the config still takes it as a number
    path.write_text(
        "optim:\n  eps: 1e-6\n  lr: {kind: linear, start: 3e-4, end: 0, steps: 50}\n"
        "model:\n  quantizer:\n    temperature: 0.5\n"
    )
    config = load_config(path)
    assert config.optim.eps == pytest.approx(1e-6)
    assert config.optim.lr == Schedule("linear", 3e-4, 0.0, 50, 0)
    assert config.model.quantizer.temperature == Schedule("constant", 0.5)


@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("model.width=256", lambda c: c.model.width, 256),
        ("optim.eps=1e-3", lambda c: c.optim.eps, 1e-3),
        ("optim.weight_decay=0.5", lambda c: c.optim.weight_decay, 0.5),
        ("optim.weight_decay=1", lambda c: c.optim.weight_decay, 1.0),
        ("grids.eos=false", lambda c: c.grids.eos, False),
        ("grids.eos=True", lambda c: c.grids.eos, True),
        ("optim.grad_clip=null", lambda c: c.optim.grad_clip, None),
        ("data.max_samples=12", lambda c: c.data.max_samples, 12),
        ("model.quantizer.levels=[4,4]", lambda c: c.model.quantizer.levels, [4, 4]),
        ("model.quantizer.levels=4,4,3", lambda c: c.model.quantizer.levels, [4, 4, 3]),
        ("model.quantizer.kind=vq", lambda c: c.model.quantizer.kind, "vq"),
        ("trainer.precision=32", lambda c: c.trainer.precision, "32"),
        ("name=123", lambda c: c.name, "123"),
    ],
)
def test_override_parses_the_value_as_the_keys_type(override, get, expected):
    value = get(load_config(overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


def test_override_of_a_schedule_sub_key_keeps_the_other_fields():
    config = load_config(overrides=["optim.lr.end=1e-5", "optim.lr.warmup=7"])
    assert config.optim.lr == Schedule("cosine", 1e-3, 1e-5, None, 7)


def test_override_replaces_a_whole_schedule_by_a_number():
    config = load_config(overrides=["optim.lr=0.01"])
    assert config.optim.lr == Schedule("constant", 0.01)


def test_override_turns_a_constant_schedule_into_a_curve_through_sub_keys():
    config = load_config(
        overrides=["model.quantizer.noise_scale.kind=linear", "model.quantizer.noise_scale.end=0"]
    )
    assert config.model.quantizer.noise_scale == Schedule("linear", 1.0, 0.0)


def test_override_wins_over_the_preset():
    config = load_config(TINY_CONFIG, ["model.width=48", "model.quantizer.levels=[3,3]"])
    assert config.model.width == 48
    assert config.model.quantizer.levels == [3, 3]
    assert config.model.heads == 2  # from the preset


def test_override_with_a_mapping_merges_into_a_section():
    config = load_config(overrides=["model.quantizer={kind: vq, codebook_size: 64}"])
    assert config.model.quantizer.kind == "vq"
    assert config.model.quantizer.codebook_size == 64
    assert config.model.quantizer.levels == Config().model.quantizer.levels


# ----------------------------------------------------------------------------- errors


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_unknown_key_names_the_full_path_the_allowed_keys_and_a_suggestion():
    message = _error(["model.quantizer.kindd=vq"])
    assert "'model.quantizer.kindd'" in message
    assert "did you mean 'model.quantizer.kind'" in message
    for key in ("kind", "codebook_size", "levels", "temperature"):
        assert key in message


def test_unknown_top_level_key_is_named():
    message = _error(["modle.width=3"])
    assert "'modle.width'" in message or "'modle'" in message
    assert "model" in message


def test_unknown_key_in_a_yaml_preset_names_the_full_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  quantizer:\n    bogus: 1\n")
    message = _error(path=path)
    assert "'model.quantizer.bogus'" in message


def test_wrong_choice_names_the_key_and_every_allowed_value():
    message = _error(["model.quantizer.kind=vqq"])
    assert "'model.quantizer.kind'" in message
    assert "'vqq'" in message
    for kind in QUANTIZER_KINDS:
        assert kind in message


@pytest.mark.parametrize(
    "override, path, allowed",
    [
        ("trainer.max_steps=abc", "trainer.max_steps", "integer"),
        ("model.width=1.5", "model.width", "integer"),
        ("trainer.max_steps=true", "trainer.max_steps", "integer"),
        ("grids.eos=maybe", "grids.eos", "true or false"),
        ("optim.eps=small", "optim.eps", "number"),
        ("model.quantizer.levels=[4,x]", "model.quantizer.levels", "integer"),
        ("optim.lr=fast", "optim.lr", "number or a mapping"),
        ("optim.lr.kind=bogus", "optim.lr", "cosine"),
        ("optim.lr.steps=2.5", "optim.lr", "whole number"),
    ],
)
def test_wrong_type_names_the_key_path_and_what_is_allowed(override, path, allowed):
    message = _error([override])
    assert f"'{path}" in message
    assert allowed in message


@pytest.mark.parametrize(
    "override, path, bound",
    [
        ("trainer.max_steps=0", "trainer.max_steps", ">= 1"),
        ("grids.val_fraction=2", "grids.val_fraction", "<= 1"),
        ("model.dropout=-0.1", "model.dropout", ">= 0"),
        ("data.max_samples=0", "data.max_samples", ">= 1"),
        ("model.patch_size=31", "model.patch_size", "<= 30"),
    ],
)
def test_out_of_range_value_names_the_key_path_and_the_bound(override, path, bound):
    message = _error([override])
    assert f"'{path}'" in message
    assert bound in message


def test_sub_key_of_a_plain_value_is_refused_with_the_path():
    message = _error(["model.width.inner=3"])
    assert "'model.width'" in message


def test_override_without_equals_sign_is_refused():
    message = _error(["model.width"])
    assert "key.sub=value" in message


def test_missing_config_file_is_a_config_error(tmp_path):
    message = _error(path=tmp_path / "missing.yaml")
    assert "missing.yaml" in message


# ----------------------------------------------------------------------------- round trip


def test_save_then_load_round_trips_every_value(tmp_path):
    config = load_config(
        TINY_CONFIG,
        [
            "name=roundtrip",
            "optim.lr.end=1e-5",
            "optim.lr.steps=40",
            "optim.grad_clip=null",
            "model.quantizer.temperature={kind: exponential, start: 2, end: 0.1, warmup: 3}",
            "model.quantizer.hardness=0.5",
            "data.max_samples=17",
            "trainer.max_minutes=1.5",
            "model.quantizer.dim=12",
            "trainer.precision=bf16-mixed",
            "optim.eps=1e-8",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert to_dict(loaded) == to_dict(config)
    assert loaded == config
    # the file is plain YAML: numbers are numbers, schedules are numbers or mappings
    raw = yaml.safe_load(path.read_text())
    assert raw["model"]["quantizer"]["hardness"] == 0.5
    assert raw["optim"]["lr"]["kind"] == "cosine"


def test_describe_options_lists_every_leaf_key_once_with_its_default():
    rows = describe_options()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert keys == _leaf_keys(to_dict(Config(), every_section=True))
    described = dict((key, (default, text)) for key, default, text in rows)
    assert "model.quantizer.kind" in described
    assert described["model.quantizer.kind"][0] == "fsq"
    assert ", ".join(QUANTIZER_KINDS) in described["model.quantizer.kind"][1]
    assert described["trainer.max_steps"][0] == "2000"
    assert all(text for _, _, text in rows), "every option has help text"


def test_every_dataclass_field_has_help_text():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default) and not isinstance(default, Schedule):
                walk(type(default))

    walk(Config)


@pytest.mark.parametrize("heads", [3, 16])
def test_heads_that_do_not_fit_the_width_are_a_config_error(heads):
    # width 32: 3 heads do not divide it; 16 heads leave head_dim 2, which 2D RoPE cannot split
    message = _error([f"model.heads={heads}"], path=TINY_CONFIG)
    assert "'model.heads'" in message
    assert "model.width" in message


def test_interpolations_resolve_against_the_merged_config(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("trainer:\n  val_every: 100\n  image_every: ${trainer.val_every}\n")
    assert load_config(path).trainer.image_every == 100
    # resolved after the overrides: the override of val_every moves image_every with it
    assert load_config(path, ["trainer.val_every=40"]).trainer.image_every == 40
    config = load_config(overrides=["model.quantizer.dim=${model.width}", "model.width=64"])
    assert config.model.quantizer.dim == 64


def test_an_interpolation_that_names_no_key_is_a_config_error():
    message = _error(["trainer.image_every=${trainer.nothing}"])
    assert "'trainer.image_every'" in message and "interpolation" in message
