"""``--messages``: the conversations ``generate`` continues, read from JSON text or a file."""

from __future__ import annotations

import json
from pathlib import Path

from softprompt.data.chat import MESSAGES_FIELD, parse_messages
from softprompt.data.formats import DataError, json_value_problem, load_records_with_lines, unique_object


def read_conversations(spec: str) -> list[list]:
    """Conversations from ``--messages``: JSON text or a file (a messages list, ``{"messages": [...]}``, a JSON
    array of those, or a ``.jsonl`` file of ``{"messages": [...]}`` records, one conversation per line).

    Raises:
        DataError: unreadable or malformed input, naming the file and line.
    """
    def one(value, where: str) -> list:
        if isinstance(value, dict):
            if MESSAGES_FIELD not in value:
                raise DataError(f"{where}: expected a list of messages or an object with 'messages'")
            value = value[MESSAGES_FIELD]
        return parse_messages(value, where, require_assistant=False)

    text = spec.lstrip()
    if text.startswith(("[", "{")):
        try:
            value = json.loads(spec, object_pairs_hook=unique_object)
        except json.JSONDecodeError as e:
            raise DataError(f"--messages: invalid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"--messages: unreadable JSON ({json_value_problem(e)})") from None
    else:
        path = Path(spec)
        if path.suffix.lower() == ".jsonl":
            records, lines = load_records_with_lines(path)
            return [one(r, f"{path.name} line {n}") for r, n in zip(records, lines, strict=True)]
        try:
            value = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_object)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--messages {spec}: cannot read ({e})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path.name}: unreadable JSON ({json_value_problem(e)})") from None
    if isinstance(value, list) and value and all(isinstance(v, dict) and MESSAGES_FIELD in v for v in value):
        return [one(v, f"--messages item {i}") for i, v in enumerate(value, start=1)]
    return [one(value, "--messages")]
