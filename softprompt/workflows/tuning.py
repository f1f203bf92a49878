"""The tune workflow: load the task and the model, search by successive halving, save (:mod:`softprompt.tune`)."""

from __future__ import annotations

from softprompt.tune import TuneArgs, TuneResult, learning_rates, run_tune, trial_specs
from softprompt.workflows.loading import fit_context, load_model_from_args, load_task_from_args


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
    return run_tune(args, tune, model, tok, task)
