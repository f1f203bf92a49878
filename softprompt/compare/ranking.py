"""How an lr search ranks its candidates, and whether its choice sits at the edge of the lrs it tried.

Used by the search (:func:`softprompt.compare.search_lr`) and by the table, which marks a row whose chosen lr is
the lowest or highest tried (the records of searches made before the search said so hold only candidates).
"""

from __future__ import annotations

import math


def candidate_score(candidate: dict, metric: str, higher: bool) -> tuple:
    """Sort key of a candidate: a run that failed or diverged last; then the metric; ties by the lower loss."""
    value, loss = candidate.get(f"val_{metric}", math.nan), candidate.get("val_loss", math.nan)
    if "error" in candidate:  # below a diverged run: when nothing else ran, the lr that crashed is not chosen
        return (-1, 0.0, 0.0)
    if candidate["diverged"] or not math.isfinite(value):
        return (0, 0.0, 0.0)
    return (1, value if higher else -value, -loss if math.isfinite(loss) else -math.inf)


def search_edge(candidates: list[dict], metric: str | None, higher: bool = True) -> str | None:
    """``lower`` or ``upper`` when the best of ``candidates`` is the lowest or highest lr tried (an optimum the
    search has not bracketed); None when it lies between two tried lrs, or no candidate ran to a score."""
    if metric is None or len(candidates) < 2:
        return None
    best = max(candidates, key=lambda c: candidate_score(c, metric, higher))
    if candidate_score(best, metric, higher)[0] < 1:  # every candidate failed or diverged: nothing to bracket
        return None
    lrs = [c["lr"] for c in candidates]
    return "lower" if best["lr"] == min(lrs) else "upper" if best["lr"] == max(lrs) else None
