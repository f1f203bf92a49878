"""The flat-curve rule shared by compare's "converged" column and train's --stop-when-flat."""

from __future__ import annotations

import math

from softprompt.plateau import (
    CONFIRM,
    MIN_EVALS,
    convergence,
    cooldown_end,
    cooldown_factor,
    flat_now,
    last_third_gain,
)


def curve(*losses, every=10):
    return [{"step": every * (i + 1), "loss": v} for i, v in enumerate(losses)]


def test_gain_compares_the_best_loss_before_two_thirds_with_the_best_after():
    c = curve(3, 2, 1.5, 1.0, 0.9, 0.8)
    assert math.isclose(last_third_gain(c, 60), 0.2)  # ref: the best up to step 40 (1.0); best after: 0.8
    assert math.isclose(last_third_gain(c, 30), 0.25)  # at step 30: ref 2 (step 20), best 1.5
    assert last_third_gain(curve(3), 60) is None
    # a bump at the reference point is not progress: the best before 2/3 was 0.5, and so is the best after
    assert last_third_gain(curve(1.0, 0.5, 0.9, 0.8, 0.5, 0.5), 60) == 0.0
    assert math.isnan(last_third_gain(curve(1.0, float("nan"), 0.9, 0.8, 0.5, 0.5), 60))


def test_flat_now_waits_for_enough_evaluations_and_a_confirmation():
    flat = curve(*[1.0] * (MIN_EVALS + CONFIRM - 1))
    assert not flat_now(flat[:-1], 0.02) and flat_now(flat, 0.02)
    assert not flat_now(curve(3, 2, 1.5, 1.0, 0.9, 0.8, 0.7), 0.02)
    assert flat_now(curve(3, 2, 1.5, 1.0, 0.9, 0.8, 0.7), 0.5)
    # a bump at the 6th evaluation looks flat there, but the 7th falls again: no stop
    assert convergence(curve(3, 2, 1.5, 1.0, 1.2, 1.1), 60, 0.02)[0] is True
    assert not flat_now(curve(3, 2, 1.5, 1.0, 1.2, 1.1, 0.8), 0.02)
    assert flat_now(curve(3, 2, 1.5, 1.0, 1.2, 1.5, 1.6), 0.02)  # rising and staying up counts as flat
    assert not flat_now(curve(3, 2, 1.5, 1.0, float("nan"), 1.0, 1.0), 0.02)
    assert convergence(curve(3, 2, 1.5, 1.0, float("nan"), 1.0), 60, 0.02) == (False, None)


def test_the_cool_down_lasts_a_third_of_the_steps_in_whole_evaluation_intervals_and_falls_to_zero():
    assert cooldown_end(70, 10, 300) == 100  # 24 steps, rounded up to 30
    assert cooldown_end(90, 10, 300) == 120
    assert cooldown_end(14, 2, 40) == 20
    assert cooldown_end(280, 10, 300) == 300  # never past the budget
    assert cooldown_end(12, 50, 300) == 62  # at least one interval
    assert [cooldown_factor(s, 70, 100) for s in (0, 69, 70, 85, 99, 100, 120)] == [1, 1, 1, 0.5, 0.1 / 3, 0, 0]
    assert cooldown_factor(5, None, None) == 1.0 and cooldown_factor(300, 300, 300) == 0.0
