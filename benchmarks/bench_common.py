"""Helpers the side-by-side benchmarks share (imported by the scripts beside it, run as ``python benchmarks/X.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(dev: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer stops after it (no-op elsewhere)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: list[Callable[[], object]], repeats: int, dev: torch.device) -> list[float]:
    """Median seconds of each function, run in turn ``repeats`` times so all see the same machine state."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def time_side_by_side(ours: Callable[[], object], peft: Callable[[], object], repeats: int,
                      dev: torch.device) -> tuple[float, float, object, object]:
    """Run ``ours()`` then ``peft()`` ``repeats`` times, interleaved so both see the same machine state.

    Returns:
        Median seconds of ours and of PEFT, and the last result of each.
    """
    last: list[object] = [None, None]

    def keep(k: int, fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: last.__setitem__(k, fn())

    o, p = time_interleaved([keep(0, ours), keep(1, peft)], repeats, dev)
    return o, p, last[0], last[1]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank (with 50 values or fewer, p99 is the largest)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def label_agreement(reqs: list, results: list, peft_preds: dict[str, list[str]]) -> float:
    """Share of requests whose engine label equals PEFT's; ``peft_preds`` is task -> labels in request order."""
    ours: dict[str, list[str]] = {task: [] for task in peft_preds}
    for req, res in zip(reqs, results, strict=True):
        ours[req.task].append(res.label)
    return sum(a == b for t in peft_preds for a, b in zip(ours[t], peft_preds[t], strict=True)) / len(reqs)
