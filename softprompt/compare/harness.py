"""A row of the comparison: search its lr on validation, train its seeds, summarise them; then the whole table."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from softprompt.compare.ensemble import Evaluator, method_slug, store_seed_ensemble
from softprompt.compare.journal import RunJournal
from softprompt.compare.ranking import candidate_score, search_edge
from softprompt.compare.report import convergence, format_row, format_table, mean_curve, plot_compare, plot_curves
from softprompt.compare.run import WARMUP_STEPS, Job, run_in_subprocess, selection_metric
from softprompt.compare.specs import WEIGHT_KINDS, CompareSettings, Spec, lr_at
from softprompt.schedule import wsd_decay_start

Runner = Callable[[Job], dict]


def _candidate(lr: float, run: dict) -> dict:
    """What the search keeps of one candidate's run: its last validation point, or its error."""
    if "error" in run:
        return {"lr": lr, "error": run["error"]}
    last = run["curve"][-1] if run["curve"] else {}
    # the guard's events where the run recorded them (journalled runs from before they were kept have none: no key)
    events = {"events": run["events"]} if "events" in run else {}
    return {"lr": lr, "val_loss": last.get("loss", math.nan), f"val_{run['metric']}": last.get(run["metric"],
            math.nan), "rollbacks": run["rollbacks"], "diverged": run["diverged"], "train_s": run["train_s"], **events}


def _outcome(run: dict) -> str:
    """One search candidate's result as the progress line shows it."""
    if "error" in run:
        return f"failed: {run['error']}"
    if not run["curve"]:  # the guard ended it before its only validation point (after its last step)
        return f"diverged at step {run.get('steps_run', '?')} ({run['rollbacks']} rollbacks), never validated"
    last = run["curve"][-1]
    return (f"validation {run['metric']} {last[run['metric']]:.4f}, loss {last['loss']:.4f}"
            + (" (diverged)" if run["diverged"] else ""))


def search_lr(spec: Spec, settings: CompareSettings, runner: Runner, log=print) -> tuple[float | None, dict]:
    """Pick ``spec``'s lr: one short run per candidate (seed ``settings.search_seed``, which no seed run uses),
    scored on validation only.

    Each candidate trains ``settings.search_budget`` steps (its schedule scaled to them) and is measured once,
    after its last step, on the validation split; the test split is not loaded (``test_samples=0``). The best
    primary metric wins, a lower validation loss breaks ties; a candidate that failed or that the divergence
    guard ended ranks last. While the best is the lowest or the highest lr tried, up to ``settings.lr_extend``
    more candidates go one :data:`~softprompt.compare.specs.LR_SPACING` step beyond that edge (``beyond_grid``
    in the record); a choice still at an edge after them is recorded as ``edge`` (``lower`` or ``upper``).

    Returns:
        The chosen lr (``None`` when every candidate failed) and the search's record for ``compare.json``.
    """
    candidates, metric, higher = [], None, True
    short = replace(spec, steps_scale=1)  # the seed runs' budget: not the search's (its runs stay journalled)
    n = settings.lr_grid

    def trial(i: int) -> None:
        nonlocal metric, higher
        lr = lr_at(spec.lr, n, i)
        run = runner(Job(short, settings.model, settings.dataset, settings.search_budget, settings.batch_size, lr,
                         seed=settings.search_seed, val_samples=settings.val_samples, eval_every=0, test_samples=0,
                         schedule=settings.schedule, metric=settings.metric))
        if "error" not in run:
            metric, higher = run["metric"], run["higher_is_better"]
        candidates.append({**_candidate(lr, run), **({"beyond_grid": True} if not 0 <= i < n else {})})
        log(f"  {spec.label}: lr {lr:.3g} -> " + _outcome(run) + (" (beyond the grid's edge)" if not 0 <= i < n
                                                                   else ""))

    for i in range(n):
        trial(i)
    lo, hi = 0, n - 1  # the candidates' indices tried
    for _ in range(settings.lr_extend):
        edge = search_edge(candidates, metric, higher)
        if edge is None:
            break
        lo, hi = (lo - 1, hi) if edge == "lower" else (lo, hi + 1)
        trial(lo if edge == "lower" else hi)
    record = {"steps": settings.search_budget, "metric": metric, "candidates": candidates}
    if metric is None:
        return None, record
    best = max(candidates, key=lambda c: candidate_score(c, metric, higher))
    record["chosen"] = best["lr"]
    edge = search_edge(candidates, metric, higher)
    if edge is not None:
        record["edge"] = edge
    return best["lr"], record


def summarise(spec: Spec, runs: list[dict], search: dict | None, settings: CompareSettings) -> dict:
    """One table row from a spec's seed runs: means (accuracy also its sample std), totals and the mean curve.

    A seed run is converged when its validation loss fell by less than ``settings.converged_tol`` over the
    last third of its steps: with ``until_flat``, at the plateau that started its cool-down (``flat_step``),
    and a run that reached ``steps`` without one is not; with fixed steps, at its last step, or under the
    ``wsd`` schedule where its decay starts (the decay's own fall is the schedule's, not a slope that more
    steps at that lr would follow). The row is
    converged when every seed run is; a seed run the divergence guard ended is not (its accuracy, from the
    rolled-back state, still counts in the mean: it is what the method reached at that lr).
    ``last_third_gain`` is the gain over a run's curve up to where its fixed-steps verdict is read.
    """
    first, steps = runs[0], settings.steps * spec.steps_scale
    accs = [r["accuracy"] for r in runs]
    curve = mean_curve([r["curve"] for r in runs], first["metric"])
    for r in runs:
        at = r.get("steps_run", steps)
        if not settings.until_flat and settings.schedule == "wsd":
            at = wsd_decay_start(at, min(WARMUP_STEPS, at))
        r["converged"], r["last_third_gain"] = convergence([p for p in r["curve"] if p["step"] <= at], at,
                                                           settings.converged_tol)
        if settings.until_flat and r["converged"] is not None:
            r["converged"] = r.get("flat_step") is not None
        if r["diverged"]:  # the guard ended it: a loss that rose until it gave up is not a plateau
            r["converged"] = False
    verdicts = [r["converged"] for r in runs]
    converged = None if None in verdicts else all(verdicts)
    peaks = [r["peak_mib"] for r in runs if r.get("peak_mib")]
    f1s = [r["macro_f1"] for r in runs if r.get("macro_f1") is not None]
    f1 = {"macro_f1": statistics.fmean(f1s), "macro_f1_std": statistics.stdev(f1s) if len(f1s) > 1 else None} if (
        first["metric"] == "macro_f1" and len(f1s) == len(runs)) else {}  # selected by macro-F1: on test too
    return {"method": first["method"], "spec": spec.label, "spec_def": spec.to_dict(), "kind": spec.kind,
            "lr": first["lr"],
            "lr_search": search, "trainable_params": first["trainable_params"],
            "bytes_per_task": first["bytes_per_task"], "accuracy": statistics.fmean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None, **f1, "n_seeds": len(runs),
            "train_s": statistics.fmean(r["train_s"] for r in runs),
            "peak_mib": statistics.fmean(peaks) if peaks else None, "steps": steps,
            "steps_run": [r.get("steps_run", steps) for r in runs], "metric": first["metric"],
            "guard": first["guard"], "rollbacks": sum(r["rollbacks"] for r in runs),
            "diverged_seeds": sum(r["diverged"] for r in runs), "curve": curve, "converged": converged,
            "last_third_gain": [r["last_third_gain"] for r in runs], "validation": first["validation"],
            "seeds": runs}


def run_method(spec: Spec, settings: CompareSettings, runner: Runner | None = None, log=print,
               prompts_dir: Path | None = None) -> dict:
    """One row: the lr search (unless off or a grid of one), then ``settings.seeds`` runs at the chosen lr, of at
    most ``settings.steps`` x ``spec.steps_scale`` steps (the search's runs are the same length for every row).

    A failed seed run ends the row: it becomes ``{"method", "kind", "error", ...}`` with what had run.
    ``runner`` runs one :class:`Job` (default: :func:`run_in_subprocess`). With ``prompts_dir``, a prompt
    method's seed runs save their prompts in ``prompts_dir/<method slug>/seed<k>/`` (``prompt_dir`` in each).
    """
    runner = runner or run_in_subprocess
    search = None
    lr = spec.lr
    if settings.lr_search and settings.lr_grid > 1:
        lr, search = search_lr(spec, settings, runner, log)
        if lr is None:
            return {"method": spec.label, "kind": spec.kind, "lr_search": search,
                    "error": f"every lr candidate failed; the last: {search['candidates'][-1]['error']}"}
    runs = []
    save = prompts_dir is not None and spec.kind not in WEIGHT_KINDS
    for seed in range(settings.seeds):
        run = runner(Job(spec, settings.model, settings.dataset, settings.steps * spec.steps_scale,
                         settings.batch_size, lr, seed=seed,
                         val_samples=settings.val_samples, eval_every=settings.eval_every,
                         test_samples=settings.test_samples, schedule=settings.schedule, metric=settings.metric,
                         stop_when_flat=settings.converged_tol if settings.until_flat else 0.0,
                         save_prompt_to=str(prompts_dir / method_slug(spec.label) / f"seed{seed}") if save else None))
        if "error" in run:
            return {"method": spec.label, "kind": spec.kind, "lr": lr, "lr_search": search, "seeds": runs,
                    "error": run["error"]}
        f1 = f", macro-F1 {run['macro_f1']:.4f}" if run["metric"] == "macro_f1" and "macro_f1" in run else ""
        log(f"  {run['method']}: seed {seed} -> test accuracy {run['accuracy']:.4f}{f1}, {run['rollbacks']} rollbacks"
            + (f"; the guard ended it at step {run.get('steps_run')} (diverged)" if run["diverged"] else ""))
        runs.append(run)
    return summarise(spec, runs, search, settings)


def _previous(out_dir: Path, settings: CompareSettings) -> tuple[dict[str, dict], str | None]:
    """``out_dir/compare.json`` read once: its rows that ran to the end, by the label of the spec they ran, and
    why they cannot be kept with ``settings`` (unreadable, or other settings, named), if so. A missing file
    keeps nothing and is no problem. ``settings.metric`` is compared resolved (see :func:`run_compare`)."""
    path = out_dir / "compare.json"
    if not path.exists():
        return {}, None
    try:
        data = json.loads(path.read_text())
        old, rows = data["settings"], data["rows"]
        if not isinstance(old, dict) or not isinstance(rows, list):
            raise TypeError("settings must be an object and rows a list")
        old = {"schedule": "linear", **old}  # written before the setting existed: every run decayed linearly
        # and before --metric: ranked by what auto was then, which is what it is now but macro-F1 (accuracy then)
        old.setdefault("metric", "accuracy" if settings.metric == "macro_f1" else settings.metric)
        old.setdefault("lr_extend", 0)  # and before the search went beyond a winning edge: the grid only
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {}, f"--resume: cannot read {path}: {e}"
    new = settings.to_dict()
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} there, {new.get(k)!r} now)" for k in differ)
        return {}, f"--resume: {path} was written with other settings: {shown}"
    return {r["spec"]: r for r in rows if isinstance(r, dict) and "error" not in r and "spec" in r}, None


def _earlier_rows(out_dir: Path) -> list[dict]:
    """Every row of ``out_dir/compare.json`` that names its spec (its settings were checked by :func:`_previous`)."""
    try:
        rows = json.loads((out_dir / "compare.json").read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [r for r in rows if isinstance(r, dict) and isinstance(_label(r), str)]


def _label(row: dict):
    """The spec label a row ran (a failed row has only its ``method``, which is the label)."""
    return row.get("spec", row.get("method"))


def resume_problem(out_dir: Path, settings: CompareSettings) -> str | None:
    """Why ``compare --resume`` cannot keep ``out_dir/compare.json``'s rows with ``settings``, if it cannot:
    unreadable, or written with other settings (named). A missing file is no problem: nothing is kept."""
    return _previous(out_dir, settings)[1]


def run_compare(specs: list[Spec], settings: CompareSettings, out_dir: Path, log=print, keep_going: bool = False,
                runner: Runner | None = None, store: str | None = None,
                evaluate: Evaluator | None = None, resume: bool = False) -> list[dict]:
    """Run each spec (every run in a fresh subprocess); write the table, ``compare.json`` and the charts.

    Args:
        specs: the methods to run, in order.
        settings: model, data, budget, seeds, lr search and convergence tolerance shared by every row.
        out_dir: where ``compare.json`` (rewritten after every row), ``compare.md``, ``compare.png`` (accuracy
            against trainable parameters) and ``compare_curves.png`` (validation curves) go.
        log: called with progress lines and with each row's table line as it finishes.
        keep_going: run the specs after a failed one too; otherwise the first failure ends the run.
        runner: runs one :class:`Job` (default: :func:`run_in_subprocess`; tests run them in-process).
        store: a prompt store: each prompt method's seed prompts (saved in ``out_dir/prompts/``) go there with
            their ensemble, scored on the test split (:mod:`softprompt.compare.ensemble`).
        evaluate: scores a stored ensemble (default: :func:`evaluate_in_subprocess`).
        resume: keep the rows of an earlier run in ``out_dir/compare.json`` (same settings, checked by
            :func:`resume_problem` first) that ran to the end; run only the other specs, taking the runs of an
            unfinished row that ``out_dir/runs.jsonl`` holds (:mod:`softprompt.compare.journal`) from it.

    Returns:
        One row per spec that ran; a failed row has ``error`` (the child's last stderr line) instead of
        results. The files are written either way, with the rows that ran. ``compare.json`` holds
        ``{"settings": ..., "rows": [...]}``; a row keeps every seed's run (``seeds``: accuracy, curve,
        rollbacks, time, memory) and the lr search's candidates with their validation scores (``lr_search``);
        with ``store``, a prompt method's row also has ``ensemble``, ``ensemble_accuracy`` and ``ensemble_gain``.
    """
    if settings.metric == "auto":  # one metric for every row (the CLI resolves it first, to check --resume)
        settings = replace(settings, metric=selection_metric(settings)[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    done, problem = _previous(out_dir, settings) if resume else ({}, None)
    if problem:
        raise ValueError(problem)
    runner = RunJournal(out_dir, resume).wrap(runner or run_in_subprocess, log)  # --resume inside a row too
    # with --resume, the earlier file's rows of specs not selected now stay in it (--resume --only lora wrote a
    # file holding the LoRA row alone), in their place; a selected spec's row takes its old row's place
    selected = {s.label for s in specs}
    earlier = _earlier_rows(out_dir) if resume else []

    def write() -> None:  # atomically: a kill while writing left a truncated compare.json, every row lost
        merged, placed = [], False
        for r in earlier:  # the selected rows, in their order, where the first of them stood
            if _label(r) not in selected:
                merged.append(r)
            elif not placed:
                merged, placed = merged + rows, True
        merged = merged if placed else merged + rows
        tmp = out_dir / ".compare.json.tmp"
        tmp.write_text(json.dumps({"settings": settings.to_dict(), "rows": merged}, indent=2))
        os.replace(tmp, out_dir / "compare.json")

    for spec in specs:
        if spec.label in done and done[spec.label].get("spec_def") != spec.to_dict():
            # a label names a spec, not its lr centre, optimizer or config: those may have changed since
            log(f"  {spec.label}: run again (--resume): its definition (lr, optimizer, config, budget) differs from "
                "the kept row's, or the row does not record it")
        elif spec.label in done:
            rows.append(done[spec.label])
            log(f"  {spec.label}: kept from {out_dir / 'compare.json'} (--resume)")
            log(format_row(rows[-1], ensemble=bool(store)))
            write()
            continue
        row = run_method(spec, settings, runner, log, prompts_dir=out_dir / "prompts" if store else None)
        if store and "error" not in row:
            row.update(store_seed_ensemble(spec, row, settings, store, evaluate, log))
        rows.append(row)
        log(format_row(row, ensemble=bool(store)))
        write()
        if "error" in row and not keep_going:
            break
    (out_dir / "compare.md").write_text(format_table(rows))
    plot_compare(rows, out_dir / "compare.png")
    plot_curves(rows, out_dir / "compare_curves.png")
    return rows
