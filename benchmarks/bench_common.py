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


def time_side_by_side(ours: Callable[[], object], peft: Callable[[], object], repeats: int,
                      dev: torch.device) -> tuple[float, float, object, object]:
    """Run ``ours()`` then ``peft()`` ``repeats`` times, interleaved so both see the same machine state.

    Returns:
        Median seconds of ours and of PEFT, and the last result of each.
    """
    times: tuple[list[float], list[float]] = ([], [])
    last: list[object] = [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((ours, peft)):
            sync(dev)
            t0 = time.perf_counter()
            last[k] = fn()
            sync(dev)
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1]), last[0], last[1]


def label_agreement(reqs: list, results: list, peft_preds: dict[str, list[str]]) -> float:
    """Share of requests whose engine label equals PEFT's; ``peft_preds`` is task -> labels in request order."""
    ours: dict[str, list[str]] = {task: [] for task in peft_preds}
    for req, res in zip(reqs, results, strict=True):
        ours[req.task].append(res.label)
    return sum(a == b for t in peft_preds for a, b in zip(ours[t], peft_preds[t], strict=True)) / len(reqs)
