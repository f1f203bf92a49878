"""The tune workflow: load the task and the model, search by successive halving, save (:mod:`softprompt.tune`)."""

from __future__ import annotations

import dataclasses

from softprompt.data import TaskData
from softprompt.data.dataset import example_key
from softprompt.tune import TuneArgs, TuneResult, learning_rates, run_tune, trial_specs
from softprompt.tune.versus import unread_sample
from softprompt.workflows.loading import fit_context, load_model_from_args, load_task_from_args


def unread_validation(data, task: TaskData) -> list:
    """The validation examples past ``--max-validation-samples`` (a seeded sample of at most
    :data:`softprompt.tune.versus.MAX_UNREAD`): the search ranks on the subset the task was loaded with, and its
    winner is also compared with the untuned run on these, which no selection read. Empty when the whole split
    was loaded, when there is none, or for a task the comparison is not made for (not label classification)."""
    if not data.max_validation_samples or not task.splits.get("validation") or not task.format.is_classification \
            or task.format.objective == "lm":
        return []
    whole = load_task_from_args(dataclasses.replace(data, max_validation_samples=0))
    read = {example_key(ex) for ex in task.splits["validation"]}
    return unread_sample([ex for ex in whole.splits.get("validation") or [] if example_key(ex) not in read],
                         data.data_seed)


def tune_and_save(args: dict, tune: TuneArgs, max_length_given: bool) -> TuneResult:
    """Search the learning rate (and any ``--search`` settings) on the validation split; save the best prompt.

    Args:
        args: resolved ``model``, ``data``, ``prompt``, ``train`` and ``eval`` sections.
        tune: the search's settings.
        max_length_given: the user set ``--max-length`` (else it is lowered to fit the longest prompt).

    Returns:
        The search's result; ``best`` is None when every trial diverged or failed.
    """
    learning_rates(tune, args["train"].lr, args["train"].seed)  # a grid that overflows: refused before loading
    trial_specs(tune, args["prompt"], args["train"])  # so is a space with no trial the settings allow
    fit_context(args, max_length_given, tune.max_virtual_tokens(args["prompt"].num_virtual_tokens))
    task = load_task_from_args(args["data"])
    fmt = task.format
    model, tok = load_model_from_args(args, num_labels=len(fmt.labels) if fmt.is_classification else None)
    return run_tune(args, tune, model, tok, task, unread_validation=unread_validation(args["data"], task))
