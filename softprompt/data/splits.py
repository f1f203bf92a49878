"""Seeded held-out splits carved out of one collection by content: equal items always land on one side.

A split made by position puts the copies of a duplicated record on both sides of it, so a held-out number
partly measures recall of training examples. :func:`carve` shuffles the *distinct* items (seeded) and moves
every copy of one with it. Without duplicates it takes exactly what a shuffle of the positions took with the
same seed, so splits recorded before keep their members.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence


def carve(keys: Sequence[Hashable], sizes: Sequence[int], seed: str,
          strata: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Indices of each held-out part, then of the rest, each in the original order.

    Args:
        keys: one per item; items with equal keys (copies) go to the same part.
        sizes: how many items each held-out part should get. Copies move together, so a part gets as many
            as fit without going over, and at least one group of copies when none fits.
        seed: seeds the order in which the distinct items are taken.
        strata: one per item (a label): each part takes from every stratum in proportion to its share of all
            items (largest remainder), so the parts keep the label mix. Copies must share their stratum.

    Returns:
        ``len(sizes) + 1`` index lists: the parts in the order of ``sizes``, then every item not taken.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    pool = list(groups.values())
    random.Random(seed).shuffle(pool)
    if strata is None:
        pools = {None: pool}
        quotas = [{None: size} for size in sizes]
    else:
        pools = {}
        for group in pool:
            pools.setdefault(strata[group[0]], []).append(group)
        counts = {s: sum(len(g) for g in gs) for s, gs in pools.items()}
        quotas = [_apportion(size, counts) for size in sizes]
    parts: list[list[int]] = []
    for quota in quotas:
        part: list[int] = []
        for stratum, want in quota.items():
            part += _take(pools[stratum], want)
        if not part and any(quota.values()):  # every group left is larger than the part: take the first one
            left = [gs for gs in pools.values() if gs]
            if left:
                part += left[0].pop(0)
        parts.append(sorted(part))
    parts.append(sorted(i for gs in pools.values() for g in gs for i in g))
    return parts


def _take(pool: list[list[int]], want: int) -> list[int]:
    """Remove from ``pool`` (in its order) the groups that fit in ``want`` items; their indices."""
    taken: list[int] = []
    kept: list[list[int]] = []
    for group in pool:
        if len(taken) + len(group) <= want:
            taken += group
        else:
            kept.append(group)
    pool[:] = kept
    return taken


def _apportion(total: int, counts: dict) -> dict:
    """``total`` shared among ``counts``'s keys in proportion to their counts (largest remainder; ties in key
    order)."""
    n = sum(counts.values())
    exact = {k: total * c / n for k, c in counts.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[:total - sum(out.values())]:
        out[k] += 1
    return out
