"""``softprompt generate``: an engine serving one stored prompt, one store task, or the plain base model."""

from __future__ import annotations

from softprompt.config import ConfigError
from softprompt.data import label_room
from softprompt.data.conversations import read_conversations
from softprompt.engine import Engine, refuse_chat
from softprompt.store import PromptStore, load_prompt


def engine_for(model, tokenizer, prompt: str | None = None, store: str | None = None, task: str | None = None,
               check_fingerprint: bool = True, **engine_kwargs) -> tuple[Engine, str]:
    """An engine serving what the flags name: ``--prompt DIR``, ``--store DIR --task NAME``, or the base model.

    Args:
        model: the frozen base model.
        tokenizer: its tokenizer.
        prompt: a stored prompt folder.
        store: a store folder (with ``task``).
        task: the entry of ``store`` to serve.
        check_fingerprint: refuse a prompt saved for another base model.
        **engine_kwargs: passed to :class:`~softprompt.engine.Engine`.

    Returns:
        The engine and the task name to send requests to.

    Raises:
        ConfigError: ``store`` without ``task``, or ``task`` without ``store``.
    """
    engine = Engine(model, tokenizer, **engine_kwargs)
    if store:
        if not task:
            raise ConfigError("--store needs --task NAME (see `softprompt store list --store DIR`)")
        engine.load_from_store(PromptStore(store), task, check_fingerprint)
        return engine, task
    if task:
        raise ConfigError("--task needs --store DIR")
    if prompt:
        engine.add_prompt("prompt", load_prompt(prompt, model, check_fingerprint=check_fingerprint))
        return engine, "prompt"
    engine.add_base("base")
    return engine, "base"


def generation_inputs(messages: str | None, prompt: str | None = None, store: str | None = None,
                      task: str | None = None) -> list:
    """``generate``'s inputs checked before the model loads: the conversations of ``--messages`` (none without
    it), and the prompt ``--prompt`` or ``--store``/``--task`` names, read and validated as files (a missing or
    damaged folder, an unknown entry; with ``--messages``, a prompt distilled from a context, which never learned
    a chat layout). The model checks the prompt again once it is loaded (hidden size, fingerprint).

    Raises:
        DataError: unreadable ``--messages``.
        StoreError: the prompt cannot be read.
        ChatLayoutError: ``--messages`` for a distilled prompt.
    """
    conversations = read_conversations(messages) if messages else []
    stored = {}
    if store and task:
        entries = PromptStore(store)
        members = entries.ensemble(task).members if entries.kind(task) == "ensemble" else [task]
        stored = {m: entries.load(m) for m in members}
    elif prompt:
        stored = {"prompt": load_prompt(prompt)}
    for name, one in stored.items() if conversations else ():
        refuse_chat(name, one.meta)
    return conversations


def input_values(engine: Engine, task: str, texts: list[str], raw: bool) -> list[str | dict]:
    """``--input`` values as requests take them: a template with several fields is filled from a JSON object
    (``--input '{"question": "...", "context": "..."}'``); any other input is text.

    Raises:
        ConfigError: an input for a several-field template that is not a JSON object of strings.
    """
    import json

    fmt = engine.task(task).formats[0]
    fields = list(getattr(fmt, "fields", None) or [])
    if raw or len(fields) < 2:
        return list(texts)
    values, problems = [], []
    for text in texts:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            problems.append(f"--input {text[:60]!r}: task {task!r}'s template has fields {fields}: give a JSON "
                            f"object of strings, e.g. --input '{json.dumps(dict.fromkeys(fields, '...'))}', "
                            "or --raw for the whole text")
        values.append(value)
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    return values


#: ``generate``'s ``--max-new-tokens`` when it is not given and the task is not a classification
DEFAULT_MAX_NEW_TOKENS = 16


def _classification(engine: Engine, task: str, chat: bool):
    fmt = engine.task(task).formats[0]
    return fmt if fmt is not None and fmt.is_classification and not chat else None


def answer_budget(engine: Engine, task: str, chat: bool = False) -> int:
    """``--max-new-tokens`` when not given: a classification task's longest label text in tokens, plus one (its
    count in context may differ by one); :data:`DEFAULT_MAX_NEW_TOKENS` for other tasks and conversations.

    A classification prompt is trained on the label's tokens only: after them the model was never taught to stop,
    so the text it goes on with (often the label again, up to the budget) says nothing.
    """
    fmt = _classification(engine, task, chat)
    return DEFAULT_MAX_NEW_TOKENS if fmt is None else 1 + label_room(engine.tok, fmt)


def output_row(engine: Engine, task: str, res, chat: bool = False, cut: bool = True) -> dict:
    """The JSON row ``generate`` prints for one result. A classification task's row adds ``label``: the label its
    output starts with (the longest label text that is a prefix of it, so ``" not sure"`` wins over ``" not"``;
    None when it names none); with ``cut`` (no ``--max-new-tokens``) the output ends after that text, a
    ``"stop"``, since the prompt never learned what follows a label."""
    row = {"task": task, "input": res.source, "output": res.text, "finish_reason": res.finish_reason}
    fmt = _classification(engine, task, chat)
    if fmt is None:
        return row
    hits = [(len(t), label, t) for label, t in zip(fmt.labels, fmt.label_texts, strict=True) if res.text.startswith(t)]
    _, row["label"], text = max(hits) if hits else (0, None, None)
    if cut and hits:
        row["output"], row["finish_reason"] = text, "stop"
    return row
