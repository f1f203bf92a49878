"""Paired comparisons of two classifiers on the same examples (softprompt.stats)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from softprompt.evaluate import macro_f1
from softprompt.stats import compare_predictions, mcnemar_p, paired_bootstrap


def preds(pairs):
    return [SimpleNamespace(expected=e, predicted=p) for e, p in pairs]


def test_compare_predictions_counts_the_disagreements_and_scores_both_sides():
    a = preds([("x", "x"), ("y", "x"), ("x", "y"), ("y", "y"), ("x", "x")])
    b = preds([("x", "x"), ("y", "y"), ("x", "x"), ("y", "y"), ("x", "y")])
    c = compare_predictions(a, b, ["x", "y"], rounds=200)
    assert c["n"] == 5 and (c["only_a_right"], c["only_b_right"]) == (1, 2)
    assert c["a"]["accuracy"] == pytest.approx(3 / 5) and c["b"]["accuracy"] == pytest.approx(4 / 5)
    assert c["mcnemar_p"] == mcnemar_p(2, 1) == 1.0
    want = macro_f1(["x", "y", "x", "y", "x"], ["x", "y", "x", "y", "y"], ["x", "y"]) - macro_f1(
        ["x", "y", "x", "y", "x"], ["x", "x", "y", "y", "x"], ["x", "y"])
    assert c["macro_f1_diff"]["diff"] == pytest.approx(want)
    assert c["b"]["macro_f1"] - c["a"]["macro_f1"] == pytest.approx(want)
    with pytest.raises(ValueError, match="not of the same examples"):
        compare_predictions(a, b[1:] + b[:1], ["x", "y"])
    with pytest.raises(ValueError, match="not of the same examples"):
        compare_predictions(a, b[:4], ["x", "y"])


def test_the_bootstrap_resamples_both_sides_on_the_same_examples():
    """b is a + 1 on every example: each paired resample shows exactly +1, an unpaired one would not."""
    values = [float(i % 7) for i in range(50)]

    def mean(offset):
        return lambda idx: sum(values[i] + offset for i in idx) / len(idx)

    got = paired_bootstrap(mean(0.0), mean(1.0), 50, rounds=300)
    assert got["diff"] == pytest.approx(1.0) and got["low"] == pytest.approx(1.0) and got["high"] == pytest.approx(1.0)
    assert got["p"] == 0.0  # no resample at or below 0: p < 2 / rounds
    assert paired_bootstrap(mean(0.0), mean(1.0), 0) == {"diff": None, "low": None, "high": None, "p": None}
    same = paired_bootstrap(mean(0.0), mean(0.0), 50, rounds=100)
    assert (same["diff"], same["p"]) == (0.0, 1.0)
