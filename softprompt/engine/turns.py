"""Where a generated answer ends, per task: the model's end ids, and for a chat task its chat template's end of
turn (what its prompt was trained to emit; :func:`~softprompt.data.turn_end_ids`, :func:`~softprompt.data.
turn_end_text`). ChatML on a base model ends a turn with ``<|im_end|>``, not the model's EOS: replies ran on
into invented turns. Worked out once per chat template."""

from __future__ import annotations

from softprompt.data import TaskFormat, is_chat, turn_end_ids, turn_end_text
from softprompt.engine.requests import ChatLayoutError


def require_chat_layout(task) -> None:
    """Refuse a chat conversation for ``task`` (a served :class:`~softprompt.engine.Task`) when its prompt never
    learned one (:func:`refuse_chat`). The server's chat route's check (``generate --messages`` makes it before
    the model loads, on the prompt as read)."""
    refuse_chat(task.name, task.meta)


def refuse_chat(name: str, meta: dict | None) -> None:
    """Refuse a chat conversation for the prompt ``name`` with metadata ``meta`` when it never learned one: a
    prompt distilled from a context (``softprompt distill``) learned raw text right after it (``[prompt, BOS,
    text]``), and a chat template's turns after it are a layout it never saw.

    Raises:
        ChatLayoutError: the prompt was distilled from a context.
    """
    record = (meta or {}).get("task")
    if isinstance(record, dict) and record.get("objective") == "distill":
        raise ChatLayoutError(
            f"task {name!r} was distilled from a context (softprompt distill): its prompt learned plain text "
            "right after that context, never a chat template's turns, so it is no chat system prompt; send the "
            "text as plain input (generate --input, POST /v1/completions)")


class TurnEnds:
    """The end ids and extra stop strings of a task's generations, by its format (cached per chat template)."""

    def __init__(self, tokenizer, end_ids: tuple[int, ...]) -> None:
        self.tok, self.base = tokenizer, frozenset(end_ids)
        self._ids: dict[str | None, frozenset[int]] = {}
        self._stops: dict[str | None, list[str]] = {}

    def ids(self, fmt: TaskFormat | None, chat: bool = False) -> frozenset[int]:
        """The ids that end a row: the model's, and a chat template's end-of-turn special tokens (a chat task's
        template, or with ``chat`` the tokenizer's own: a conversation it rendered for a task of another format)."""
        ending, key = _template(fmt, chat)
        if not ending:
            return self.base
        if key not in self._ids:
            self._ids[key] = self.base | frozenset(turn_end_ids(self.tok, key))
        return self._ids[key]

    def stops(self, fmt: TaskFormat | None, chat: bool = False) -> list[str]:
        """Stop strings besides a request's own: a chat template's end of turn written as plain text (whose
        template: as :meth:`ids`)."""
        ending, key = _template(fmt, chat)
        if not ending:
            return []
        if key not in self._stops:
            marker = turn_end_text(self.tok, key)
            self._stops[key] = [marker] if marker else []
        return list(self._stops[key])


def _template(fmt: TaskFormat | None, chat: bool) -> tuple[bool, str | None]:
    """Whether a generation ends at a chat template's end of turn, and which template (None: the tokenizer's)."""
    if fmt is not None and is_chat(fmt):
        return True, fmt.chat_template
    return chat, None
