"""``softprompt eval``: a stored prompt beside the baselines on its task, or a store's tasks on their datasets."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from softprompt.config import ConfigError, EvalArgs, check_seed, flag
from softprompt.data import DataError, TaskData, default_init_text, is_chat
from softprompt.data.dataset import examples_digest
from softprompt.engine import Engine, EngineError
from softprompt.evaluate import evaluate_on_engine, evaluate_prompt
from softprompt.forward import family_of
from softprompt.store import PromptStore, StoreError, check_model_compatible, load_prompt
from softprompt.store.task_record import TaskRecord
from softprompt.workflows.baselines import evaluate_with_baselines
from softprompt.workflows.loading import load_model_from_args, load_task_from_args

log = logging.getLogger("softprompt")


# data flags an evaluation takes from the training run unless given; the ones a recorded value must pass to be
# taken (a stored prompt is untrusted input)
RECORDED = ("data_seed", "max_length", "max_train_samples", "max_validation_samples", "max_test_samples")
_VALID = {"data_seed": lambda v: not check_seed("", v), "max_length": lambda v: v >= 2,
          "max_train_samples": lambda v: v >= 0, "max_validation_samples": lambda v: v >= 0,
          "max_test_samples": lambda v: v >= 0}


def apply_recorded_data(meta: dict, record: TaskRecord | None, data, given: set[str], name: str) -> None:
    """Evaluate a prompt on the data it was trained with: the data flags not given take the training run's
    (``meta["train_config"]["data"]``).

    * ``data_seed``: a built-in dataset's splits depend on it (with another seed most test examples would have
      been training examples);
    * ``max_length``: where inputs are cut (another length scores other text than the run's own report);
    * ``max_train_samples``: the training examples the prompt saw (``--split train``; the k-shot baseline draws
      its shots from them, as the run's own report did);
    * ``max_validation_samples``, ``max_test_samples``: the seeded subsets the run validated on and reported on
      (the whole split was scored instead, and its numbers differed from the run's own report; ``0`` given as a
      flag scores the whole split);
    * the data files, when neither a dataset nor files are given and the task record names no dataset (a
      prompt trained on files would otherwise be scored on the default dataset).

    Args:
        meta: the stored prompt's ``softprompt.json`` (empty for a plain PEFT folder: nothing is recorded).
        record: its parsed task record.
        data: the ``data`` section to complete (changed in place).
        given: the ``data`` fields set by a flag or ``--config`` (they win).
        name: how to name the prompt in the log.
    """
    recorded = (meta.get("train_config") or {}).get("data") or {}
    taken = []
    for key in RECORDED:
        value = recorded.get(key)
        if key in given or not isinstance(value, int) or isinstance(value, bool) or not _VALID[key](value):
            continue
        if value != getattr(data, key):
            taken.append(f"{flag(key)} {value}")
        setattr(data, key, value)
    lm = record is not None and record.extra.get("objective") == "lm"  # its corpus record names its data
    if not lm and data.dataset is None and not data.uses_files() and not (record and record.dataset):
        for key in ("train_file", "validation_file", "test_file"):  # trained on files: use them again
            value = recorded.get(key)
            setattr(data, key, value if isinstance(value, str) else None)
            if isinstance(value, str):
                taken.append(f"{flag(key)} {value}")
    if taken:
        log.info("%s: evaluated with the training run's %s (give the flags to override)", name, ", ".join(taken))


def require_task_data(record: TaskRecord | None, data, what: str, example: str, more: str = "") -> None:
    """Refuse to score a prompt that records no task data (no task record naming a dataset, an lm corpus or a
    distillation) when no data flag names any either: it would be scored on the default dataset's test split,
    with the default template, as if that were its task.

    Raises:
        ConfigError: naming ``what`` ("it", "prompt DIR") and the flags to give.
    """
    names_data = record is not None and (record.dataset or record.extra.get("objective") in ("lm", "distill"))
    if not (names_data or data.dataset or data.uses_files() or data.objective == "lm"):
        raise ConfigError(f"{what} records no task data (a folder saved without softprompt's task record, {example})"
                          ", and no data flag names any: it would be scored on the default dataset. Give --dataset "
                          f"NAME or --test-file FILE (with --template, --target-field and --verbalizer as it was "
                          f"trained{more})")


def apply_recorded_carve(meta: dict, task: TaskData, data, name: str) -> TaskData:
    """``task`` with the validation split that ``softprompt tune --validation-from-train`` held out of the
    training data, rebuilt as the search built it (the same function, fraction and seed), when the prompt records
    such a hold-out and is evaluated on its recorded ``--train-file`` with no validation split given.

    Without it ``--split validation`` found no validation split, and ``--split train`` (and the k-shot shots)
    included the held-out records.

    Args:
        meta: the stored prompt's ``softprompt.json`` (``train_config.data.validation_from_train``: ``fraction``,
            ``data_seed``, ``train_examples``, ``validation_examples``).
        task: the task loaded from ``data``.
        data: the ``data`` section it was loaded with.
        name: how to name the prompt in messages and the log.

    Raises:
        StoreError: the recorded hold-out is malformed.
        DataError: the training data no longer splits into the recorded counts (the file changed since).
    """
    recorded = (meta.get("train_config") or {}).get("data") or {}
    carve = recorded.get("validation_from_train")
    if (carve is None or task.splits.get("validation") or data.dataset is not None or not data.train_file
            or data.train_file != recorded.get("train_file")):
        return task
    keys = ("fraction", "data_seed", "train_examples", "validation_examples")
    values = [carve.get(k) for k in keys] if isinstance(carve, dict) else [None] * 4
    whole = [isinstance(v, int) and not isinstance(v, bool) for v in values]
    digest = carve.get("validation_digest") if isinstance(carve, dict) else None  # absent before 2026-12-02
    if not (isinstance(values[0], float) and 0 < values[0] < 1 and whole[1] and not check_seed("", values[1])
            and all(whole[2:]) and min(values[2:]) >= 1 and (digest is None or isinstance(digest, str))):
        raise StoreError(f"{name}: softprompt.json train_config.data.validation_from_train must be an object of "
                         f"{', '.join(keys)} (a fraction in (0, 1), a seed, two counts >= 1) and optionally "
                         f"validation_digest (a string), got {carve!r}")
    from softprompt.tune import TuneArgs, with_validation

    fraction, seed, want = values[0], values[1], tuple(values[2:])
    was = (f"softprompt tune held out {want[1]} of the {sum(want)} training examples of --train-file "
           f"{data.train_file} as the validation split (--validation-from-train {fraction:g}, --data-seed {seed})")
    try:
        carved = with_validation(task, TuneArgs(validation_from_train=fraction), seed, echo=lambda _: None)
    except ConfigError:  # too few examples left to hold any out
        carved = None
    got = None if carved is None else (len(carved.splits["train"]), len(carved.splits["validation"]))
    if got != want:
        n = len(task.examples("train"))
        raise DataError(f"{name}: {was}, and it now gives {n} training examples"
                        + (f" (--max-train-samples {data.max_train_samples})" if data.max_train_samples else "")
                        + ": the data changed since, so neither split can be rebuilt; name the data to evaluate on "
                        "(--train-file/--validation-file), or tune again")
    if digest is not None and examples_digest(carved.splits["validation"]) != digest:
        # as many examples, other ones: an edited record moves to the other side, or brings a trained one along
        raise DataError(f"{name}: {was}, and it now holds out other examples (the same counts, other content): "
                        "the data changed since, so the validation split would include examples the prompt "
                        "trained on; name the data to evaluate on (--train-file/--validation-file), or tune again")
    log.info("%s: %s; rebuilt: validation %d, train %d examples", name, was, want[1], want[0])
    return carved


def recorded_init_text(meta: dict, method_config: dict, dataset: str | None, fmt) -> str:
    """The hard-prompt baseline's text for a stored prompt: the init text its run used (``train`` and ``tune``
    record it whatever ``--init``, and their reports' row is that text), else a PEFT folder's own init text, else
    the task's default init text (what ``train`` would have used).

    Args:
        meta: the stored prompt's ``softprompt.json`` (empty for a plain PEFT folder).
        method_config: its method config.
        dataset: the dataset evaluated (``None``: data files).
        fmt: the task format evaluated.
    """
    prompt = (meta.get("train_config") or {}).get("prompt")
    for text in ((prompt or {}).get("init_text") if isinstance(prompt, dict) else None,
                 method_config.get("init_text")):
        if isinstance(text, str) and text.strip():
            return text
    return default_init_text(dataset, fmt)


def evaluate_stored_prompt(args: dict, prompt: str, check_fingerprint: bool = True,
                           given: set[str] = frozenset(), k_shot_asked: bool = False) -> tuple[dict, int]:
    """Evaluate a stored prompt and the baselines on the ``eval.split`` split of its task.

    Unset data flags fall back to the task and the data recorded with the prompt
    (:func:`apply_recorded_data`); the hard-prompt baseline is the init text of the prompt's run, whatever its
    ``--init`` (:func:`recorded_init_text`), as the run's own report has it.

    Args:
        args: resolved ``model``, ``data`` and ``eval`` sections.
        prompt: the stored prompt folder (ours or PEFT's).
        check_fingerprint: refuse a prompt saved for another base model.
        given: the ``data`` fields set by a flag or ``--config`` (they override the recorded ones).
        k_shot_asked: ``--baselines`` or ``--k-shot`` was given (not left at its default): a k-shot baseline
            that cannot run is refused rather than skipped with a warning.

    Returns:
        The report (metrics per condition) and the number of examples evaluated.

    Raises:
        ConfigError: the k-shot baseline asked for (``k_shot_asked``) and the data has no train split to draw
            its shots from.
        DataError: an example of the split that training could not encode (a target over ``--max-length``,
            labels that can never be predicted), named by its file and line, before anything is evaluated.
    """
    stored = load_prompt(prompt)
    apply_recorded_data(stored.meta, stored.task_record, args["data"], set(given), prompt)
    require_task_data(stored.task_record, args["data"], f"prompt {prompt}", "e.g. one PEFT wrote")
    model, tok = load_model_from_args(args, stored)
    check_model_compatible(stored, model, check_fingerprint=check_fingerprint)
    task = load_task_from_args(args["data"], stored.task_record,
                               classifier=stored.peft_config.get("task_type") == "SEQ_CLS", given=set(given))
    task = apply_recorded_carve(stored.meta, task, args["data"], prompt)
    shots = "k_shot" in args["eval"].baselines and task.format.objective != "lm" and not family_of(model).has_head
    if k_shot_asked and shots and not task.splits.get("train"):  # else skipped with a warning
        raise ConfigError("--baselines k_shot (or --k-shot): the k-shot baseline draws its --k-shot examples from the "
                          f"train split, and the data evaluated has none (splits: {', '.join(task.splits) or 'none'}): "
                          "give --train-file FILE, or leave k_shot out of --baselines")
    method = stored.build_method().to(model.device).eval()
    with torch.no_grad():
        kv = family_of(model).inference_prompt(model, method())
    init_text = recorded_init_text(stored.meta, stored.method_config, args["data"].dataset, task.format)
    split = args["eval"].split
    examples = task.examples(split)
    try:  # encoded first as training encodes it: a target over --max-length or a verbalizer whose label can never
        # win is named by its file and line here, not as "request 9: ... task 'condition0'" mid-evaluation
        family_of(model).encode_examples(tok, examples, task.format, args["data"].max_length, stored.bos)
    except DataError as e:
        raise DataError(f"{split} split: {e}") from None
    # the prompt is evaluated with the layout it was trained with (BOS after it or not: StoredPrompt.bos)
    return evaluate_with_baselines(model, tok, task, {**args}, init_text, examples, kv, stored.bos), len(examples)


def evaluate_store(args: dict, store: str, tasks: list[str] | None = None, check_fingerprint: bool = True,
                   given: set[str] = frozenset()) -> dict:
    """Evaluate each named store task (default: all) on its own recorded dataset, through one engine.

    Every entry is loaded, its ``--split`` read and checked against the entry (:func:`plan_entry`) before the
    first one is evaluated, so a missing entry, unreadable data, a missing split or an entry that cannot score its
    task fails at once, naming every such entry, instead of after the others' evaluations.
    Prompts of a chat or an ``--objective lm`` task are evaluated on the model directly (the chat report;
    the held-out perplexity of the recorded corpus, as ``eval --prompt`` reports it); the others, ensembles
    of classification prompts included, through the engine's mixed batches.

    Args:
        args: resolved ``model``, ``data`` and ``eval`` sections; data flags that are set apply to every task.
        store: the store folder.
        tasks: entry names (prompts or ensembles); ``None``: every entry.
        check_fingerprint: refuse entries saved for another base model.
        given: the ``data`` fields set by a flag or ``--config``: they apply to every entry; the others
            are each entry's recorded ones (:func:`apply_recorded_data`).

    Returns:
        Metrics per task name.

    Raises:
        StoreError: naming every entry that cannot be loaded, whose data or split cannot be read, that records
            no data of its own with no data flag given, or that cannot score its task.
        ConfigError: ``--baselines`` or ``--k-shot`` set (no baseline is evaluated here).
    """
    defaults = EvalArgs()
    inert = [f"{flag(name)} {','.join(v) if isinstance(v, list) else v}: eval --store scores each entry alone, "
             f"without baselines; leave it out (and eval.{name} in --config), or evaluate a prompt beside them with "
             "eval --prompt DIR" for name in ("baselines", "k_shot")
             if (v := getattr(args["eval"], name)) != getattr(defaults, name)]
    if inert:  # refused, not dropped in silence
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(inert))
    model, tok = load_model_from_args(args)
    prompt_store = PromptStore(store)
    names = prompt_store.names() if tasks is None else list(dict.fromkeys(tasks))
    ev, data = args["eval"], args["data"]
    engine = Engine(model, tok, max_batch_rows=ev.eval_batch_size, max_input_tokens=data.max_length,
                    truncate=True, progress=True)
    plans, problems = [], []
    for name in names:
        try:
            plans.append(plan_entry(engine, prompt_store, name, data, ev.split, check_fingerprint, set(given)))
        except (StoreError, DataError, ConfigError, EngineError) as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise StoreError(f"{store}: cannot evaluate {'; '.join(problems)}")
    report = {}
    for name, fmt, examples, task_args in plans:
        t0 = time.perf_counter()
        if is_chat(fmt) or fmt.objective == "lm":  # on the model directly, with the prompt's own layout
            stored = prompt_store.load(name, model, check_fingerprint)
            with torch.no_grad():
                kv = family_of(model).inference_prompt(model, stored.build_method().to(model.device).eval()())
            report[name] = evaluate_prompt(model, tok, kv, examples, fmt, ev.eval_batch_size, ev.max_new_tokens,
                                           task_args.max_length, bos=stored.bos)[0]
        else:
            engine.max_input_tokens = task_args.max_length  # where this entry's inputs were cut in training
            report[name] = evaluate_on_engine(engine, {name: name}, examples, fmt, ev.max_new_tokens)[name]
        log.info("evaluated %s in %.1fs", name, time.perf_counter() - t0)
    return report


def plan_entry(engine, prompt_store, name: str, data, split: str, check_fingerprint: bool, given: set[str]) -> tuple:
    """Load entry ``name`` into ``engine``, read the ``split`` of its task's data and check the entry can score it.

    Raises:
        ConfigError: the entry records no data (a folder stored without softprompt's task record, a PEFT one
            added with ``store add``) and no data flag names any: it would be scored on the default dataset; or
            it cannot score its task (an entry without labels, or with other labels, on a classification task; an
            ensemble, which only classifies, on any other).
        DataError: the data has no ``split``.

    Returns:
        ``(name, task format, the split's examples, data flags used)``.
    """
    t = engine.load_from_store(prompt_store, name, check_fingerprint)
    templates = {m: None if f is None else f.template for m, f in zip(t.members, t.formats, strict=True)}
    if len(set(templates.values())) > 1:  # the test split is rendered once, with the first member's template
        raise ConfigError(f"ensemble {name!r}: its members were trained with different templates "
                          f"({'; '.join(f'{m}: {v!r}' for m, v in templates.items())}), and the test split would "
                          "be rendered with the first one's for all of them: evaluate the members one by one")
    meta = t.meta or {}  # an ensemble's: its first member's (the members share their labels)
    task_args = dataclasses.replace(data)
    record = TaskRecord.parse(meta.get("task"), name)  # validated when the entry was loaded
    apply_recorded_data(meta, record, task_args, given, name)
    require_task_data(record, task_args, "it", "e.g. a PEFT folder added with `store add`",
                      f"; they apply to every entry: name it alone with --task {name}")
    task = apply_recorded_carve(meta, load_task_from_args(task_args, record, given=given), task_args, name)
    fmt, examples = task.format, task.examples(split)
    if fmt.is_classification and sorted(t.labels or []) != sorted(fmt.labels):
        has = f"labels {', '.join(t.labels)}" if t.labels else "no labels (a generation, chat or lm prompt)"
        raise ConfigError(f"its task is a classification task (labels {', '.join(fmt.labels)}) and the entry has "
                          f"{has}: it cannot classify its examples; give data of its own kind")
    if not fmt.is_classification and t.kind == "ensemble":
        raise ConfigError("an ensemble classifies, and its task is not a classification task (no verbalizer)")
    if not fmt.is_classification and not is_chat(fmt) and fmt.objective != "lm":
        engine.backend.require_language_model("generating the answers of a task without labels")
    return name, fmt, examples, task_args
