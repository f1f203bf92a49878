"""The default ``--init-text``: words that fit the task being trained, not one task's sentence for every task.

A text init starts the prompt from the embeddings of a sentence. A sentence about the wrong task (say,
movie-review sentiment for a topic classifier) starts it somewhere unhelpful, so the default comes from the
task: a built-in dataset's own sentence, or else one made from the template's words and the verbalizer's
label texts, e.g. ``"Headline Topic: answer world, sports, business or science."``.
"""

from __future__ import annotations

import re
import string

from softprompt.data.template import TaskFormat

GENERIC = "Read the input and answer."  # a template of placeholders alone, generation task
_SPACE = re.compile(r"\s+")


def join_or(items: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def template_words(template: str) -> str:
    """The template's literal text with its placeholders left out, on one line."""
    literal = "".join(text for text, _, _, _ in string.Formatter().parse(template))
    return _SPACE.sub(" ", literal).strip()


def task_init_text(fmt: TaskFormat) -> str:
    """An init text for ``fmt``'s task: the template's words, and for a classification task its answers.

    Args:
        fmt: the task format being trained.

    Returns:
        A one-line sentence, never empty.
    """
    from softprompt.data.chat import CHAT_INIT_TEXT, is_chat

    if is_chat(fmt):  # no template words: a generic assistant instruction
        return CHAT_INIT_TEXT
    words = template_words(fmt.template)
    answers = list(dict.fromkeys(t.strip() for t in (fmt.verbalizer or {}).values() if t.strip()))
    if answers:
        return f"{words} answer {join_or(answers)}.".strip() if words else f"Answer {join_or(answers)}."
    return words or GENERIC


def default_init_text(dataset: str | None, fmt: TaskFormat) -> str:
    """The init text when ``--init-text`` is not given.

    A built-in dataset trained in its own format keeps its sentence (the README's numbers use it); any
    other task, including a built-in dataset with another template or verbalizer, gets
    :func:`task_init_text`.
    """
    from softprompt.data.builtin import BUILTIN_DATASETS
    from softprompt.data.corpus import corpus_init_text

    if fmt.objective == "lm":
        return corpus_init_text(dataset)
    spec = BUILTIN_DATASETS.get(dataset or "")
    if spec is not None and fmt == spec.format:
        return spec.init_text
    return task_init_text(fmt)
