"""Method comparison harness: the same data, base model, loop and step budget for every method.

Prompt methods (prompt tuning with several inits and lengths, prefix tuning, P-tuning) and weight methods
(LoRA through PEFT, Houlsby bottleneck adapters, BitFit, full fine-tuning) all train with
:func:`softprompt.train.train`; a weight method is wrapped as a "method" whose parameters live inside the
model and whose prompt is empty (:mod:`softprompt.compare.weights`).

A row is trustworthy only if its lr suits it and one seed's luck is not the result, so each row
(:func:`run_method`): searches its lr on a small log-spaced grid around its default, each candidate a short
run scored on the validation split only (:func:`search_lr`; the test split is dropped as soon as it is loaded,
and the search runs on a seed no seed run uses); trains ``seeds`` runs at the chosen lr, each measuring
validation periodically (the curve) and scored on test at the end; reports test accuracy as mean ± sample std
over the seeds, the mean train time and peak memory, the divergence guard's rollbacks, and whether every seed
run's validation curve has flattened (:func:`softprompt.compare.report.convergence`). Every run is a fresh
subprocess, so its peak memory (``VmHWM`` on Linux) is its own.

Modules: ``specs`` (rows, settings, lr grid), ``weights`` (weight baselines), ``run`` (one run), ``harness``
(search, seeds, the table), ``report`` (convergence, table, charts).
"""

from softprompt.compare.harness import resume_problem, run_compare, run_method, search_lr, summarise
from softprompt.compare.report import (
    convergence,
    format_failures,
    format_row,
    format_table,
    mean_curve,
    plot_compare,
    plot_curves,
)
from softprompt.compare.run import Job, ensure_validation, run_in_subprocess, run_one, selection_metric
from softprompt.compare.specs import (
    DEFAULT_SPECS,
    LR_SPACING,
    WEIGHT_KINDS,
    CompareSettings,
    Spec,
    context_problems,
    lr_grid,
    select_specs,
)
from softprompt.compare.weights import HoulsbyAdapter, WeightTuning, add_adapters, weight_method

__all__ = ["DEFAULT_SPECS", "LR_SPACING", "WEIGHT_KINDS", "CompareSettings", "HoulsbyAdapter", "Job", "Spec",
           "WeightTuning", "add_adapters", "context_problems", "convergence", "ensure_validation", "format_failures",
           "format_row", "format_table", "lr_grid", "mean_curve", "plot_compare", "plot_curves", "resume_problem",
           "run_compare",
           "run_in_subprocess", "run_method", "run_one", "search_lr", "select_specs", "selection_metric", "summarise",
           "weight_method"]
