"""What may name a served task (checked once, where every task is swapped in: :meth:`Engine._install`), and what
the loading calls take."""

from __future__ import annotations

from softprompt.engine.requests import RequestError


def check_task_name(name, kind: str, served) -> None:
    """Raise :class:`RequestError` unless ``name`` may name a new task of ``kind`` (``base``, ``prompt``, ...).

    A request names its task by a non-empty string (:func:`~softprompt.engine.requests.check_request`), so any
    other name could never be asked for (and an int one broke listing the tasks). The plain base model and a
    prompted task do not replace each other under one name: a client asking for one would silently get the other.

    Args:
        served: the task of that name being served now (``kind`` attribute), or None.
    """
    if not isinstance(name, str) or not name:
        raise RequestError(f"a task name must be a non-empty string, got {name!r}")
    if served is None or (served.kind == "base") == (kind == "base"):
        return
    if served.kind == "base":
        raise RequestError(f"task {name!r} is the plain base model (no prompt): a prompt cannot replace it; serve "
                           f"the base model under another name (--base-task)")
    raise RequestError(f"task {name!r} is already served with a prompt: the base-model task needs another name")


def check_argument(value, expected: type, call: str, hint: str) -> None:
    """Raise ``TypeError`` naming ``call`` unless ``value`` is an ``expected``: a folder path where a loaded prompt
    goes, or None where keys/values go, failed with a bare AttributeError while being prepared. ``hint``: how to
    get an ``expected``."""
    if not isinstance(value, expected):
        raise TypeError(f"{call}: expected a {expected.__name__} ({hint}), got {type(value).__name__} {value!r:.80}")

