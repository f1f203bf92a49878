"""Every finished run of a comparison, written down as it ends, so that ``--resume`` continues inside a row.

A row is 3 lr-search runs and 3 seed runs, 5 to 25 minutes on 2 CPU cores; ``compare.json`` gets a row only when
all of them are done, so an interrupted comparison lost the runs of its unfinished row. The journal
(``runs.jsonl`` beside ``compare.json``) gets one line per successful run, ``{"job": ..., "run": ...}``, appended
and flushed to disk when the run ends. ``--resume`` takes a run from it when the job is exactly the same (every
field of :class:`~softprompt.compare.run.Job`: method definition, model, data, budget, lr, seed, schedule) and
its curve is in the comparison's validation metric, and runs the others. A failed run is not written: it runs
again. A line cut short by a kill is dropped.

The metric is checked on the run, not keyed: lines written before jobs named it hold ``auto``'s choice of the
time, and ``auto`` became macro-F1 on a skewed validation split later. A run resumed under ``auto`` with its
seeds journalled as accuracy runs became a row of accuracy and macro-F1 curves, whose mean curve failed. A run's
curve records every validation metric its task measures (accuracy and macro-F1, or exact match and F1), and its
test macro-F1 beside accuracy, so a journalled run serves a comparison ranked by any of them (:func:`serves`);
a run written when curves held only the run's own metric serves that metric only, and runs again for another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from softprompt.compare.run import Job

JOURNAL = "runs.jsonl"


def job_key(job: Job) -> str:
    """The identity of a run: its job's every field but ``metric`` (checked on the run, see the module), as
    canonical JSON."""
    data = json.loads(job.to_json())
    data.pop("metric", None)
    return json.dumps(data, sort_keys=True)


def serves(run: dict, job: Job) -> bool:
    """Whether the journalled ``run`` answers ``job`` in its metric: every point of its validation curve records
    it, and a seed run (one with test examples) ranked by macro-F1 has its test macro-F1 too."""
    if job.metric == "auto":  # a job from before the metric was resolved once per comparison
        return True
    if any(job.metric not in point for point in run.get("curve", [])):
        return False
    return not (job.metric == "macro_f1" and job.test_samples and run.get("macro_f1") is None)


def _read(path: Path) -> tuple[dict[str, dict], list[str]]:
    """The runs of a journal by job key, and its whole lines (a line cut short or not a run is left out)."""
    runs, lines = {}, []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return runs, lines
    for line in text.splitlines(keepends=True):
        try:
            entry = json.loads(line) if line.endswith("\n") else None
            key = job_key(Job.from_json(json.dumps(entry["job"])))
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(entry.get("run"), dict) and "error" not in entry["run"]:
            runs[key] = entry["run"]
            lines.append(line)
    return runs, lines


class RunJournal:
    """``out_dir/runs.jsonl``: with ``resume``, its runs are reused (a line a kill cut short is dropped from the
    file first); without, it starts empty."""

    def __init__(self, out_dir: Path, resume: bool):
        self.path = out_dir / JOURNAL
        self.done: dict[str, dict] = {}
        lines: list[str] = []
        if resume:
            self.done, lines = _read(self.path)
        if lines or self.path.exists():  # rewritten whole (atomically): appends never follow a cut line
            tmp = self.path.with_name(f".{JOURNAL}.tmp")
            tmp.write_text("".join(lines))
            os.replace(tmp, self.path)

    def wrap(self, runner: Callable[[Job], dict], log=print) -> Callable[[Job], dict]:
        """``runner`` that answers a job the journal holds from it, and writes down each new successful run."""

        def run(job: Job) -> dict:
            key = job_key(job)
            kept = self.done.get(key)
            if kept is not None and not serves(kept, job):
                log(f"  {job.spec.label}: lr {job.lr:.3g}, seed {job.seed}, {job.steps} steps: journalled with a "
                    f"validation {kept.get('metric')} curve, this comparison's metric is {job.metric}: run again")
            elif kept is not None:
                log(f"  {job.spec.label}: lr {job.lr:.3g}, seed {job.seed}, {job.steps} steps: kept from "
                    f"{self.path} (--resume)")
                run = json.loads(json.dumps(kept))  # a copy: the caller adds to its run dicts
                if job.metric != "auto":  # ranked and reported in this comparison's metric, which its curve holds
                    run.update(metric=job.metric, higher_is_better=job.metric != "loss")
                return run
            result = runner(job)
            if "error" not in result:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"job": json.loads(key), "run": result}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            return result

        return run
