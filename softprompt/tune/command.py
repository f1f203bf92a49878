"""What ``softprompt tune`` does once its arguments are resolved: flags, validation split, search, files, store.

The command needs the validation split: a task without one is refused (naming ``--validation-file``), unless
``--validation-from-train FRACTION`` asks to hold out part of the training data, which is done
deterministically (seeded by ``--data-seed``) and said on the console. Refusing is the default because a
silent hold-out would train the tuned prompt on less data than ``softprompt train`` uses, without the user
having chosen it; the test split is never a fallback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softprompt.config import MAX_SEED, ConfigError
from softprompt.data import TaskData
from softprompt.data.dataset import example_key, examples_digest
from softprompt.data.splits import carve
from softprompt.selection import metric_note
from softprompt.tune.ensemble import measure, not_built_reason, summary_line
from softprompt.tune.halving import successive_halving
from softprompt.tune.report import format_table, write_reports
from softprompt.tune.space import SEARCHABLE, TuneArgs, epochs_problem, member_names
from softprompt.tune.trials import TuneResult, lr_edge_note
from softprompt.tune.versus import versus_untuned

log = logging.getLogger(__name__)


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the search flags of ``softprompt tune`` (the model/data/prompt/train/eval sections come from config)."""
    g = parser.add_argument_group(
        "tune (successive halving on the validation split; each trial is a normal training run, --lr searched)")
    g.add_argument("--lrs", help="comma-separated learning rates to try (default: 9 values from --lr/27 to --lr*3)")
    g.add_argument("--lr-range", nargs=2, metavar=("LOW", "HIGH"), help="try --num-trials learning rates in this range")
    g.add_argument("--num-trials", type=int, help="how many learning rates --lr-range gives (default 9)")
    g.add_argument("--lr-sampling", default="grid", help="grid (log-spaced, ends included) or random (log-uniform, "
                                                         "seeded by --seed) over --lr-range; default grid")
    g.add_argument("--search", action="append", default=[], metavar="KEY=V1,V2",
                   help=f"also search these values (repeatable; KEY: {', '.join(SEARCHABLE)}), e.g. "
                        "--search num_virtual_tokens=10,20,50 --search method=prompt_tuning,prefix_tuning")
    g.add_argument("--budget-steps", type=int, help="total optimizer steps over all trials")
    g.add_argument("--budget-minutes", type=float,
                   help="wall clock for the search: a trial segment starts only when the earlier segments' times "
                        "say it ends within it; the first always runs (nothing is timed before it), and the "
                        "report says when the search ran past the budget")
    g.add_argument("--eta", type=int, default=3, help="keep the best 1/eta of the trials at each rung (default 3)")
    g.add_argument("--min-steps", type=int, help="steps every trial gets at rung 0 (default: from the budget or the "
                                                 "run length, and no sooner than 3 x --warmup-steps)")
    g.add_argument("--top-k", type=int, default=1, help="save the k best prompts (with --store: k > 1 adds them "
                                                        "as TASK-1..TASK-k and an ensemble TASK)")
    g.add_argument("--ensemble-seeds", type=int, metavar="N",
                   help="after the search, train the winner's configuration with N seeds (its own run is one) and "
                        "report the validation gain of their mean ensemble over the mean single prompt; with "
                        "--store they are TASK-1..TASK-N and the ensemble TASK (classification tasks only)")
    g.add_argument("--keep-default", action=argparse.BooleanOptionalAction, default=None,
                   help="continue the untuned trial (--lr, the prompt settings train would use) to the end whatever "
                        "its rank, beside the best ones, so that the search never returns a worse validated prompt "
                        "than its own run of softprompt train's; on by default, --no-keep-default to drop it")
    g.add_argument("--store", help="add the result to this prompt store (created if missing)")
    g.add_argument("--task", help="entry name in --store")
    g.add_argument("--validation-from-train", type=float, metavar="FRACTION",
                   help="when the task has no validation split, hold out this fraction of train (seeded by "
                        "--data-seed); without it such a task is refused")


def _floats(flag: str, values: list[str], problems: list[str]) -> list[float] | None:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            problems.append(f"{flag}: {v!r} is not a number")
    return out if len(out) == len(values) else None


def _search_values(key: str, text: str, problems: list[str]) -> list[Any] | None:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if key != "num_virtual_tokens":
        return values
    try:
        return [int(v) for v in values]
    except ValueError:
        problems.append(f"--search num_virtual_tokens={text}: every value must be an integer")
        return None


def ignored_train_flags(train, tune: TuneArgs | None = None, epochs_given: bool = False) -> list[str]:
    """The train settings (:class:`~softprompt.config.TrainArgs`) a search would drop, each with why: trials
    start again rather than resume, and are ranked at fixed rungs, so none stops early; and with ``tune``,
    ``--epochs`` where ``--budget-steps`` sets the trials' length (``epochs_given``: the user set it)."""
    epochs = epochs_problem(tune, train, epochs_given) if tune is not None else None
    out = [epochs] if epochs else []
    out += [] if not train.resume else ["--resume: tune does not resume an interrupted search; it starts again and "
                                       "replaces the trials, best_prompt and top/ in --output-dir: leave --resume "
                                       "out (and train.resume in --config), or use another --output-dir to keep "
                                       "the old search"]
    return out + [f"{flag}: tune ranks trials at fixed rungs, so no trial stops early; leave it out (and "
                  f"train.{name} in --config)" for flag, name in (("--stop-when-flat", "stop_when_flat"),
                                                                 ("--early-stopping-patience",
                                                                  "early_stopping_patience"))
                  if getattr(train, name)]


def ignored_eval_flags(ev) -> list[str]:
    """The :class:`~softprompt.config.EvalArgs` settings a search never reads (set away from their defaults), each
    as a refusal: it scores trials on the validation split alone, without baselines, and never reads test."""
    from softprompt.config import EvalArgs

    defaults = EvalArgs()
    return [f"{flag} {','.join(v) if isinstance(v, list) else v}: tune scores its trials on the validation split "
            f"alone, without baselines; leave it out (and eval.{name} in --config), and evaluate the saved prompt "
            "with softprompt eval --prompt DIR" for flag, name in (("--split", "split"), ("--baselines", "baselines"),
                                                                    ("--k-shot", "k_shot"))
            if (v := getattr(ev, name)) != getattr(defaults, name)]


def tune_args_from_namespace(ns: argparse.Namespace) -> tuple[TuneArgs | None, list[str]]:
    """The :class:`TuneArgs` of parsed flags, and every problem found (then the args are None).

    The problems are meant to be reported together with the other sections' (``_resolve(ns, ..., problems)``).
    """
    problems: list[str] = []
    fields: dict[str, Any] = {}
    if ns.lrs is not None:
        fields["lrs"] = _floats("--lrs", [v.strip() for v in ns.lrs.split(",") if v.strip()], problems)
        if fields["lrs"] is None:
            del fields["lrs"]
    if ns.lr_range is not None:
        pair = _floats("--lr-range", list(ns.lr_range), problems)
        if pair is not None:
            fields["lr_range"] = tuple(pair)
    search: dict[str, list[Any]] = {}
    for entry in ns.search:
        key, sep, text = entry.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            problems.append(f"--search {entry!r}: expected KEY=V1,V2,... (KEY: {', '.join(SEARCHABLE)})")
        elif key in search:
            problems.append(f"--search {key} given twice: list all its values in one --search")
        else:
            values = _search_values(key, text, problems)
            if values is not None:
                search[key] = values
    fields["search"] = search
    for name in ("num_trials", "lr_sampling", "budget_steps", "budget_minutes", "eta", "min_steps", "top_k", "store",
                 "task", "validation_from_train", "ensemble_seeds", "keep_default"):
        if getattr(ns, name) is not None:
            fields[name] = getattr(ns, name)
    try:
        tune = TuneArgs(**fields)
    except ConfigError as e:
        problems += str(e).removeprefix("invalid arguments:\n  ").split("\n  ")
        return None, problems
    return (None, problems) if problems else (tune, [])


def with_validation(task: TaskData, tune: TuneArgs, seed: int, echo: Callable[[str], None] = print) -> TaskData:
    """``task`` with a validation split to select on (see the module docstring for the policy).

    Raises:
        ConfigError: no validation split and no ``--validation-from-train``, or too little data to hold out.
    """
    if task.splits.get("validation"):
        if tune.validation_from_train is not None:
            log.info("--validation-from-train ignored: the task has a validation split (%d examples)",
                     len(task.splits["validation"]))
        return task
    if tune.validation_from_train is None:
        raise ConfigError("softprompt tune selects on the validation split and this task has none: pass "
                          "--validation-file FILE, or --validation-from-train FRACTION to hold out part of the "
                          "training data (the test split is never used for selection)")
    train = task.examples("train")
    n_val = max(1, round(len(train) * tune.validation_from_train))
    # by content: every copy of a duplicated example on one side; by label for a classification task
    labels = [ex.label for ex in train] if task.format.is_classification else None
    held, rest = carve([example_key(ex) for ex in train], [n_val], f"{seed}:tune-validation", labels)
    if not rest:
        raise ConfigError(f"--validation-from-train {tune.validation_from_train:g}: the {len(train)} training "
                          "examples leave nothing to train on")
    distinct = len({example_key(ex) for ex in train})
    echo(f"no validation split: held out {len(held)} of the {len(train)} training examples as validation "
         f"(--validation-from-train {tune.validation_from_train:g}, --data-seed {seed}"
         + (", by label" if labels is not None else "")
         + (f"; copies of one example kept together: {distinct} distinct" if distinct < len(train) else "")
         + f"); the prompt trains on the other {len(rest)}")
    splits = dict(task.splits)
    splits["train"] = [train[i] for i in rest]
    splits["validation"] = [train[i] for i in held]
    return TaskData(task.format, splits)


def check_store(tune: TuneArgs, ensemble: bool = True) -> None:
    """Refuse, before any training, a ``--store`` that is not a store or whose ``--task`` entries are of the
    other kind (a prompt where the top-k ensemble would go, or the reverse). ``ensemble``: whether a top-k
    ensemble can be built for this task (else ``--task`` gets the best prompt alone).

    Raises:
        StoreError: ``--store`` is a non-empty folder that is not a prompt store.
        ConfigError: an entry to be written exists with the other kind.
    """
    if not tune.store or not Path(tune.store).is_dir() or not any(Path(tune.store).iterdir()):
        return
    from softprompt.store import PromptStore

    store = PromptStore(tune.store)
    k = tune.ensemble_seeds or (tune.top_k if ensemble else 1)
    wanted = {tune.task: "ensemble" if k > 1 else "prompt"}
    if k > 1:
        wanted.update(dict.fromkeys(member_names(tune.task, k), "prompt"))
    a = {"prompt": "a prompt", "ensemble": "an ensemble"}
    clash = [f"{name!r} is {a.get(store.kind(name), store.kind(name))}, tune writes {a[kind]} there"
             for name, kind in wanted.items() if name in store and store.kind(name) != kind]
    if clash:
        flags = f"--ensemble-seeds {k}" if tune.ensemble_seeds else f"--top-k {tune.top_k}"
        raise ConfigError(f"--store {tune.store} --task {tune.task} {flags}: {'; '.join(clash)}; "
                          "remove those entries (softprompt store remove) or choose another --task")


def _remove_stale_outputs(out: Path) -> None:
    """Delete what an earlier search saved in ``out`` (``best_prompt/``, ``top/N/``, ``seeds/seedS/`` and its
    ``trials.json/.md/.png``), so that a search that saves nothing (every trial diverged) leaves no older prompt
    looking like its result, and one killed before its first report leaves no older report beside its
    ``tune.json``."""
    import shutil

    for name in ("trials.json", "trials.md", "trials.png"):
        (out / name).unlink(missing_ok=True)

    stale = [out / "best_prompt"] + (sorted(p for p in (out / "top").iterdir() if p.name.isdigit())
                                     if (out / "top").is_dir() else [])
    stale += sorted(p for p in (out / "seeds").iterdir() if re.fullmatch(r"seed\d+", p.name)) \
        if (out / "seeds").is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p)


def _copy_prompt(src: Path, dst: Path, model, extra_metrics: dict) -> Path:
    """Save the trial prompt at ``src`` again at ``dst`` (validated on the way), adding to its metrics."""
    from softprompt.store import load_prompt, save_prompt

    stored = load_prompt(src, model)
    return save_prompt(dst, stored.build_method(), model, task=stored.task,
                       train_config=stored.meta.get("train_config"),
                       metrics={**stored.meta.get("metrics", {}), **extra_metrics}, overwrite=True, bos=stored.bos)


def save_results(result: TuneResult, out: Path, model, tune: TuneArgs, echo: Callable[[str], None] = print,
                 ensemble: bool = True) -> None:
    """``best_prompt/``, ``top/<rank>/`` (k > 1), and with ``--store`` the entry ``--task``: the top-k ensemble
    (over entries ``<task>-1..k``), or the best prompt alone when ``ensemble`` is false (no ensemble can be built
    for the task) or fewer than two trials finished."""
    top = result.top(tune.top_k)
    if not top:
        return
    _copy_prompt(top[0].prompt_dir, out / "best_prompt", model, {"tune": {"trial": top[0].id, "rank": 1}})
    if tune.top_k > 1:
        for rank, t in enumerate(top, 1):
            _copy_prompt(t.prompt_dir, out / "top" / str(rank), model, {"tune": {"trial": t.id, "rank": rank}})
        if len(top) < tune.top_k:
            echo(f"--top-k {tune.top_k}: only {len(top)} trials finished; saved those")
    if not tune.store or tune.ensemble_seeds:  # --ensemble-seeds: the seed ensemble goes there instead
        return
    from softprompt.store import PromptStore

    store = PromptStore(tune.store, create=True)
    if len(top) < 2 or not ensemble:
        if tune.task in store and store.kind(tune.task) == "ensemble":  # from an earlier search of this task
            echo(f"store {tune.store}: {tune.task!r} is an ensemble, and only one prompt is to be stored: the store "
                 f"was left as it was; the best prompt is in {out / 'best_prompt'}")
            return
        store.add(tune.task, out / "best_prompt", overwrite=True)
        echo(f"added the best prompt to store {tune.store} as {tune.task!r}")
        return
    members = member_names(tune.task, len(top))
    for name, rank in zip(members, range(1, len(top) + 1), strict=True):
        store.add(name, out / "top" / str(rank), overwrite=True)
    store.add_ensemble(tune.task, members, "mean", overwrite=True)
    echo(f"added the {len(top)} best prompts to store {tune.store} as {', '.join(members)} and the ensemble "
         f"{tune.task!r} over them")


def run_tune(args: dict[str, Any], tune: TuneArgs, model, tokenizer, task: TaskData,
             echo: Callable[[str], None] = print, unread_validation: list | None = None) -> TuneResult:
    """Do what ``softprompt tune`` does, given resolved sections and the loaded model, tokenizer and task.

    Args:
        args: ``{"model", "data", "prompt", "train", "eval"}`` dataclasses (as ``softprompt train`` resolves them;
            ``data.max_length`` already fitted to the longest searched prompt, see
            :meth:`TuneArgs.max_virtual_tokens`).
        tune: the search flags.
        model: the frozen base model.
        tokenizer: its tokenizer.
        task: the loaded task (a validation split is needed; see :func:`with_validation`).
        echo: where the console lines go.
        unread_validation: validation examples the search does not rank on (past --max-validation-samples):
            the winner is compared with the untuned run on them too (:mod:`softprompt.tune.versus`).

    Returns:
        The search result; ``result.best`` is None when no trial finished (every one diverged or failed): the
        command should then exit 1.

    Files in ``--output-dir``: ``trials.json``, ``trials.md``, ``trials.png``, ``tune.json`` (the flags),
    ``trials/tNN/`` (each trial's run), ``best_prompt/``, ``top/1..k/`` with ``--top-k`` > 1.
    """
    from softprompt.data import default_init_text
    from softprompt.store.task_record import task_meta

    data, prompt, train_args = args["data"], args["prompt"], args["train"]
    if tune.ensemble_seeds and train_args.seed + tune.ensemble_seeds - 1 > MAX_SEED:  # seeds --seed, --seed + 1...
        raise ConfigError(f"invalid arguments:\n  --ensemble-seeds {tune.ensemble_seeds} trains seeds "
                          f"{train_args.seed} to {train_args.seed + tune.ensemble_seeds - 1}, past the largest seed "
                          f"{MAX_SEED}: give a lower --seed")
    flags = tune  # as given (tune.json records them)
    skipped = {}
    reason = not_built_reason(task.format, model) if tune.ensemble_seeds else None
    if reason:
        echo(f"--ensemble-seeds {tune.ensemble_seeds}: no seed ensemble is built: {reason}; the search runs as "
             "without the flag")
        skipped["seeds"] = {"kind": "seeds", "skipped": reason}
        tune = dataclasses.replace(tune, ensemble_seeds=None)
    top_k_reason = (not_built_reason(task.format, model) if tune.store and tune.top_k > 1 and not tune.ensemble_seeds
                    else None)
    if top_k_reason:
        echo(f"--top-k {tune.top_k} --store: no ensemble is built: {top_k_reason}; the store gets the best prompt as "
             f"{tune.task!r} (top/1..{tune.top_k} are still saved)")
    check_store(tune, ensemble=top_k_reason is None)
    given_task, task = task, with_validation(task, tune, data.data_seed, echo)
    note = metric_note(task.format, task.splits["validation"], train_args.metric)
    if note:
        log.info("%s", note)
    if prompt.init_text is None:  # as softprompt train: fits the task; recorded with every prompt
        prompt = dataclasses.replace(prompt, init_text=default_init_text(data.dataset, task.format))
    out = Path(train_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = {k: dataclasses.asdict(v) for k, v in args.items()}
    if task is not given_task:  # the prompts train on part of --train-file: every stored prompt records which
        sections["data"]["validation_from_train"] = {
            "fraction": tune.validation_from_train, "data_seed": data.data_seed,
            "train_examples": len(task.splits["train"]), "validation_examples": len(task.splits["validation"]),
            "validation_digest": examples_digest(task.splits["validation"])}
    doc = {"tune": dataclasses.asdict(flags), **sections, "prompt": dataclasses.asdict(prompt)}

    def start() -> None:  # once the search's own checks passed: a refused search leaves an earlier one whole
        _remove_stale_outputs(out)
        (out / "tune.json").write_text(json.dumps(doc, indent=2, default=str))
        echo(f"task: {data.dataset or data.train_file}  " + "  ".join(f"{k}={len(v)}" for k, v in task.splits.items()
                                                                   if k != "test"))

    result = successive_halving(
        model, tokenizer, task, prompt, train_args, tune, output_dir=out, eval_batch_size=args["eval"].eval_batch_size,
        max_length=data.max_length, task_meta=task_meta(data, task.format),
        train_config={k: v for k, v in sections.items() if k in ("model", "data", "eval")},
        progress=lambda partial: write_reports(partial, out, png=False), ensemble_seeds=tune.ensemble_seeds,
        max_new_tokens=args["eval"].max_new_tokens, before_run=start)
    edge = lr_edge_note(result)
    if edge:  # in trials.md's notes and on the console
        result.notes.append(edge)
        log.warning("tune: %s", edge)
    paths = write_reports(result, out)
    save_results(result, out, model, tune, echo, ensemble=top_k_reason is None)
    ensembles = {**skipped, **build_ensembles(result, out, model, tokenizer, task, tune, args, echo)}
    try:  # a report on top of a finished search: its failure is said, the search's results stand
        versus = versus_untuned(result, model, tokenizer, task.examples("validation"), task.format,
                                args["eval"].eval_batch_size, data.max_length, unread_validation)
    except (RuntimeError, ValueError, OSError) as e:
        log.warning("the winner against the untuned run: not compared (%s: %s)", type(e).__name__, e)
        versus = {"skipped": f"{type(e).__name__}: {e}"}
    if ensembles or versus:  # trials.json/.md get them
        result.ensembles, result.versus_untuned = ensembles, versus
        paths = write_reports(result, out)
    if ensembles:
        (out / "tune.json").write_text(json.dumps({**doc, "ensembles": ensembles}, indent=2, default=str))
    echo("\n" + format_table(result))
    best = result.best
    if best is None:
        echo(f"every trial diverged, failed or did not run: no prompt saved (see {paths['md']})")
    else:
        at = best.last.best_step if best.last.best_step is not None else best.steps
        echo(f"best: {best.id} {best.spec.label()}, validation {result.metric} {best.last.metric:.4f} at step "
             f"{at} of {best.steps}; saved to {out / 'best_prompt'}")
    for report in ensembles.values():
        if "skipped" not in report:
            echo(summary_line(report))
    echo(f"trials: {paths['md']}, {paths['json']}, {paths['png']}")
    return result


def build_ensembles(result: TuneResult, out: Path, model, tokenizer, task: TaskData, tune: TuneArgs,
                    args: dict[str, Any], echo: Callable[[str], None] = print) -> dict[str, dict]:
    """The top-k ensemble (``--top-k`` > 1) and the seed ensemble (``--ensemble-seeds``), each scored on the
    validation split through the engine (:mod:`softprompt.tune.ensemble`); with ``--store`` the seed ensemble
    is added to it (the top-k one already is, by :func:`save_results`).

    Returns:
        ``{"top_k": report, "seeds": report}`` for those asked for; a report is ``{"kind", "skipped": why}``
        when the ensemble could not be built.
    """
    reports: dict[str, dict] = {}
    common = dict(model=model, tokenizer=tokenizer, examples=task.examples("validation"), fmt=task.format,
                  metric=result.metric, higher=result.higher_is_better, batch_size=args["eval"].eval_batch_size,
                  max_length=args["data"].max_length, store_dir=tune.store)
    top = result.top(tune.top_k)
    if tune.top_k > 1 and len(top) > 1:
        reason = not_built_reason(task.format, model)
        if reason:
            echo(f"--top-k {tune.top_k}: the ensemble's gain over a single prompt is not measured: {reason}")
            reports["top_k"] = {"kind": "top_k", "skipped": reason}
        else:
            name = tune.task or "top"
            members = [{"name": m, "trial": t.id, "prompt_dir": out / "top" / str(rank)}
                       for rank, (m, t) in enumerate(zip(member_names(name, len(top)), top, strict=True), 1)]
            reports["top_k"] = measure("top_k", name, members, **common)
    if not tune.ensemble_seeds:
        return reports
    runs, n = result.seed_runs, tune.ensemble_seeds
    for t in runs:
        if t.status != "ok":
            echo(f"--ensemble-seeds: the seed run {t.id} {t.status} ({t.note}); left out of the ensemble")
    ok = [t for t in runs if t.status == "ok"]
    if len(ok) < 2:
        why = ("no trial finished" if result.best is None else
               f"only {len(ok)} of the {n} seed runs finished") + ": an ensemble needs two prompts"
        echo(f"--ensemble-seeds {n}: no seed ensemble: {why}" + (
            f"; nothing added to --store {tune.store}" if tune.store else ""))
        reports["seeds"] = {"kind": "seeds", "skipped": why}
        return reports
    name = tune.task or "seeds"
    seed = args["train"].seed
    members = [{"name": m, "trial": t.id, "seed": seed if t.seed is None else t.seed, "prompt_dir": t.prompt_dir}
               for m, t in zip(member_names(name, len(ok)), ok, strict=True)]
    reports["seeds"] = {**measure("seeds", name, members, **common), "winner": result.best.id}
    if tune.store:
        echo(f"added the {len(ok)} seed prompts of {result.best.id} to store {tune.store} as "
             f"{', '.join(m['name'] for m in members)} and the ensemble {name!r} over them")
    return reports
