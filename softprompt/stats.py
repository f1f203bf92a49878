"""Paired comparisons of two predictors on the same examples.

Accuracy is a mean over examples of right or wrong, so two predictors' accuracies on the same examples are
compared by McNemar's exact test over the examples where exactly one of them is right. Macro-F1 is not a sum
over examples: its difference gets a paired bootstrap (the same resampled examples for both sides).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

BOOTSTRAP_ROUNDS = 2000


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: ``b`` and ``c`` count the two kinds of disagreement (only the first
    predictor right, only the second right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(score_a: Callable[[list[int]], float], score_b: Callable[[list[int]], float], n: int,
                     rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict:
    """The bootstrap of ``score_b - score_a`` over ``n`` paired examples: each resample draws ``n`` example
    indices with replacement and scores both sides on the same ones (``score_x(indices)``).

    Returns:
        ``{"diff", "low", "high", "p"}``: the observed difference, its 95% percentile interval and a two-sided p
        (twice the share of resamples on the other side of 0 from the observed difference, at most 1; 0 when no
        resample was: below ``2 / rounds``). ``None`` values for ``n`` 0.
    """
    if n == 0:
        return {"diff": None, "low": None, "high": None, "p": None}
    everything = list(range(n))
    observed = score_b(everything) - score_a(everything)
    rng = random.Random(seed)
    diffs = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(score_b(idx) - score_a(idx))
    diffs.sort()
    other_side = sum(d <= 0 for d in diffs) if observed > 0 else sum(d >= 0 for d in diffs)
    return {"diff": observed, "low": diffs[int(0.025 * rounds)], "high": diffs[int(0.975 * rounds) - 1],
            "p": min(1.0, 2 * other_side / rounds)}


def compare_predictions(a: list, b: list, labels: list[str], rounds: int = BOOTSTRAP_ROUNDS) -> dict:
    """Two classifiers' predictions on the same examples (``.expected``/``.predicted``, in the same order):
    each one's accuracy and macro-F1, the examples only one of them got right, McNemar's p for the accuracy
    difference and the paired bootstrap of the macro-F1 difference (b - a)."""
    from softprompt.evaluate import macro_f1

    if len(a) != len(b) or any(x.expected != y.expected for x, y in zip(a, b, strict=False)):
        raise ValueError("the two predictions are not of the same examples in the same order")

    def f1(preds: list) -> Callable[[list[int]], float]:
        return lambda idx: macro_f1([preds[i].expected for i in idx], [preds[i].predicted for i in idx], labels)

    right_a = [p.predicted == p.expected for p in a]
    right_b = [p.predicted == p.expected for p in b]
    only_a = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    only_b = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    n = len(a)
    side = {name: {"accuracy": sum(r) / n if n else None, "macro_f1": f1(p)(list(range(n))) if n else None}
            for name, r, p in (("a", right_a, a), ("b", right_b, b))}
    return {"n": n, **side, "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": mcnemar_p(only_b, only_a),
            "macro_f1_diff": paired_bootstrap(f1(a), f1(b), n, rounds)}
