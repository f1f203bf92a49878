"""What ``softprompt tune`` searches and how its budget is spent: :class:`TuneArgs`, trials, the rung plan.

The search space is the cartesian product of the learning rates (``--lrs``, or ``--num-trials`` values of
``--lr-range`` on a log grid or drawn log-uniformly, or by default nine values around ``--lr``) and the value
lists of ``--search KEY=V1,V2`` for the prompt length, init and method. Combinations a method refuses
(``prefix_tuning`` with ``init=sample_vocab``) or that build the same trial (``p_tuning`` has no init) are
dropped with a note.

The plan is successive halving (Jamieson & Talwalkar 2016; Hyperband's inner loop): all ``n`` trials run
``r0`` steps (rung 0), the best ``1/eta`` of them continue to ``r0 * eta`` steps, and so on until one is left;
the last rung is the schedule's full length (the horizon), so the winner ends a complete run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from softprompt.config import ConfigError, PromptArgs, TrainArgs, check_folder_to_create, check_real, flag

SEARCHABLE = ("num_virtual_tokens", "init", "method")  # --search keys (lr has --lrs / --lr-range)
INITS = ("random", "text", "sample_vocab", "class_labels")
DEFAULT_TRIALS = 9


@dataclass
class TuneArgs:
    """The search: its space, its budget and what is kept (each field is a ``softprompt tune`` flag).

    Attributes:
        lrs: the learning rates to try (``--lrs``).
        lr_range: ``(low, high)`` of ``--lr-range``; ``num_trials`` values in it.
        num_trials: how many learning rates ``--lr-range`` gives (default 9).
        lr_sampling: ``grid`` (log-spaced, both ends included) or ``random`` (log-uniform, seeded by --seed).
        search: ``{key: values}`` of ``--search``; keys are :data:`SEARCHABLE`.
        budget_steps: total optimizer steps over all trials (``--budget-steps``).
        budget_minutes: wall clock for the search; a segment starts when the earlier ones' times say it ends
            within it (the first always runs); a search that ran past it says so in its notes.
        eta: keep the best ``1/eta`` of the trials at each rung.
        min_steps: steps of rung 0 (default: derived from the horizon or the budget).
        top_k: how many of the best prompts to save (and, with ``store``, to ensemble).
        store: a prompt store to add the result to (with ``task``).
        task: the store entry name (``task-1 .. task-k`` members plus the ``task`` ensemble when k > 1).
        validation_from_train: hold out this fraction of ``train`` as the validation split when the task has
            none (opt-in; without it a task without a validation split is refused).
        ensemble_seeds: after the search, train the winner's configuration with this many seeds (its own run
            is one) and report their mean ensemble's validation gain over the mean single prompt; with
            ``store`` they are ``task-1 .. task-N`` and the ensemble ``task`` (classification only).
        keep_default: continue the untuned configuration (``--lr`` with the prompt settings ``train`` would
            use) to the end of the run whatever its rank at a rung, beside the best ones: ``softprompt train``'s
            own run is then one of the candidates, selected as ``train`` selects it where their evaluation steps
            coincide (the last rung's), so the winner validates no worse; a search without that trial (``--lrs``
            without ``--lr``) is unchanged.
    """

    lrs: list[float] | None = None
    lr_range: tuple[float, float] | None = None
    num_trials: int | None = None
    lr_sampling: str = "grid"
    search: dict[str, list[Any]] = field(default_factory=dict)
    budget_steps: int | None = None
    budget_minutes: float | None = None
    eta: int = 3
    min_steps: int | None = None
    top_k: int = 1
    store: str | None = None
    task: str | None = None
    validation_from_train: float | None = None
    ensemble_seeds: int | None = None
    keep_default: bool = True

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))

    def type_problems(self) -> list[str]:
        """Every field of the wrong type (built in Python: ``TuneArgs(eta="3")``), each naming its flag; the value
        checks of :meth:`problems` compare values only once there is none."""
        def real(v) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        out = [f"{flag(n)}: expected an integer, got {v!r}" for n in ("num_trials", "budget_steps", "eta", "min_steps",
                                                                       "top_k", "ensemble_seeds")
               if (v := getattr(self, n)) is not None and (not isinstance(v, int) or isinstance(v, bool))]
        if self.lrs is not None and not (isinstance(self.lrs, list | tuple) and all(map(real, self.lrs))):
            out.append(f"--lrs: expected a list of numbers, got {self.lrs!r}")
        if self.lr_range is not None and not (isinstance(self.lr_range, list | tuple) and len(self.lr_range) == 2
                                              and all(map(real, self.lr_range))):
            out.append(f"--lr-range: expected two numbers (LOW, HIGH), got {self.lr_range!r}")
        if self.budget_minutes is not None and not real(self.budget_minutes):
            out.append(f"--budget-minutes: expected a number, got {self.budget_minutes!r}")
        if not (isinstance(self.search, dict) and all(isinstance(k, str) and isinstance(v, list | tuple)
                                                      for k, v in self.search.items())):
            out.append(f"--search: expected {{key: [values]}}, got {self.search!r}")
        out += [f"{flag(n)}: expected text, got {v!r}" for n in ("lr_sampling", "store", "task")
                if (v := getattr(self, n)) is not None and not isinstance(v, str)]
        if not isinstance(self.keep_default, bool):
            out.append(f"--keep-default: expected true or false, got {self.keep_default!r}")
        if self.validation_from_train is not None and not real(self.validation_from_train):
            out.append(f"--validation-from-train: expected a number, got {self.validation_from_train!r}")
        return out

    def problems(self) -> list[str]:
        """Every problem with the fields, each naming its flag (the type problems alone when there are some)."""
        from softprompt.methods import METHODS
        from softprompt.store import StoreError, safe_task_name

        out: list[str] = self.type_problems()
        if out:
            return out
        if self.lrs is not None and self.lr_range is not None:
            out.append("--lrs and --lr-range both given: use one")
        if self.lrs is not None:
            if not self.lrs:
                out.append("--lrs must list at least one learning rate")
            out += [p for v in self.lrs if (p := check_real("--lrs", v, lambda x: x > 0, "> 0 (every value)"))]
            if len(set(self.lrs)) != len(self.lrs):
                out.append(f"--lrs repeats a value: {self.lrs}")
        if self.lr_range is not None:
            lo, hi = self.lr_range
            bad = [p for v in (lo, hi) if (p := check_real("--lr-range", v, lambda x: x > 0, "> 0 (both ends)"))]
            out += bad
            if not bad and lo >= hi:
                out.append(f"--lr-range LOW HIGH needs LOW < HIGH, got {lo:g} {hi:g}")
        if self.num_trials is not None:
            if self.lr_range is None:
                out.append("--num-trials sets how many learning rates --lr-range gives: add --lr-range LOW HIGH")
            if self.num_trials < 1:
                out.append(f"--num-trials must be >= 1, got {self.num_trials}")
        if self.lr_sampling not in ("grid", "random"):
            out.append(f"--lr-sampling must be grid or random, got {self.lr_sampling!r}")
        elif self.lr_sampling == "random" and self.lr_range is None:
            out.append("--lr-sampling random draws from --lr-range: add --lr-range LOW HIGH")
        for key, values in self.search.items():
            if key not in SEARCHABLE:
                hint = " (learning rates: --lrs or --lr-range)" if key == "lr" else ""
                out.append(f"--search {key}: unknown key; searchable: {', '.join(SEARCHABLE)}{hint}")
                continue
            if not values:
                out.append(f"--search {key}= lists no values")
            if len(set(values)) != len(values):
                out.append(f"--search {key} repeats a value: {values}")
            if key == "num_virtual_tokens":
                out += [f"--search num_virtual_tokens: {v!r} is not an integer >= 1" for v in values
                        if not isinstance(v, int) or isinstance(v, bool) or v < 1]
            elif key == "init":
                out += [f"--search init: {v!r} is not one of {', '.join(INITS)}" for v in values if v not in INITS]
            elif key == "method":
                out += [f"--search method: {v!r} is not one of {', '.join(sorted(METHODS))}" for v in values
                        if v not in METHODS]
        if self.budget_steps is not None and self.budget_steps < 1:
            out.append(f"--budget-steps must be >= 1, got {self.budget_steps}")
        if self.budget_minutes is not None:
            out += [p for p in [check_real("--budget-minutes", self.budget_minutes, lambda x: x > 0, "> 0")] if p]
        if self.eta < 2:
            out.append(f"--eta must be an integer >= 2 (keep the best 1/eta at each rung), got {self.eta}")
        if self.min_steps is not None and self.min_steps < 1:
            out.append(f"--min-steps must be >= 1, got {self.min_steps}")
        if self.top_k < 1:
            out.append(f"--top-k must be >= 1, got {self.top_k}")
        if bool(self.store) != bool(self.task):
            out.append("--store and --task go together: --store DIR --task NAME")
        if self.store:
            out += [p for p in [check_folder_to_create("--store", self.store)] if p]
        if self.ensemble_seeds is not None and self.ensemble_seeds < 2:
            out.append(f"--ensemble-seeds must be >= 2 (an ensemble needs two prompts), got {self.ensemble_seeds}")
        if self.ensemble_seeds is not None and self.top_k > 1 and self.store:
            out.append(f"--ensemble-seeds {self.ensemble_seeds} and --top-k {self.top_k} both write the members "
                       f"{self.task}-1, {self.task}-2, ... and the ensemble {self.task} into --store: give one of "
                       "them (without --store, both ensembles are reported)")
        if self.task:
            k = max(self.top_k, self.ensemble_seeds or 1)
            for name in [self.task] + member_names(self.task, k)[-1:] * (k > 1):
                try:
                    safe_task_name(name)
                except StoreError as e:
                    out.append(f"--task {self.task}: {e}")
        if self.validation_from_train is not None:
            out += [p for p in [check_real("--validation-from-train", self.validation_from_train,
                                           lambda x: 0 < x < 1, "a fraction in (0, 1)")] if p]
        return out

    def max_virtual_tokens(self, default: int) -> int:
        """The longest prompt any trial uses (what the model's context must fit); ``default``: --num-virtual-tokens."""
        return max(self.search.get("num_virtual_tokens") or [default])


def epochs_problem(tune: TuneArgs, train: TrainArgs, given: bool = False) -> str | None:
    """Why ``--epochs`` would be ignored, if it would: with ``--budget-steps`` and no ``--max-steps`` the trials'
    length is what the budget pays for. ``given``: the user set it (else only a value other than 1 counts)."""
    if tune.budget_steps is None or train.max_steps or not (given or train.epochs != 1):
        return None
    return (f"--epochs {train.epochs}: with --budget-steps and no --max-steps, the trials' length is what the "
            "budget pays for, not epochs: give --max-steps N for a fixed run length (the budget then caps the "
            "search), or leave --epochs out (and train.epochs in --config)")


def member_names(task: str, k: int) -> list[str]:
    """Store names of the top-``k`` prompts when they form the ensemble ``task`` (``task-1`` is the best)."""
    return [f"{task}-{i}" for i in range(1, k + 1)]


@dataclass
class TrialSpec:
    """One point of the search space: a learning rate and the prompt settings it trains."""

    lr: float
    method: str
    num_virtual_tokens: int
    init: str
    method_config: dict[str, Any]  # what build_method gets (the method's own fields only)

    @property
    def prompt_key(self) -> str:
        """What the trial's prompt is built from (method and its config): equal keys build the same prompt."""
        return prompt_key(self.method, self.method_config)

    @property
    def init_shown(self) -> str:
        """The init as a table shows it: ``-`` for a method without one (p_tuning)."""
        return self.init if "init" in self.method_config else "-"

    def label(self) -> str:
        return f"{self.method} P={self.num_virtual_tokens} init={self.init_shown} lr={self.lr:.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "method": self.method, "num_virtual_tokens": self.num_virtual_tokens,
                "init": self.init, "method_config": self.method_config}


def learning_rates(tune: TuneArgs, base_lr: float, seed: int) -> list[float]:
    """The learning rates to try, in increasing order.

    Default: ``base_lr * 3**(k/2)`` for ``k = -6..2``, nine values from ``base_lr/27`` to ``base_lr*3`` that
    include ``base_lr`` itself (so the search contains the untuned run's learning rate).

    Raises:
        ConfigError: a value is not a finite number > 0 (a valid ``--lr`` near the float range's ends makes
            the default grid overflow to inf or underflow to 0), or one comes twice (a subnormal ``--lr``, a
            range narrower than the floats between its ends): it names the values and the flag behind them.
    """
    if tune.lrs is not None:
        return sorted(tune.lrs)
    if tune.lr_range is None:
        lrs = [base_lr * 3 ** (k / 2) for k in range(-6, 3)]
        source = f"--lr {base_lr!r} (the default grid, --lr/27 to --lr*3)"  # as typed: 1e-323, not 9.88e-324
    else:
        (lo, hi), n = tune.lr_range, tune.num_trials or DEFAULT_TRIALS
        source = f"--lr-range {lo!r} {hi!r}"
        if tune.lr_sampling == "random":
            rng = random.Random(seed)
            lrs = sorted(math.exp(rng.uniform(math.log(lo), math.log(hi))) for _ in range(n))
        else:
            lrs = [math.sqrt(lo * hi)] if n == 1 else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    bad = [v for v in lrs if not (math.isfinite(v) and v > 0)]
    if bad:  # each trial's TrainArgs refused it mid-search, after earlier trials ran
        raise ConfigError(f"invalid arguments:\n  {source} gives the learning rate {bad[0]:g}, not a finite number "
                          "> 0: choose values well inside the float range, or list them with --lrs")
    if len(set(lrs)) != len(lrs):  # identical trials, as a repeated --lrs value would give (refused too)
        wider = "a larger --lr" if tune.lr_range is None else "a wider --lr-range or fewer --num-trials"
        raise ConfigError(f"invalid arguments:\n  {source} gives repeated learning rates ({', '.join(map(repr, lrs))}):"
                          f" their trials would be the same; choose {wider}, or list distinct values with --lrs")
    return lrs


def prompt_key(method: str, method_config: dict[str, Any]) -> str:
    """A method and its config as one comparable string (see :attr:`TrialSpec.prompt_key`)."""
    return json.dumps([method, method_config], sort_keys=True, default=str)


def trial_specs(tune: TuneArgs, prompt: PromptArgs, train: TrainArgs) -> tuple[list[TrialSpec], list[str]]:
    """Every distinct trial of the search space, and notes on the combinations dropped.

    Order: method, prompt length, init, then learning rate (innermost), each in the order given.

    Raises:
        ConfigError: no combination is valid (the methods' reasons are listed).
    """
    from softprompt.methods import checkpointing_problem

    axes = {"method": [prompt.method], "num_virtual_tokens": [prompt.num_virtual_tokens], "init": [prompt.init]}
    axes.update({k: list(v) for k, v in tune.search.items()})
    lrs = learning_rates(tune, train.lr, train.seed)
    specs, seen, notes, refused = [], set(), [], []
    for method, p, init in itertools.product(axes["method"], axes["num_virtual_tokens"], axes["init"]):
        problem = train.gradient_checkpointing and checkpointing_problem(method)
        if problem:
            refused.append(f"method={method} num_virtual_tokens={p} init={init}: {problem}")
            continue
        try:
            cfg = dataclasses.replace(prompt, method=method, num_virtual_tokens=p, init=init).method_config(train.seed)
        except ConfigError as e:
            refused.append(f"method={method} num_virtual_tokens={p} init={init}: {str(e).splitlines()[-1].strip()}")
            continue
        key = prompt_key(method, cfg)
        if key in seen:  # e.g. p_tuning takes no init: init=text and init=random build the same prompt
            notes.append(f"method={method} num_virtual_tokens={p} init={init}: the same trial as an earlier "
                         f"combination ({method} does not use every searched setting); skipped")
            continue
        seen.add(key)
        specs += [TrialSpec(lr, method, p, init, cfg) for lr in lrs]
    if not specs:
        raise ConfigError("invalid arguments:\n  --search: no valid combination:\n    " + "\n    ".join(refused))
    notes += [f"{r}; skipped" for r in refused]
    return specs, notes


def untuned_index(specs: list[TrialSpec], prompt: PromptArgs, train: TrainArgs) -> int | None:
    """Which of ``specs`` is the run ``softprompt train`` would make (``--lr``, the base prompt settings), if any."""
    try:
        key = prompt_key(prompt.method, prompt.method_config(train.seed))
    except ConfigError:
        return None
    return next((i for i, s in enumerate(specs) if s.lr == train.lr and s.prompt_key == key), None)


@dataclass
class Plan:
    """The rungs of successive halving.

    Attributes:
        rungs: cumulative optimizer steps of a trial at the end of each rung (increasing).
        keep: how many trials run in each rung (``keep[0]`` is every trial).
        horizon: the trials' schedule length (``rungs[-1]``): every trial's lr schedule spans it, so a
            trial continued from rung to rung follows the same schedule as one uninterrupted run.
    """

    rungs: list[int]
    keep: list[int]
    keeps_default: bool = False  # each rung after the first has a slot for the untuned run (counted in keep)

    @property
    def horizon(self) -> int:
        return self.rungs[-1]

    @property
    def cost(self) -> int:
        """Optimizer steps of the whole plan when no trial diverges."""
        return sum(n * (r - prev) for n, r, prev in zip(self.keep, self.rungs, [0] + self.rungs[:-1], strict=True))

    def describe(self) -> str:
        rungs = ", ".join(f"{n} x {r}" for n, r in zip(self.keep, self.rungs, strict=True))
        slot = "; one trial of each later rung is the untuned run" if self.keeps_default and len(self.keep) > 1 else ""
        return f"{rungs} steps ({self.cost} in all{slot})"

    def to_dict(self) -> dict[str, Any]:
        return {"rungs": self.rungs, "keep": self.keep, "horizon": self.horizon, "cost": self.cost,
                "keeps_default": self.keeps_default}


def halving_counts(n: int, eta: int, keep_default: bool = False) -> list[int]:
    """Trials per rung: ``n``, then ``n // eta`` (at least one) until one is left; with ``keep_default`` one more
    in every later rung (at most all of the rung before): the untuned configuration's slot."""
    keep = [n]
    while keep[-1] > 1:
        keep.append(max(1, keep[-1] // eta))
    if keep_default:
        keep = keep[:1] + [min(k + 1, prev) for k, prev in zip(keep[1:], keep, strict=False)]
    return keep


WARMUP_FACTOR = 3  # by default rung 0 ends no sooner than this many times --warmup-steps


def plan_rungs(n: int, eta: int, horizon: int | None, min_steps: int | None = None,
               budget_steps: int | None = None, warmup_steps: int = 0, keep_default: bool = False) -> Plan:
    """The rungs for ``n`` trials.

    With a ``horizon`` (the run length ``--max-steps`` or ``--epochs`` give), rung ``k`` ends at
    ``r0 * eta**k`` steps and the last rung at the horizon; ``r0`` is ``min_steps`` or ``horizon //
    eta**(rungs - 1)``, but no less than ``WARMUP_FACTOR * warmup_steps`` (capped at ``horizon // eta``): a
    cut right after the warmup compares trials that have barely trained at their own learning rate (a
    classification prompt's accuracy there mostly says which label it prefers at that moment). A rung whose
    survivors would then train fewer than ``rung / eta`` more steps before the horizon is merged into the last
    one, so more trials finish the whole run. Without a horizon, the horizon is the longest that
    ``budget_steps`` pays for: ``r0`` is as large as fits (or ``min_steps``, with fewer rungs if the budget
    needs it; the warmup floor when two rungs of it fit), and what is left of the budget lengthens the last
    rung. ``keep_default``: every rung after the first has one trial more (:func:`halving_counts`), the untuned
    configuration's, which the search continues whatever its rank; the budget pays for it.

    Raises:
        ConfigError: the budget cannot pay for rung 0, or ``min_steps`` exceeds the horizon.
    """
    keep = halving_counts(n, eta, keep_default)
    if horizon is None:
        if budget_steps is None:
            raise ValueError("plan_rungs: give a horizon or a step budget")
        plan = _plan_from_budget(keep, eta, min_steps, budget_steps, WARMUP_FACTOR * warmup_steps)
        plan.keeps_default = keep_default
        return plan
    r0 = min_steps
    if r0 is None:
        r0 = max(1, horizon // eta ** (len(keep) - 1), min(WARMUP_FACTOR * warmup_steps, horizon // eta))
    if r0 > horizon:
        raise ConfigError(f"invalid arguments:\n  --min-steps {r0} is more than a whole trial ({horizon} steps: "
                          "--max-steps, or --epochs of the training data)")
    rungs = []
    for k in range(len(keep)):
        rungs.append(min(r0 * eta ** k, horizon))
        if rungs[-1] == horizon:
            break
    rungs[-1] = horizon  # the survivors end a complete run
    while len(rungs) > 2 and horizon - rungs[-2] < rungs[-2] / eta:  # e.g. 30, 90, 100: 30, 100
        del rungs[-2]
    plan = Plan(rungs, keep[:len(rungs)], keep_default)
    _check_rung0(plan, budget_steps)
    return plan


def _plan_from_budget(keep: list[int], eta: int, min_steps: int | None, budget: int, floor: int = 0) -> Plan:
    def plan(r0: int, rungs: int) -> Plan:
        return Plan([r0 * eta ** k for k in range(rungs)], keep[:rungs])

    r0 = min_steps
    if r0 is None:
        r0 = max(1, budget // plan(1, len(keep)).cost)
        if r0 < floor and len(keep) > 1 and plan(floor, 2).cost <= budget:  # the warmup floor, with halving
            r0 = floor
    rungs = len(keep)
    while rungs > 1 and plan(r0, rungs).cost > budget:
        rungs -= 1
    best = plan(r0, rungs)
    _check_rung0(best, budget)
    best.rungs[-1] += (budget - best.cost) // best.keep[-1]  # the rest of the budget: a longer last rung
    return best


def _check_rung0(plan: Plan, budget: int | None) -> None:
    first = plan.keep[0] * plan.rungs[0]
    if budget is not None and first > budget:
        raise ConfigError(f"invalid arguments:\n  --budget-steps {budget} does not pay for rung 0: {plan.keep[0]} "
                          f"trials x {plan.rungs[0]} steps = {first}; raise --budget-steps, lower --min-steps or "
                          "try fewer values (--lrs, --num-trials, --search)")
