"""``softprompt train``: train a prompt, evaluate it against the baselines, save it (and add it to a store).

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoint/``, ``best/`` (written whenever validation
improves), ``last/``, ``prompt/`` (the chosen prompt with its test metrics), ``eval.json`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from softprompt import methods
from softprompt.config import ConfigError, flag, to_yaml
from softprompt.data import DataError, bos_after_prompt, default_init_text, token_counts
from softprompt.evaluate import format_report
from softprompt.forward import family_of
from softprompt.methods import PromptMethod
from softprompt.plots import plot_curves
from softprompt.selection import metric_note, primary_metric
from softprompt.store import PromptStore, load_prompt, save_prompt, stored_member_problem
from softprompt.store.entries import task_labels
from softprompt.store.task_record import task_meta
from softprompt.train import TrainResult, distributed, train
from softprompt.workflows.baselines import evaluate_with_baselines
from softprompt.workflows.loading import load_model_from_args, load_task_from_args

log = logging.getLogger("softprompt")

# what a run writes beside train's own outputs (metrics.jsonl, checkpoint/, train_args.json): a fresh run in a
# used folder removes an earlier run's, also those it will not rewrite (best/ without validation, eval.json
# without a test split)
RUN_OUTPUTS = ("best", "last", "prompt", "eval.json", "curves.png")


def tuned_method(method: PromptMethod, result: TrainResult, out: Path, model) -> tuple[PromptMethod, dict]:
    """The prompt a run keeps, rebuilt in its stored (inference) form, and its validation metrics.

    That is the best validation step's state when validation ran, else the trained method as it ended.
    The module is built from the tensors a saved folder would hold, as loading ``best/`` or ``last/`` would
    build it, without the round trip through the disk.

    Args:
        method: the trained method; it takes the best state back (after ``last/`` was saved from it).
        result: what :func:`~softprompt.train.train` returned.
        out: the run folder (read only to resume a checkpoint written before checkpoints kept the best state).
        model: the frozen base model (the module is moved to its device).
    """
    if result.best_state is None and result.best_step is not None:  # such a checkpoint: its best/ has it
        chosen = load_prompt(out / "best", model)
        validation = {k: v for k, v in (chosen.meta.get("metrics") or {}).items() if k != "best_step"}
        return chosen.build_method().to(model.device).eval(), validation
    if result.best_state is not None:
        method.load_state_dict(result.best_state)
    tensors = {k: v.clone() for k, v in method.stored_tensors().items()}  # no storage shared with ``method``
    rebuilt = methods.method_from_saved(method.name, method.config.to_dict(), tensors)
    return rebuilt.to(model.device).eval(), dict(result.best_metrics or {})


def validation_only_flags(train) -> list[str]:
    """The :class:`~softprompt.config.TrainArgs` settings that act on the validation split only (set away from
    their defaults), each as a refusal for a task that has none."""
    defaults = {f.name: f.default for f in dataclasses.fields(train)}
    return [f"{flag(name)} {getattr(train, name)}: it acts on the validation split, and this task has none: give "
            f"--validation-file FILE, or leave it out (and train.{name} in --config)"
            for name in ("early_stopping_patience", "stop_when_flat", "metric", "eval_every")
            if getattr(train, name) != defaults[name]]


def train_and_save(args: dict, store: str | None = None, store_task: str | None = None,
                   split_given: bool = False) -> TrainResult | None:
    """Train a prompt, evaluate it against the baselines on the test split, save it; print the report.

    Args:
        args: resolved ``model``, ``data``, ``prompt``, ``train`` and ``eval`` sections (already checked).
        store: also add the prompt to this store (created if missing), unless the divergence guard ended
            the run.
        store_task: its task name in ``store``.
        split_given: the user set ``--split``: a task without that split is refused before training (as is
            any ``--split`` other than the default ``test``); without it, a task with no test split is trained
            and saved, not evaluated (a line says so).

    Returns:
        The training result (``result.diverged``: the guard ended the run, reported on stderr), or ``None``
        on a data-parallel run's other processes (the first one evaluates and saves).
    """
    distributed()  # a malformed launch environment (WORLD_SIZE) is refused before anything is written
    problem = args["train"].gradient_checkpointing and methods.checkpointing_problem(args["prompt"].method)
    if problem:  # before the data and the model load, not as a shape error at the first step
        raise ConfigError(f"invalid arguments:\n  {problem}")
    task = load_task_from_args(args["data"])
    # refuses a metric the objective does not measure; the one train() selects by on this validation split
    metric, _ = primary_metric(task.format, args["train"].metric, task.splits.get("validation") or [])
    note = metric_note(task.format, task.splits.get("validation") or [], args["train"].metric)
    if note:
        log.info("%s", note)
    task.examples("train")  # fail before anything is written or loaded if there is nothing to train on
    inert = [] if task.splits.get("validation") else validation_only_flags(args["train"])
    if inert:  # refused, not dropped in silence
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(inert))
    split = args["eval"].split
    if not task.splits.get(split) and (split_given or split != "test"):  # not found out after an hour of training
        try:
            task.examples(split)
        except DataError as e:
            raise ConfigError(f"--split {split}: the final evaluation reads it, and this task has {e}") from None
        raise ConfigError(f"--split {split}: the final evaluation reads it, and this task's {split} split is empty")
    if args["prompt"].init_text is None:  # fits the task being trained; config.yaml records the text used
        args["prompt"].init_text = default_init_text(args["data"].dataset, task.format)
    out = Path(args["train"].output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a resume rewrites config.yaml once its run is over: a refused one (other settings, a damaged
    # checkpoint) leaves the interrupted run's own settings there
    resuming = args["train"].resume and (out / "checkpoint" / "state.json").exists()
    if not resuming:
        (out / "config.yaml").write_text(to_yaml(args))
    fmt = task.format
    print(f"task: {args['data'].dataset or args['data'].train_file}  "
          + "  ".join(f"{k}={len(v)}" for k, v in task.splits.items())
          + (f" documents; {fmt.note}" if fmt.objective == "lm" else ""))
    t0 = time.perf_counter()
    model, tok = load_model_from_args(args, num_labels=len(fmt.labels) if fmt.is_classification else None)
    log.info("loaded %s in %.1fs", args["model"].model, time.perf_counter() - t0)
    if family_of(model).format_problem(model, fmt):
        raise ConfigError(f"--model {args['model'].model} is loaded as a sequence classifier (--task-type "
                          "seq_cls): the task needs labels (--verbalizer)")
    counts = token_counts(tok, task.examples("train"))
    try:
        method = methods.build_method(args["prompt"].method, args["prompt"].method_config(args["train"].seed),
                                      model, tok, label_texts=fmt.label_texts if fmt.is_classification else None,
                                      token_counts=counts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"method: {method.name}" + (f" + {type(model).__name__} head ({method.classifier.num_labels} classes)"
                                      if method.classifier is not None else "")
          + f", {method.num_trainable():,} trainable parameters "
          f"(base model {sum(p.numel() for p in model.parameters()):,}, frozen)"
          + (f"; init text {args['prompt'].init_text!r}" if args["prompt"].init == "text" else ""))
    meta = task_meta(args["data"], fmt)
    if store:  # an ensemble this entry belongs to must take the prompt: refused now, not after training
        problem = stored_member_problem(store, store_task, task_labels(meta, "the task"), model)
        if problem:
            raise ConfigError(f"invalid arguments:\n  {problem}")
    bos = bos_after_prompt(fmt)  # the layout it trains with
    # the --split examples are encoded now as training encodes (validation too, in train): a chat conversation
    # with no whole answer in --max-length, or a target over it, stopped the run after training, before its report
    if task.splits.get(split) and split not in ("train", "validation"):
        try:
            family_of(model).encode_examples(tok, task.examples(split), fmt, args["data"].max_length, bos)
        except DataError as e:
            raise DataError(f"{split} split: {e}") from None
    train_cfg = {k: dataclasses.asdict(v) for k, v in args.items()}

    def save_best(m, metrics):
        save_prompt(out / "best", m, model, task=meta, train_config=train_cfg, metrics=metrics, overwrite=True,
                    bos=bos)

    result = train(model, tok, method, task, args["train"], save_best=save_best,
                   eval_batch_size=args["eval"].eval_batch_size, max_length=args["data"].max_length,
                   max_new_tokens=args["eval"].max_new_tokens, outputs=RUN_OUTPUTS)
    if distributed()[0] != 0:  # data-parallel run: the first process evaluates and saves
        return None
    if resuming:
        (out / "config.yaml").write_text(to_yaml(args))
    print(f"trained {result.steps} steps in {result.seconds:.0f}s"
          + (f"; best validation {metric} {result.best_metric:.4f} at step {result.best_step}"
             if result.best_metric is not None else ""))
    if result.rollbacks:
        print(f"divergence guard: {result.rollbacks} rollback(s), lr lowered to x{result.lr_scale:g} of the schedule "
              f"(events in {out / 'metrics.jsonl'})")
    save_prompt(out / "last", method, model, task=meta, train_config=train_cfg, overwrite=True, bos=bos)
    tuned, validation = tuned_method(method, result, out, model)
    plot_curves(out / "metrics.jsonl", out / "curves.png")

    def save_tuned(report: dict) -> None:
        save_prompt(out / "prompt", tuned, model, task=meta, train_config=train_cfg,
                    metrics={"validation": validation, "best_step": result.best_step,
                             split: _numbers(report.get("tuned soft prompt"))}, overwrite=True, bos=bos)

    save_tuned({})  # before the report: an evaluation that fails cannot lose the trained prompt
    report: dict = {}
    if not task.splits.get(split):  # the default --split test of a task without one
        print(f"\nno {split} split: the prompt was not evaluated (give --test-file FILE, or evaluate it later with "
              f"softprompt eval --prompt {out / 'prompt'} --test-file FILE)")
    else:
        with torch.no_grad():
            kv = family_of(model).inference_prompt(model, tuned())
        report = evaluate_with_baselines(model, tok, task, args, args["prompt"].init_text, task.examples(split), kv)
        unit = "documents" if fmt.objective == "lm" else "examples"
        print(f"\n{split} split ({len(task.examples(split))} {unit}):")
        print(format_report(report))
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        save_tuned(report)  # again, with its test metrics
    print(f"\nsaved prompt to {out / 'prompt'}  (curves: {out / 'curves.png'}, log: {out / 'metrics.jsonl'})")
    if result.diverged:
        report_divergence(args, result, out, store, store_task)
    elif store:
        PromptStore(store, create=True).add(store_task, out / "prompt", overwrite=True)
        print(f"added to store {store} as task {store_task!r}")
    return result


def _numbers(metrics: dict | None) -> dict | None:
    """The metrics without a chat report's sample replies (the stored prompt records numbers only)."""
    return None if metrics is None else {k: v for k, v in metrics.items() if k != "samples"}


def _logged_rows(path: Path) -> list:
    """The readable lines of a run's ``metrics.jsonl`` (none when it cannot be read)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def report_divergence(args: dict, result: TrainResult, out: Path, store: str | None = None,
                      store_task: str | None = None) -> None:
    """Tell on stderr that the divergence guard ended the run, what was kept, and what to try.

    Args:
        args: the run's resolved sections (``train`` is quoted).
        result: the diverged run's result.
        out: the run folder.
        store: the ``--store`` the prompt was not added to (its ``store add`` command is suggested).
        store_task: the task name it would have had there.
    """
    train_args = args["train"]
    if result.best_step is not None:
        kept = f"the best validation prompt (step {result.best_step})"
    else:  # the guard restored the last good copy before stopping (a resumed run's history is in the log)
        rows = result.history or _logged_rows(out / "metrics.jsonl")
        back = [r["rolled_back_to"] for r in rows if isinstance(r, dict) and "rolled_back_to" in r]
        kept = f"the last good prompt (step {back[-1]})" if back else "the last good prompt"
    lines = [f"softprompt train: error: the training diverged: the divergence guard stopped it at step {result.steps} "
             f"after {result.rollbacks} rollback(s) (--max-rollbacks {train_args.max_rollbacks}; lr lowered to "
             f"x{result.lr_scale:g} of --lr {train_args.lr:g}); reasons: the \"event\" lines of "
             f"{out / 'metrics.jsonl'}",
             f"  kept: {kept}, evaluated above and saved to {out / 'prompt'}"]
    if store:
        lines.append(f"  not added to --store {store}: add it by hand if its evaluation suits you: "
                     f"softprompt store add --store {store} {store_task} {out / 'prompt'} --overwrite")
    lines.append(f"  try: a lower --lr (e.g. {train_args.lr / 2:g}), more --warmup-steps, fewer --num-virtual-tokens "
                 f"or a smaller --max-grad-norm; --max-rollbacks {max(1, 2 * train_args.max_rollbacks)} lets "
                 "the guard halve the lr more often")
    print("\n".join(lines), file=sys.stderr)
