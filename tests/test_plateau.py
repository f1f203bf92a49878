"""The flat-curve rule shared by compare's "converged" column and train's --stop-when-flat."""

from __future__ import annotations

import math

from softprompt.plateau import MIN_EVALS, convergence, flat_now, last_third_gain


def curve(*losses, every=10):
    return [{"step": every * (i + 1), "loss": v} for i, v in enumerate(losses)]


def test_gain_compares_the_last_point_before_two_thirds_with_the_best_after():
    c = curve(3, 2, 1.5, 1.0, 0.9, 0.8)
    assert math.isclose(last_third_gain(c, 60), 0.2)  # ref: step 40 (1.0); best after: 0.8
    assert math.isclose(last_third_gain(c, 30), 0.25)  # at step 30: ref step 20 (2), best 1.5
    assert last_third_gain(curve(3), 60) is None


def test_flat_now_waits_for_enough_evaluations_then_applies_the_rule():
    flat = curve(*[1.0] * MIN_EVALS)
    assert not flat_now(flat[:-1], 0.02) and flat_now(flat, 0.02)
    assert not flat_now(curve(3, 2, 1.5, 1.0, 0.9, 0.8), 0.02)
    assert flat_now(curve(3, 2, 1.5, 1.0, 0.9, 0.8), 0.25)
    assert flat_now(curve(3, 2, 1.5, 1.0, 1.2, 1.5), 0.02)  # rising again counts as flat
    assert not flat_now(curve(3, 2, 1.5, 1.0, float("nan"), 1.0), 0.02)
    assert convergence(curve(3, 2, 1.5, 1.0, float("nan"), 1.0), 60, 0.02) == (False, None)
