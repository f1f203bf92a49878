"""What a command does, apart from parsing its flags: train-and-save, tune, evaluate with baselines, evaluate
a store, an engine for generation.

The command line (:mod:`softprompt.cli`) checks the flags, resolves the config sections and calls one of
these; they load the task and the model, run the work and print the command's report.
"""

from softprompt.store.task_record import task_meta
from softprompt.workflows.baselines import classifier_baselines, evaluate_with_baselines
from softprompt.workflows.evaluation import evaluate_store, evaluate_stored_prompt
from softprompt.workflows.generation import engine_for
from softprompt.workflows.loading import fit_context, load_model_from_args, load_task_from_args
from softprompt.workflows.training import report_divergence, train_and_save, tuned_method
from softprompt.workflows.tuning import tune_and_save

__all__ = [
    "classifier_baselines",
    "engine_for",
    "evaluate_store",
    "evaluate_stored_prompt",
    "evaluate_with_baselines",
    "fit_context",
    "load_model_from_args",
    "load_task_from_args",
    "report_divergence",
    "task_meta",
    "train_and_save",
    "tune_and_save",
    "tuned_method",
]
