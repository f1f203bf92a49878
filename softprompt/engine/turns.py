"""Where a generated answer ends, per task: the model's end ids, and for a chat task its chat template's end of
turn (what its prompt was trained to emit; :func:`~softprompt.data.turn_end_ids`, :func:`~softprompt.data.
turn_end_text`). ChatML on a base model ends a turn with ``<|im_end|>``, not the model's EOS: replies ran on
into invented turns. Worked out once per chat template."""

from __future__ import annotations

from softprompt.data import TaskFormat, is_chat, turn_end_ids, turn_end_text


class TurnEnds:
    """The end ids and extra stop strings of a task's generations, by its format (cached per chat template)."""

    def __init__(self, tokenizer, end_ids: tuple[int, ...]) -> None:
        self.tok, self.base = tokenizer, frozenset(end_ids)
        self._ids: dict[str | None, frozenset[int]] = {}
        self._stops: dict[str | None, list[str]] = {}

    def ids(self, fmt: TaskFormat | None) -> frozenset[int]:
        """The ids that end a row: the model's, and a chat template's end-of-turn special tokens."""
        if fmt is None or not is_chat(fmt):
            return self.base
        key = fmt.chat_template
        if key not in self._ids:
            self._ids[key] = self.base | frozenset(turn_end_ids(self.tok, key))
        return self._ids[key]

    def stops(self, fmt: TaskFormat | None) -> list[str]:
        """Stop strings besides a request's own: a chat template's end of turn written as plain text."""
        if fmt is None or not is_chat(fmt):
            return []
        key = fmt.chat_template
        if key not in self._stops:
            marker = turn_end_text(self.tok, key)
            self._stops[key] = [marker] if marker else []
        return list(self._stops[key])
