"""The task a stored prompt was trained with: the ``task`` object of ``softprompt.json``, parsed once.

::

    "task": {"template": "Review: {text}\\nSentiment:", "target_field": "label",
             "verbalizer": {"positive": "good", "negative": "bad"}, "target_prefix": " ",
             "labels": ["positive", "negative"], "dataset": "rotten_tomatoes"}

A chat task (records of ``messages``, :class:`~softprompt.data.chat.ChatFormat`) is recorded as
``{"kind": "chat", "chat_template": null | "<jinja>", "template": null, ...}``: generate and serve render
its conversations with the model's chat template (or the recorded one).

Every key may be missing or null (older files); other keys are kept but not read. A stored file is
untrusted input, so :meth:`TaskRecord.parse` checks every field's type and meaning and reports all
problems at once; a parsed record always builds its :class:`~softprompt.data.TaskFormat` (no reader can
fail on it later). Every reader of a stored task (engine, CLI, store listing, PEFT import) uses this record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.data import DataError, TaskFormat, placeholder_problems, template_fields
from softprompt.data.chat import ChatFormat, is_chat
from softprompt.store.errors import StoreError

TASK_KEYS = ("template", "target_field", "verbalizer", "target_prefix")  # always written (null when unset)
OPTIONAL_KEYS = ("labels", "dataset", "kind", "chat_template")
CHAT_KIND = "chat"
DEFAULT_TARGET_FIELD = "target"
DEFAULT_TARGET_PREFIX = " "

__all__ = ["DEFAULT_TARGET_FIELD", "DEFAULT_TARGET_PREFIX", "TASK_KEYS", "TaskRecord"]


def _optional_str(value: Any, key: str, non_empty: bool = False) -> list[str]:
    if value is None or (isinstance(value, str) and (value.strip() or not non_empty)):
        return []
    want = "a non-empty string" if non_empty else "a string"
    return [f"task.{key} must be {want} or null, got {value!r}"]


def _verbalizer_problems(verbalizer: Any) -> list[str]:
    if verbalizer is None:
        return []
    if not isinstance(verbalizer, dict) or not verbalizer:
        return [f"task.verbalizer must be an object mapping labels to texts, or null, got {verbalizer!r}"]
    problems = [f"task.verbalizer text of label {label!r} must be a non-empty string, got {text!r}"
                for label, text in verbalizer.items() if not isinstance(text, str) or not text.strip()]
    problems += [f"task.verbalizer has an empty label (text {text!r})" for label, text in verbalizer.items()
                 if not label.strip()]
    texts = [t for t in verbalizer.values() if isinstance(t, str)]
    dupes = sorted({t for t in texts if texts.count(t) > 1})
    if dupes:  # two labels with one text could never be told apart
        problems.append(f"task.verbalizer maps several labels to the same text: {', '.join(map(repr, dupes))}")
    return problems


def _labels_problems(labels: Any, verbalizer: Any) -> list[str]:
    if labels is None:
        return []
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        return [f"task.labels must be a list of distinct label names, or null, got {labels!r}"]
    if not isinstance(verbalizer, dict):
        return [f"task.labels {labels!r} needs a task.verbalizer naming the same labels"]
    if set(labels) != set(verbalizer):
        return [f"task.labels {labels!r} must name the task.verbalizer's labels {sorted(verbalizer)!r}"]
    return []


@dataclass(frozen=True)
class TaskRecord:
    """A validated stored task.

    Attributes:
        template: prompt text with ``{field}`` placeholders; ``None``: the prompt takes raw text.
        target_field: the record field holding the answer (``None``: not recorded).
        verbalizer: label -> answer text, in the recorded label order; ``None`` for a generation task.
        target_prefix: text before every target (``None``: not recorded, a space is used).
        labels: the recorded label order (a classification head's outputs), if recorded.
        dataset: the built-in dataset it was trained on, if any.
        chat: a chat task (conversations rendered with a chat template).
        chat_template: a chat task's own Jinja chat template (``None``: the model's).
        extra: other keys of the stored object, kept as they were.
    """

    template: str | None = None
    target_field: str | None = None
    verbalizer: dict[str, str] | None = None
    target_prefix: str | None = None
    labels: tuple[str, ...] | None = None
    dataset: str | None = None
    chat: bool = False
    chat_template: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, task: Any, where: str | Path) -> TaskRecord | None:
        """Validate a stored ``task`` object (``None`` stays ``None``).

        Args:
            task: the ``task`` value of ``softprompt.json`` (or a task dict about to be saved).
            where: the file, or the action, named at the start of error messages.

        Raises:
            StoreError: ``"<where>: task.<field> ..."`` for every malformed field.
        """
        if task is None:
            return None
        if not isinstance(task, dict):
            raise StoreError(f"{where}: task must be an object or null, got {type(task).__name__}")
        template, target_field, verbalizer = task.get("template"), task.get("target_field"), task.get("verbalizer")
        problems = []
        if template is not None and placeholder_problems(template):
            problems.append(f"task.template must be a string with at least one {{field}}, got {template!r} "
                            f"({'; '.join(placeholder_problems(template))})")
        problems += _optional_str(target_field, "target_field", non_empty=True)
        target = target_field or DEFAULT_TARGET_FIELD
        if not problems and template is not None and target in template_fields(template):
            problems.append(f"task.template {template!r} uses the target field {{{target}}}: the answer would "
                            "be part of the prompt")
        problems += _verbalizer_problems(verbalizer)
        problems += _optional_str(task.get("target_prefix"), "target_prefix")
        problems += _labels_problems(task.get("labels"), verbalizer)
        problems += _optional_str(task.get("dataset"), "dataset", non_empty=True)
        kind = task.get("kind")
        if kind not in (None, CHAT_KIND):
            problems.append(f"task.kind must be {CHAT_KIND!r} or null, got {kind!r}")
        problems += _optional_str(task.get("chat_template"), "chat_template", non_empty=True)
        if kind == CHAT_KIND and (template is not None or verbalizer is not None):
            problems.append("a chat task (task.kind 'chat') has no task.template or task.verbalizer")
        elif kind != CHAT_KIND and task.get("chat_template") is not None:
            problems.append("task.chat_template needs task.kind 'chat'")
        if problems:
            raise StoreError(f"{where}: " + "; ".join(problems))
        labels = task.get("labels")
        if verbalizer is not None and labels is not None:  # a JSON object's key order is not kept
            verbalizer = {label: verbalizer[label] for label in labels}
        record = cls(template=template, target_field=target_field, verbalizer=verbalizer,
                     target_prefix=task.get("target_prefix"), labels=None if labels is None else tuple(labels),
                     dataset=task.get("dataset"), chat=kind == CHAT_KIND, chat_template=task.get("chat_template"),
                     extra={k: v for k, v in task.items() if k not in TASK_KEYS + OPTIONAL_KEYS})
        try:  # the checks above are TaskFormat's; this guarantees format() can never fail later
            record.format()
        except DataError as e:
            raise StoreError(f"{where}: task: {e}") from None
        return record

    @classmethod
    def from_format(cls, fmt: TaskFormat, dataset: str | None = None) -> TaskRecord:
        """The record of a task trained with ``fmt`` (the label order is recorded for classification)."""
        if is_chat(fmt):
            return cls(target_field=fmt.target_field, target_prefix=fmt.target_prefix, dataset=dataset, chat=True,
                       chat_template=fmt.chat_template)
        return cls(template=fmt.template, target_field=fmt.target_field,
                   verbalizer=None if fmt.verbalizer is None else dict(fmt.verbalizer),
                   target_prefix=fmt.target_prefix, labels=tuple(fmt.labels) or None, dataset=dataset)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored as ``task`` (the on-disk form :meth:`parse` reads)."""
        out: dict[str, Any] = {"template": self.template, "target_field": self.target_field,
                               "verbalizer": None if self.verbalizer is None else dict(self.verbalizer),
                               "target_prefix": self.target_prefix}
        out.update(labels=None if self.labels is None else list(self.labels), dataset=self.dataset)
        if self.chat:  # written only for chat tasks: other records stay as they were
            out.update(kind=CHAT_KIND, chat_template=self.chat_template)
        return {**out, **self.extra}

    @property
    def label_names(self) -> list[str] | None:
        """The labels of a classification task in recorded order; ``None`` for a generation task."""
        return None if self.verbalizer is None else list(self.verbalizer)

    def format(self) -> TaskFormat | None:
        """The :class:`TaskFormat` to render inputs with (a chat task's :class:`ChatFormat`); ``None`` when no
        template was recorded."""
        if self.chat:
            return ChatFormat(target_prefix=self.target_prefix or "", chat_template=self.chat_template)
        if self.template is None:
            return None
        return TaskFormat(self.template, self.target_field or DEFAULT_TARGET_FIELD,
                          None if self.verbalizer is None else dict(self.verbalizer),
                          DEFAULT_TARGET_PREFIX if self.target_prefix is None else self.target_prefix)


def task_meta(data_args, fmt: TaskFormat) -> dict:
    """The ``task`` record stored with a prompt trained on ``fmt`` with the ``data`` section ``data_args``
    (``train``, ``tune``): a template task's :class:`TaskRecord` (labels: a classification head's order), or
    a corpus's record for ``--objective lm`` (no template; its files, chunking and split seed)."""
    if fmt.objective == "lm":
        from softprompt.data.corpus import corpus_record

        return corpus_record(data_args, fmt)
    return TaskRecord.from_format(fmt, data_args.dataset).to_dict()
