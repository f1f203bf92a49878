"""``softprompt tune``: successive halving over the learning rate (and prompt length, init, method).

Public API:
    :func:`successive_halving` (the search on a loaded model), :func:`run_tune` (what the command does),
    :func:`add_tune_arguments` / :func:`tune_args_from_namespace` (its flags), :class:`TuneArgs`,
    :class:`TuneResult`, :func:`plan_rungs`.
"""

from softprompt.tune.command import (
    add_tune_arguments,
    ignored_eval_flags,
    ignored_train_flags,
    run_tune,
    save_results,
    tune_args_from_namespace,
    with_validation,
)
from softprompt.tune.halving import successive_halving
from softprompt.tune.report import format_table, plot_trials, write_reports
from softprompt.tune.space import Plan, TrialSpec, TuneArgs, learning_rates, plan_rungs, trial_specs
from softprompt.tune.trials import RungResult, Trial, TuneResult, lr_edge_note, rank_key

__all__ = [
    "Plan",
    "RungResult",
    "Trial",
    "TrialSpec",
    "TuneArgs",
    "TuneResult",
    "add_tune_arguments",
    "format_table",
    "ignored_eval_flags",
    "ignored_train_flags",
    "learning_rates",
    "plan_rungs",
    "plot_trials",
    "lr_edge_note",
    "rank_key",
    "run_tune",
    "save_results",
    "successive_halving",
    "trial_specs",
    "tune_args_from_namespace",
    "with_validation",
    "write_reports",
]
