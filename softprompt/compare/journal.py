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

A larger budget (``--steps``, a row's ``steps_scale``) changes every seed run's job, but not every run: one that
stopped at the end of its plateau's cool-down before its budget, and whose lr at every step it trained is the
same under the new budget (under ``wsd`` the cool-down replaces the decay, so the budget never acted on it;
under ``linear`` the decay depends on it from the first step), trained exactly what the new job would train.
Such a run is taken for the new job (:func:`same_run`), with its ``steps`` set to the new budget; a run that
reached its budget, or one whose schedule differs, runs again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from softprompt.compare.run import Job, train_args
from softprompt.plateau import cooldown_end, cooldown_factor
from softprompt.schedule import lr_lambda, with_cooldown

JOURNAL = "runs.jsonl"


def job_key(job: Job) -> str:
    """The identity of a run: its job's every field but ``metric`` (checked on the run, see the module), as
    canonical JSON."""
    data = json.loads(job.to_json())
    data.pop("metric", None)
    return json.dumps(data, sort_keys=True)


def budget_free_key(job: Job) -> str:
    """:func:`job_key` without the budget (``steps`` and the spec's ``steps_scale``, which only scales it)."""
    data = json.loads(job_key(job))
    data.pop("steps")
    data["spec"].pop("steps_scale", None)
    return json.dumps(data, sort_keys=True)


def _lr_factors(job: Job, flat_step: int, upto: int) -> list[float]:
    """The lr multiplier of each optimizer step before ``upto`` of a ``job`` run whose validation loss was flat
    at ``flat_step`` (the training loop's schedule with the plateau's cool-down, as it applies them)."""
    args = train_args(job, "")
    schedule, stop_at = lr_lambda(args, job.steps), cooldown_end(flat_step, args.eval_every, job.steps)
    return [with_cooldown(args, schedule(s), cooldown_factor(s, flat_step, stop_at)) for s in range(upto + 1)]


def same_run(run: dict, old: Job, new: Job) -> bool:
    """Whether ``run``, journalled for ``old``, is exactly the run ``new`` trains: the same job but for its budget
    (:func:`budget_free_key`); the run stopped at the end of its plateau's cool-down, which ends at the same step
    under both budgets (not cut by either); and every step it trained had the same lr under both schedules."""
    flat, ran = run.get("flat_step"), run.get("steps_run")
    if flat is None or ran is None or run.get("diverged") or budget_free_key(old) != budget_free_key(new):
        return False
    if ran != cooldown_end(flat, old.eval_every or old.steps, old.steps) \
            or ran != cooldown_end(flat, new.eval_every or new.steps, new.steps):
        return False
    return _lr_factors(old, flat, ran) == _lr_factors(new, flat, ran)


def serves(run: dict, job: Job) -> bool:
    """Whether the journalled ``run`` answers ``job`` in its metric: every point of its validation curve records
    it, and a seed run (one with test examples) ranked by macro-F1 has its test macro-F1 too."""
    if job.metric == "auto":  # a job from before the metric was resolved once per comparison
        return True
    if any(job.metric not in point for point in run.get("curve", [])):
        return False
    return not (job.metric == "macro_f1" and job.test_samples and run.get("macro_f1") is None)


def _read(path: Path) -> tuple[dict[str, dict], dict[str, list[tuple[Job, dict]]], list[str]]:
    """The runs of a journal by job key, its jobs and runs by :func:`budget_free_key`, and its whole lines (a line
    cut short or not a run is left out)."""
    runs, by_budget, lines = {}, {}, []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return runs, by_budget, lines
    for line in text.splitlines(keepends=True):
        try:
            entry = json.loads(line) if line.endswith("\n") else None
            job = Job.from_json(json.dumps(entry["job"]))
            key = job_key(job)
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(entry.get("run"), dict) and "error" not in entry["run"]:
            runs[key] = entry["run"]
            by_budget.setdefault(budget_free_key(job), []).append((job, entry["run"]))
            lines.append(line)
    return runs, by_budget, lines


class RunJournal:
    """``out_dir/runs.jsonl``: with ``resume``, its runs are reused (a line a kill cut short is dropped from the
    file first); without, it starts empty."""

    def __init__(self, out_dir: Path, resume: bool):
        self.path = out_dir / JOURNAL
        self.done: dict[str, dict] = {}
        self.by_budget: dict[str, list[tuple[Job, dict]]] = {}  # for a job with another budget (same_run)
        lines: list[str] = []
        if resume:
            self.done, self.by_budget, lines = _read(self.path)
        if lines or self.path.exists():  # rewritten whole (atomically): appends never follow a cut line
            tmp = self.path.with_name(f".{JOURNAL}.tmp")
            tmp.write_text("".join(lines))
            os.replace(tmp, self.path)

    def other_budget(self, job: Job) -> tuple[Job, dict] | None:
        """A journalled run of ``job`` under another budget that is the same run (:func:`same_run`), if any."""
        return next(((old, run) for old, run in self.by_budget.get(budget_free_key(job), [])
                     if serves(run, job) and same_run(run, old, job)), None)

    def wrap(self, runner: Callable[[Job], dict], log=print) -> Callable[[Job], dict]:
        """``runner`` that answers a job the journal holds from it, and writes down each new successful run."""

        def run(job: Job) -> dict:
            key = job_key(job)
            kept, why = self.done.get(key), f"kept from {self.path} (--resume)"
            twin = self.other_budget(job) if kept is None else None
            if twin is not None:  # the same run under another budget: recorded with this one
                old, kept = twin[0], {**twin[1], "steps": job.steps}
                why += (f": its {old.steps}-step run stopped at step {kept['steps_run']}, after the cool-down of its "
                        f"plateau at {kept['flat_step']}, with the lr this budget gives every step it trained")
            if kept is not None and not serves(kept, job):
                log(f"  {job.spec.label}: lr {job.lr:.3g}, seed {job.seed}, {job.steps} steps: journalled with a "
                    f"validation {kept.get('metric')} curve, this comparison's metric is {job.metric}: run again")
            elif kept is not None:
                log(f"  {job.spec.label}: lr {job.lr:.3g}, seed {job.seed}, {job.steps} steps: {why}")
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
