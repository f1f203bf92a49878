"""What every command loads: the task (its data flags merged with a stored prompt's task) and the base model."""

from __future__ import annotations

from pathlib import Path

from softprompt.config import ConfigError, DataArgs, fit_max_length
from softprompt.data import TaskData, load_task, order_verbalizer, parse_verbalizer
from softprompt.data.corpus import load_corpus_from_args
from softprompt.store.task_record import TaskRecord


def load_task_from_args(data_args: DataArgs, stored_task: TaskRecord | None = None,
                        classifier: bool = False, given: set[str] | frozenset = frozenset()) -> TaskData:
    """Load the task; unset data flags fall back to the stored prompt's task, then to rotten_tomatoes.

    With ``--objective lm``, or a stored prompt trained with it, the task is a text corpus
    (:func:`softprompt.data.corpus.load_corpus_from_args`: unset data flags take the recorded corpus and split).

    Args:
        data_args: the ``data`` section; a ``dataset`` taken from the stored task or the default is written
            back into it (the run's recorded config names the dataset used).
        stored_task: the prompt's validated :class:`~softprompt.store.task_record.TaskRecord` (or None).
            Its recorded label order is kept.
        classifier: the prompt has a classification head (its outputs are those labels in that order):
            the task must have exactly those labels.
        given: the ``data`` fields the user set (a stored corpus's split seed and chunk length do not
            replace them).

    Raises:
        ConfigError: ``--verbalizer`` names other labels than a classifier prompt's head.
    """
    stored_task = stored_task or TaskRecord()
    if data_args.objective == "lm" or stored_task.extra.get("objective") == "lm":  # plain text
        return load_corpus_from_args(data_args, stored_task.extra.get("corpus"), given)
    dataset = data_args.dataset
    if dataset is None and not data_args.uses_files() and stored_task.extra.get("objective") == "distill":
        raise ConfigError("the prompt was distilled from a context (softprompt distill): it has no task of its own "
                          "to evaluate; its report against the teacher is the run's distill.json. To score it on a "
                          "task, give --dataset or --train-file/--validation-file/--test-file")
    if dataset is None and not data_args.uses_files():
        dataset = stored_task.dataset or "rotten_tomatoes"
        data_args.dataset = dataset
    verbalizer = parse_verbalizer(data_args.verbalizer) if data_args.verbalizer else stored_task.verbalizer
    labels = None if stored_task.labels is None else list(stored_task.labels)
    verbalizer = order_verbalizer(verbalizer, labels)
    if classifier and labels is not None and list(verbalizer or {}) != labels:
        raise ConfigError(f"--verbalizer labels {sorted(verbalizer or {})} differ from the {len(labels)} classes "
                          f"the prompt's head was trained on ({', '.join(labels)})")
    chat_template = stored_task.chat_template
    if data_args.chat_template:
        try:
            chat_template = Path(data_args.chat_template).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template {data_args.chat_template}: cannot read ({e})") from None
    return load_task(
        dataset=dataset, train_file=data_args.train_file, validation_file=data_args.validation_file,
        test_file=data_args.test_file, template=data_args.template or stored_task.template,
        target_field=data_args.target_field or stored_task.target_field,
        verbalizer=verbalizer, max_samples=data_args.max_samples(), seed=data_args.data_seed,
        chat_template=chat_template, target_prefix=stored_task.target_prefix)


def load_model_from_args(args: dict, stored=None, num_labels: int | None = None):
    """The frozen base model and tokenizer of the ``model`` section.

    Args:
        args: resolved sections (``args["model"]`` is used).
        stored: a loaded :class:`~softprompt.store.StoredPrompt`: ``--task-type auto`` follows its task type
            (a prompt with a classification head needs the model loaded as a sequence classifier).
        num_labels: classes of a sequence classifier's head.
    """
    from softprompt.model import load_base_model

    m = args["model"]
    task_type = m.task_type
    if task_type == "auto" and stored is not None and stored.peft_config.get("task_type") == "SEQ_CLS":
        task_type = "seq_cls"
    return load_base_model(m.model, m.device, m.dtype, task_type=task_type, num_labels=num_labels)


def fit_context(args: dict, max_length_given: bool, num_virtual_tokens: int | None = None) -> None:
    """Refuse a prompt too long for the model's context before any data or weights are loaded.

    Only the model's config is read. A default ``--max-length`` (``max_length_given`` false) is lowered to
    what fits beside the prompt.

    Args:
        args: resolved ``model``, ``data`` and ``prompt`` sections; ``data.max_length`` is updated.
        max_length_given: the user set ``--max-length`` (flag or config file).
        num_virtual_tokens: the longest prompt that will run (``tune`` may search lengths); default: the
            prompt section's.

    Raises:
        ConfigError: the prompt (with the given ``--max-length``) does not fit the model's context.
    """
    from softprompt.model import context_length, load_model_config

    name, data = args["model"].model, args["data"]
    data.max_length = fit_max_length(context_length(load_model_config(name)), f"--model {name}",
                                     num_virtual_tokens or args["prompt"].num_virtual_tokens, data.max_length,
                                     max_length_given)
