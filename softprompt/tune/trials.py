"""The records of a search: a trial's validation numbers per rung, the trial, the result, the ranking."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.tune.space import Plan, TrialSpec

log = logging.getLogger(__name__)

STATUSES = ("ok", "pending", "diverged", "failed", "not_run")  # ranking order of the statuses


@dataclass
class RungResult:
    """A trial at the end of one rung: its validation numbers."""

    rung: int
    steps: int
    metric: float | None
    val_loss: float | None
    metrics: dict[str, float]
    seconds: float  # training and evaluation of this segment
    best_step: int | None = None  # last rung: the step of the best validated state, the one kept (as train keeps)


@dataclass
class Trial:
    """One configuration's run through the rungs."""

    index: int
    spec: TrialSpec
    folder: Path
    steps: int = 0  # optimizer steps trained so far
    rungs: list[RungResult] = field(default_factory=list)
    status: str = "pending"  # then ok, diverged, failed (an error in train or evaluation) or not_run
    note: str = ""  # why it went no further
    rollbacks: int = 0
    seed: int | None = None  # a seed run of the winner (--ensemble-seeds); None: a trial of the search (--seed)

    @property
    def id(self) -> str:
        return f"t{self.index:02d}" + (f"-seed{self.seed}" if self.seed is not None else "")

    @property
    def last(self) -> RungResult | None:
        return self.rungs[-1] if self.rungs else None

    @property
    def prompt_dir(self) -> Path:
        """The trial's prompt at its last finished rung (saved with :func:`softprompt.store.save_prompt`)."""
        return self.folder / "prompt"

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "config": self.spec.to_dict(), "status": self.status, "note": self.note,
               "steps": self.steps, "rollbacks": self.rollbacks,
               "rungs": [dataclasses.asdict(r) for r in self.rungs]}
        return out if self.seed is None else {**out, "seed": self.seed}


@dataclass
class TuneResult:
    """Outcome of :func:`successive_halving`: every trial, their final ranking and the best one."""

    trials: list[Trial]
    ranking: list[Trial]
    plan: Plan
    metric: str
    higher_is_better: bool
    steps_used: int
    seconds: float
    stopped_by: str | None  # "--budget-steps" or "--budget-minutes" when the budget ended the search early
    notes: list[str] = field(default_factory=list)
    # --ensemble-seeds: the winner's runs with other seeds (the winner itself first when its run counts)
    seed_runs: list[Trial] = field(default_factory=list)
    ensembles: dict[str, dict] = field(default_factory=dict)  # "seeds" / "top_k": see softprompt.tune.ensemble
    untuned: Trial | None = None  # the untuned run's trial (--keep-default), None when the search has none
    versus_untuned: dict | None = None  # the winner against it, per example (softprompt.tune.versus)

    @property
    def best(self) -> Trial | None:
        """The winner: the best trial of the highest rung reached (None when every trial diverged)."""
        top = self.ranking[0] if self.ranking else None
        return top if top is not None and top.status == "ok" else None

    def top(self, k: int) -> list[Trial]:
        """The ``k`` best finished trials (fewer when fewer finished)."""
        return [t for t in self.ranking if t.status == "ok"][:k]

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "plan": self.plan.to_dict(),
                "steps_used": self.steps_used, "seconds": round(self.seconds, 3), "stopped_by": self.stopped_by,
                "best": best.id if best else None, "ranking": [t.id for t in self.ranking], "notes": self.notes,
                "trials": [t.to_dict() for t in self.trials]} | (
                    {"seed_runs": [t.to_dict() for t in self.seed_runs]} if self.seed_runs else {}) | (
                    {"ensembles": self.ensembles} if self.ensembles else {}) | (
                    {"versus_untuned": self.versus_untuned} if self.versus_untuned else {})


def rank_key(trial: Trial, higher: bool) -> tuple:
    """Sort key of the ranking: finished trials first (by the highest rung reached, then its metric, best
    first, then validation loss and trial order), then diverged, failed and never run ones (by trial order)."""
    last = trial.last
    if trial.status != "ok" or last is None:
        return (STATUSES.index(trial.status), 0, 0.0, 0.0, trial.index)
    metric = -last.metric if higher else last.metric
    return (0, -len(trial.rungs), metric, last.val_loss if last.val_loss is not None else math.inf, trial.index)



def lr_edge_note(result: TuneResult) -> str | None:
    """A note when the winner's lr is the lowest or the highest of the lrs tried with its other settings
    (method, P, init): the best lr may lie beyond the range searched, which the search cannot tell."""
    best = result.best
    if best is None:
        return None
    same = best.spec.prompt_key, best.spec.num_virtual_tokens, best.spec.init
    lrs = sorted({t.spec.lr for t in result.trials
                  if (t.spec.prompt_key, t.spec.num_virtual_tokens, t.spec.init) == same})
    if len(lrs) < 2 or lrs[0] < best.spec.lr < lrs[-1]:
        return None
    side, beyond = ("lowest", "below") if best.spec.lr == lrs[0] else ("highest", "above")
    return (f"the winner's lr {best.spec.lr:.3g} is the {side} of the {len(lrs)} lrs tried with its settings "
            f"({lrs[0]:.3g} to {lrs[-1]:.3g}): the best lr may lie {beyond} the range searched; search one that "
            f"reaches past it (--lr-range or --lrs)")

def remove_stale_trials(folder: Path) -> None:
    """Delete the trial folders an earlier search left in ``folder`` (``tNN`` only: nothing else is touched),
    so that every folder there belongs to this search."""
    stale = sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"t\d{2,}", p.name)) \
        if folder.is_dir() else []
    if stale:
        log.info("tune: removing %d trial folders of an earlier search in %s", len(stale), folder)
    for p in stale:
        shutil.rmtree(p)
