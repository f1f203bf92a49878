"""``softprompt generate``: an engine serving one stored prompt, one store task, or the plain base model."""

from __future__ import annotations

from softprompt.config import ConfigError
from softprompt.engine import Engine
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
