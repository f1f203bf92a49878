"""What a comparison runs: the methods (rows), the shared settings, and the lr grid searched for each row."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from softprompt.config import SCHEDULES, check_real, flag
from softprompt.data import BUILTIN_DATASETS

WEIGHT_KINDS = ("lora", "bitfit", "adapter", "full")  # trained inside the model; every other kind is a prompt
LR_SPACING = math.sqrt(10)  # neighbouring lr candidates differ by half a decade
COMPARE_METRICS = ("auto", "accuracy", "macro_f1", "exact_match", "f1", "loss")  # train's --metric choices


@dataclass
class Spec:
    """One row of the comparison: a label, a kind (a registered prompt method, or a weight kind) and config."""

    label: str
    kind: str
    config: dict = field(default_factory=dict)
    optimizer: str = "adafactor"
    lr: float = 0.3  # the default; the centre of the lr search
    steps_scale: int = 1  # its seed runs train up to this many times --steps (a method that moves slowly)

    def to_dict(self) -> dict:
        """The spec as recorded (a row's ``spec_def``, a run's job): ``steps_scale`` only when not 1, so that
        rows and runs recorded before the field existed still match their spec."""
        d = asdict(self)
        if d["steps_scale"] == 1:
            del d["steps_scale"]
        return d


# Each row's lr is the centre of its search grid (x 0.32, 1, 3.2). The centres follow what 3-seed runs picked
# on validation (60 steps, grids one step off): prompt tuning the bottom of a 0.3 grid in 4 of 5 variants,
# prefix tuning and LoRA the top of 3e-3 and 1e-3 grids, P-tuning 3.2e-3 from grids at 1e-3 and 1e-2, full
# fine-tuning the top of a 1e-5 grid; the adapter and BitFit the middle of 1e-3 grids.
DEFAULT_SPECS = [
    # slow rows: random vectors travel furthest; under wsd at 400 steps one seed in three (and one under linear)
    # was still falling 2-3% per 100 steps at the end, so its seed runs get twice the budget (they stop once flat);
    # sampled vocab too: at the lr 1 its extended search chose, one seed of three was still falling 6.6% at 400
    Spec("prompt tuning, random init, P=20", "prompt_tuning", {"num_virtual_tokens": 20, "init": "random"},
         lr=0.1, steps_scale=2),
    Spec("prompt tuning, sampled vocab, P=20", "prompt_tuning", {"num_virtual_tokens": 20, "init": "sample_vocab"},
         lr=0.1, steps_scale=2),
    Spec("prompt tuning, text init, P=5", "prompt_tuning", {"num_virtual_tokens": 5, "init": "text"}, lr=0.1),
    Spec("prompt tuning, text init, P=20", "prompt_tuning", {"num_virtual_tokens": 20, "init": "text"}, lr=0.1),
    Spec("prompt tuning, text init, P=50", "prompt_tuning", {"num_virtual_tokens": 50, "init": "text"}, lr=0.1),
    Spec("prefix tuning, text init, P=10", "prefix_tuning", {"num_virtual_tokens": 10, "init": "text"},
         "adamw", 1e-2),
    # P-tuning too: one seed of three still falling at 400 steps, under linear (+2.8%) and again under wsd
    Spec("P-tuning (MLP), P=20", "p_tuning", {"num_virtual_tokens": 20, "encoder": "mlp"}, "adamw", 3e-3,
         steps_scale=2),
    # LoRA too: at the lr 9.5e-4 its extended search chose, one seed of three was still falling 4.4% at 400
    Spec("LoRA r=8 (q,v) via PEFT", "lora", {"r": 8, "alpha": 16}, "adamw", 3e-3, steps_scale=2),
    Spec("Houlsby adapter, bottleneck 8", "adapter", {"size": 8}, "adamw", 1e-3),
    # the row's label names the variant the model allows: its biases, or its norm gains when it has none
    Spec("BitFit", "bitfit", {}, "adamw", 1e-3),
    Spec("full fine-tuning", "full", {}, "adamw", 3e-5),
]


def method_slug(label: str) -> str:
    """A row's short name (``--only``, store entries): its label in lower case, runs of other characters as
    ``-``, e.g. ``prompt-tuning-text-init-p-20``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:48] or "method"


def select_specs(only: str | None, adapter_size: int = 8) -> tuple[list[Spec], list[str]]:
    """The default rows named in ``only`` (comma-separated kinds, which select every row of that kind, or row
    slugs, :func:`method_slug`; all rows when ``None``), in the default order, and any problem with it.

    Adapter rows get a bottleneck of ``adapter_size`` (their label and slug say so).
    """
    specs = [Spec(f"Houlsby adapter, bottleneck {adapter_size}", s.kind, {**s.config, "size": adapter_size},
                  s.optimizer, s.lr, s.steps_scale) if s.kind == "adapter" else s for s in DEFAULT_SPECS]
    if not only:
        return specs, []
    names = {k.strip() for k in only.split(",")}
    kinds, slugs = sorted({s.kind for s in specs}), [method_slug(s.label) for s in specs]
    unknown = sorted(names - set(kinds) - set(slugs))
    problems = [f"--only: unknown {unknown}; known kinds: {kinds}; known rows: {slugs}"] if unknown else []
    return [s for s in specs if s.kind in names or method_slug(s.label) in names], problems


@dataclass
class CompareSettings:
    """What every row shares: model, data, budget, seeds, the lr search and the convergence check.

    Attributes:
        model: base model (hub id or folder).
        dataset: dataset name.
        steps: the most training steps of a seed run (its lr schedule spans them).
        batch_size: training batch size.
        test_samples: test examples each seed run is scored on (the lr search never reads the test split).
        val_samples: validation examples (the lr search's score and the curves); a dataset without a
            validation split has this many train examples held out instead (at most a fifth of them).
        eval_every: steps between validation evaluations of a seed run.
        seeds: seed runs per row (seeds 0, 1, ...): the table shows their mean and standard deviation.
        lr_search: search each row's lr on validation; otherwise every row trains at its default lr.
        lr_grid: lr candidates per row, log-spaced by ``LR_SPACING`` around the default.
        search_steps: steps of each candidate's run; 0: ``min(steps, 60)``.
        converged_tol: a seed run is converged when its validation loss improved by less than this
            fraction over the last third of its steps (:mod:`softprompt.plateau`); a row when all its seeds are.
        until_flat: a seed run stops as soon as it is converged (at least ``MIN_EVALS`` evaluations in);
            otherwise every seed run trains all ``steps``.
        adapter_size: bottleneck width of the adapter rows.
        schedule: the lr schedule of every run (``TrainArgs.schedule``). ``wsd`` (the default) keeps the lr
            constant until the plateau starts the cool-down, so whether and when a run converges does not
            depend on ``steps``; a run that never plateaus decays over its last quarter. ``linear`` decays
            over all ``steps`` (the tables before 2026-12 used it: a run at 400 steps kept annealing slowly
            and the plateau rule seldom held in its last hundred steps).
        metric: the validation metric every row's lr search ranks by and its curves show (``train``'s
            ``--metric``). ``auto`` is resolved once for the whole comparison (:func:`~softprompt.compare.run.
            selection_metric`: macro-F1 where one label dominates the validation split every run sees, else
            accuracy), so that every row ranks by the same one; ``compare.json`` records the resolved name.
        lr_extend: when the search's best candidate is the lowest or highest lr tried, up to this many more
            candidates, one ``LR_SPACING`` step at a time beyond that edge, while the edge keeps winning (an optimum
            at the edge of the range tried is not located); 0: the grid only. A choice still at an edge after
            them is marked in the table.
    """

    model: str
    dataset: str = "rotten_tomatoes"
    steps: int = 400
    batch_size: int = 16
    test_samples: int = 400
    val_samples: int = 200
    eval_every: int = 10
    seeds: int = 3
    lr_search: bool = True
    lr_grid: int = 3
    search_steps: int = 0
    converged_tol: float = 0.02
    adapter_size: int = 8
    until_flat: bool = True
    schedule: str = "wsd"
    metric: str = "auto"
    lr_extend: int = 2

    def problems(self) -> list[str]:
        """Every invalid setting, named by its flag."""
        out = [f"{flag(n)} must be >= 1, got {getattr(self, n)}"
               for n in ("steps", "batch_size", "test_samples", "val_samples", "eval_every", "seeds", "lr_grid",
                         "adapter_size") if getattr(self, n) < 1]
        out += [f"{flag(n)} must be >= 0, got {getattr(self, n)}" for n in ("search_steps", "lr_extend")
                if getattr(self, n) < 0]
        tol = check_real("--converged-tol", self.converged_tol, lambda v: 0 < v < 1, "in (0, 1)")
        if self.metric not in COMPARE_METRICS:
            out.append(f"--metric must be one of {', '.join(COMPARE_METRICS)}, got {self.metric!r}")
        if self.schedule not in SCHEDULES:
            out.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dataset not in BUILTIN_DATASETS:  # refused here, not by every method's run after loading the model
            out.append(f"--dataset {self.dataset!r} is not a built-in dataset; known: {', '.join(BUILTIN_DATASETS)}")
        return out + ([tol] if tol else [])

    @property
    def search_budget(self) -> int:
        return self.search_steps or min(self.steps, 60)

    @property
    def search_seed(self) -> int:
        """The lr search's seed: one no seed run uses (they use 0 .. seeds - 1). With seed 0, seed run 0 shared
        its init and data order with the candidate chosen for doing best on them, a bias towards that seed."""
        return self.seeds

    def to_dict(self) -> dict:
        return {**asdict(self), "search_steps": self.search_budget, "search_seed": self.search_seed}


def lr_grid(default: float, n: int) -> list[float]:
    """``n`` learning rates log-spaced by :data:`LR_SPACING` and centred on ``default`` (ascending).

    3 gives ``default`` x (0.32, 1, 3.2); 5 spans a decade either side; an even ``n`` straddles it.
    """
    return [lr_at(default, n, i) for i in range(n)]


def lr_at(default: float, n: int, i: int) -> float:
    """Candidate ``i`` of :func:`lr_grid` ``(default, n)``, for any ``i``: below 0 and from ``n`` on, the lrs one
    ``LR_SPACING`` step after another beyond the grid's edges (the search's extensions), at 3 significant
    digits as the grid's."""
    return float(f"{default * LR_SPACING ** (i - (n - 1) / 2):.3g}")


def context_problems(specs: list[Spec], model_name: str) -> list[str]:
    """The prompt specs that leave no room for text in the model's context (read from its config only)."""
    from softprompt.config import MIN_MAX_LENGTH
    from softprompt.model import context_length, load_model_config

    context = context_length(load_model_config(model_name))
    if context is None:
        return []
    limit, key = context
    problems = []
    for spec in specs:
        p = spec.config.get("num_virtual_tokens")
        if p is not None and limit - p < MIN_MAX_LENGTH:
            problems.append(f"{spec.label}: {p} virtual tokens leave {max(limit - p, 0)} positions for text in "
                            f"--model {model_name}'s context of {limit} positions ({key}); at least "
                            f"{MIN_MAX_LENGTH} are needed: choose a model with a longer context, or --only "
                            "kinds without prompts")
    return problems
