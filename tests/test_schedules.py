"""Schedules against hand-computed values: warmup, each curve's start, middle and end."""

from __future__ import annotations

import math

import pytest

from pips.schedules import SCHEDULE_KINDS, Schedule, ScheduleError


def _values(schedule: Schedule, steps: list[int]) -> list[float]:
    return [schedule(step) for step in steps]


# ----------------------------------------------------------------------------- values


def test_constant_is_the_same_at_every_step():
    assert _values(Schedule("constant", 2.5), [0, 1, 10**6]) == [2.5, 2.5, 2.5]


def test_constant_with_warmup_rises_linearly_to_start():
    # warmup 4: step s < 4 gives start * (s + 1) / 4
    schedule = Schedule("constant", 2.0, warmup=4)
    assert _values(schedule, [0, 1, 3, 4, 100]) == pytest.approx([0.5, 1.0, 2.0, 2.0, 2.0])


def test_linear_goes_from_start_to_end_and_stays():
    schedule = Schedule("linear", 1.0, 0.0, steps=10)
    assert _values(schedule, [0, 5, 10, 11, 1000]) == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0])
    assert schedule(3) == pytest.approx(0.7)


def test_linear_after_warmup_counts_steps_from_step_zero():
    # warmup 2 then a linear decay over the remaining 10 steps, reaching end at step 12
    schedule = Schedule("linear", 1.0, 0.0, steps=12, warmup=2)
    assert _values(schedule, [0, 1, 2, 7, 12, 20]) == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])


def test_cosine_is_a_half_cosine_from_start_to_end():
    schedule = Schedule("cosine", 1.0, 0.0, steps=10)
    assert _values(schedule, [0, 5, 10, 50]) == pytest.approx([1.0, 0.5, 0.0, 0.0])
    # 0.5 * (1 + cos(0.2 pi)) = 0.9045084971874737
    assert schedule(2) == pytest.approx(0.9045084971874737)
    assert schedule(8) == pytest.approx(1 - 0.9045084971874737)


def test_cosine_with_warmup_and_nonzero_end():
    schedule = Schedule("cosine", 2.0, 0.5, steps=14, warmup=4)
    # warmup: 2 * 1/4, then start at the warmup's end, midpoint (step 9) = (2 + 0.5) / 2
    assert _values(schedule, [0, 3, 4, 9, 14, 15]) == pytest.approx([0.5, 2.0, 2.0, 1.25, 0.5, 0.5])


def test_cosine_can_rise():
    schedule = Schedule("cosine", 0.0, 1.0, steps=4)
    assert _values(schedule, [0, 2, 4]) == pytest.approx([0.0, 0.5, 1.0])


def test_exponential_interpolates_geometrically():
    schedule = Schedule("exponential", 1.0, 0.01, steps=10)
    assert _values(schedule, [0, 5, 10, 20]) == pytest.approx([1.0, 0.1, 0.01, 0.01])
    assert schedule(1) == pytest.approx(0.01**0.1)


def test_exponential_with_warmup():
    schedule = Schedule("exponential", 4.0, 1.0, steps=12, warmup=2)
    # midpoint of the decay (step 7) is the geometric mean sqrt(4 * 1) = 2
    assert _values(schedule, [0, 1, 2, 7, 12]) == pytest.approx([2.0, 4.0, 4.0, 2.0, 1.0])


def test_noam_warms_up_then_decays_as_inverse_square_root():
    # 1-based step count s = step + 1: s <= 4 gives s / 4, then sqrt(4 / s)
    schedule = Schedule("noam", 1.0, warmup=4)
    assert _values(schedule, [0, 1, 3, 4, 15, 99]) == pytest.approx(
        [0.25, 0.5, 1.0, math.sqrt(4 / 5), 0.5, 0.2]
    )


def test_noam_is_floored_at_end():
    schedule = Schedule("noam", 1.0, 0.3, warmup=4)
    assert _values(schedule, [3, 15, 99, 10**6]) == pytest.approx([1.0, 0.5, 0.3, 0.3])


def test_noam_without_warmup_starts_at_start():
    schedule = Schedule("noam", 1.0)
    assert _values(schedule, [0, 3, 99]) == pytest.approx([1.0, 0.5, 0.1])


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_each_curve_starts_at_start_and_ends_at_end(kind):
    schedule = Schedule(kind, 3.0, 0.75, steps=20, warmup=5)
    assert schedule(5) == pytest.approx(3.0)
    assert schedule(20) == pytest.approx(0.75)
    assert schedule(1000) == pytest.approx(0.75)
    middle = schedule(12)
    assert 0.75 < middle < 3.0


def test_end_none_means_end_equals_start():
    assert _values(Schedule("cosine", 0.7, steps=10), [0, 5, 10]) == pytest.approx([0.7] * 3)


# ----------------------------------------------------------------------------- parse, resolve


def test_parse_number_is_a_constant():
    assert Schedule.parse(3) == Schedule("constant", 3.0)
    assert isinstance(Schedule.parse(3).start, float)
    assert Schedule.parse(0.25)(1000) == 0.25


def test_parse_mapping_fills_the_given_fields():
    schedule = Schedule.parse({"kind": "cosine", "start": 1, "end": 0, "steps": 10.0})
    assert schedule == Schedule("cosine", 1.0, 0.0, 10, 0)
    assert isinstance(schedule.steps, int)


def test_parse_returns_a_schedule_unchanged():
    schedule = Schedule("linear", 1.0, 0.0, 5)
    assert Schedule.parse(schedule) is schedule


def test_to_config_then_parse_round_trips():
    for schedule in [
        Schedule("constant", 2.0),
        Schedule("noam", 1.0, 0.1, None, 8),
        Schedule("cosine", 1.0, None, 30, 2),
        Schedule("constant", 1.0, warmup=3),
    ]:
        assert Schedule.parse(schedule.to_config()) == schedule
    assert Schedule("constant", 2.0).to_config() == 2.0


def test_resolve_fills_open_steps_only():
    open_ended = Schedule("cosine", 1.0, 0.0)
    resolved = open_ended.resolve(100)
    assert resolved.steps == 100
    assert resolved(50) == pytest.approx(0.5)
    assert resolved(100) == pytest.approx(0.0)
    fixed = Schedule("cosine", 1.0, 0.0, steps=10)
    assert fixed.resolve(100) is fixed


@pytest.mark.parametrize(
    "value, words",
    [
        ({"kind": "cosin", "start": 1}, ["kind", "cosine", "'cosin'"]),
        ({"kind": "cosine", "strat": 1}, ["strat", "allowed", "start"]),
        ({"start": "fast"}, ["'start'", "number", "'fast'"]),
        ({"start": 1, "steps": 2.5}, ["'steps'", "whole number"]),
        ({"start": 1, "warmup": -1}, ["warmup", ">= 0"]),
        ({"start": 1, "steps": -3}, ["steps", ">= 0"]),
        ({"kind": "exponential", "start": 0.0, "end": 1.0}, ["exponential", "> 0"]),
        (True, ["boolean"]),
        ("fast", ["number or a mapping", "'fast'"]),
        ([1, 2], ["number or a mapping"]),
    ],
)
def test_bad_schedule_gives_a_sentence_naming_the_problem(value, words):
    with pytest.raises(ScheduleError) as info:
        Schedule.parse(value)
    message = str(info.value)
    for word in words:
        assert word in message


def test_every_kind_is_accepted():
    for kind in SCHEDULE_KINDS:
        assert Schedule(kind, 1.0, 0.5, 10)(0) > 0
