"""Turn records into (source, target) text pairs with a template and an optional verbalizer.

A :class:`TaskFormat` describes a task: the template fills the prompt (``source``) from a record's fields,
``target_field`` names the answer. With a verbalizer the task is a classification: each label maps to
the text the model should produce, and evaluation ranks the label texts by likelihood. Without one it
is a generation task whose target is the answer text itself.
"""

from __future__ import annotations

import logging
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from softprompt.data.formats import DataError

MAX_LISTED_PROBLEMS = 20

log = logging.getLogger(__name__)


def _field_text(value, what: str) -> str:
    """A record's field value as the text a template gets: strings as they are, numbers and booleans as JSON
    writes them (``true``, ``1``: a JSON label ``true`` matches a verbalizer's ``true``, not Python's ``True``).

    Raises:
        DataError: a list, an object or a non-finite number (rendered as Python's repr before: a template got
            ``['a', 'b']``, a target ``" ['Paris', 'Lyon']"``).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return getattr(value, "text", None) or str(value)  # a JSON file's number as it wrote it (JsonNumber)
    kind = "a non-finite number" if isinstance(value, float) else type(value).__name__
    raise DataError(f"{what} is {kind} ({str(value)[:60]}), not text: a template field or target must be a string, "
                    "a number or true/false")


@dataclass
class Example:
    """One rendered example: the prompt, the text to predict after it, and the raw label if any.

    ``origin`` names the record it came from (``"train.jsonl line 7"``) for errors found later (tokenising a
    sampled subset); it takes no part in comparing examples.
    """

    source: str
    target: str
    label: str | None = None
    origin: str | None = field(default=None, compare=False, kw_only=True)


def example_name(example: Example, index: int) -> str:
    """How an error names an example: its record's file and line, else its 0-based index in the list at hand."""
    return example.origin or f"example {index}"


def template_fields(template: str) -> list[str]:
    """Named ``{placeholders}`` of a template in first-use order (``{{``/``}}`` are literal braces).

    Raises:
        DataError: malformed braces.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"--template {template!r} is malformed: {e} "
                        "(write literal braces as {{ and }})") from None
    fields: list[str] = []
    for _, name, _, _ in parsed:
        if name is not None and name not in fields:
            fields.append(name)
    return fields


def placeholder_problems(template: str) -> list[str]:
    """Why ``template`` is not text with at least one plain ``{field}`` placeholder (empty when it is).

    A placeholder is filled with a record's text, so a format spec (``{n:d}``) or conversion (``{x!r}``)
    could only fail at render time or show the value's ``repr``; positions, attributes and indexes would
    reach into the value. Only plain field names are accepted: any text without ``.``, ``[`` or ``]`` (which
    ``str.format`` reads as an attribute or index), not digits alone (a position), without spaces around it;
    a CSV column such as ``{Review Text}`` or ``{review-body}`` is one.
    """
    if not isinstance(template, str):
        return [f"must be a string, got {type(template).__name__}"]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return [f"is malformed: {e} (write literal braces as {{{{ and }}}})"]
    problems: list[str] = []
    names = [(name, spec, conversion) for _, name, spec, conversion in parsed if name is not None]
    if not names:
        problems.append("has no {field} placeholder")
    for name, spec, conversion in names:
        text = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if name[:1] in ("\"", "'"):  # {"label": 0}: a JSON example in the prompt
            problems.append(f"placeholder {text} is not a field name: write a literal brace twice, {{{{ and }}}} "
                            f"(e.g. {{{{{text[1:-1]}}}}})")
        elif not name or name.isdigit() or name != name.strip() or any(c in name for c in ".[]"):
            problems.append(f"placeholder {text} must be a field name (no positions, no spaces around it, no '.', "
                            "'[' or ']': format would read an attribute or index of the value; literal braces are "
                            "written {{ and }})")
        elif spec or conversion:
            problems.append(f"placeholder {text} has a format spec or conversion: write {{{name}}}")
    return problems


def _fmt_keys(record: dict) -> str:
    return ", ".join(str(k) for k in record) or "no fields"


@dataclass
class TaskFormat:
    """How records become examples.

    Attributes:
        template: prompt text with ``{field}`` placeholders, e.g. ``"Review: {text}\\nSentiment:"``.
        target_field: record field holding the answer (the label for classification).
        verbalizer: label -> answer text; given means the task is classification.
        target_prefix: text put before every target, by default a space separating it from the prompt.
    """

    template: str
    target_field: str
    verbalizer: dict[str, str] | None = None
    target_prefix: str = " "
    #: what training optimises: ``task`` (targets after a source); ``lm``: plain text
    #: (:class:`~softprompt.data.corpus.CorpusFormat`)
    objective: ClassVar[str] = "task"

    def __post_init__(self) -> None:
        problems = [f"--template {self.template!r} {p}" for p in placeholder_problems(self.template)]
        fields = [] if problems else template_fields(self.template)
        if not isinstance(self.target_field, str) or not self.target_field.strip():
            problems.append("--target-field must be a non-empty field name")
        elif self.target_field in fields:
            problems.append(f"--template uses the target field {{{self.target_field}}}: "
                            "the answer would be part of the prompt")
        if self.verbalizer is not None:
            problems.extend(_verbalizer_problems(self.verbalizer))
        if problems:
            raise DataError("invalid task format: " + "; ".join(problems))

    @property
    def fields(self) -> list[str]:
        """Names of the template's placeholders, in first-use order."""
        return template_fields(self.template)

    @property
    def is_classification(self) -> bool:
        """True when a verbalizer maps labels to answer texts."""
        return self.verbalizer is not None

    @property
    def labels(self) -> list[str]:
        """The verbalizer's labels in order (empty for generation tasks)."""
        return list(self.verbalizer or {})

    @property
    def label_texts(self) -> list[str]:
        """Target strings of the labels, aligned with :attr:`labels`."""
        return [self.target_prefix + text for text in (self.verbalizer or {}).values()]

    def render(self, record: dict, where: str = "") -> Example:
        """Render one record.

        Args:
            record: field name -> value.
            where: location for error messages, e.g. ``"train.jsonl line 7"``.

        Raises:
            DataError: a missing or null field, an unknown label, or an empty generation target.
        """
        prefix = f"{where}: " if where else ""
        values = {}
        for name in [*self.fields, self.target_field]:
            if name not in record:
                raise DataError(f"{prefix}field {name!r} is missing (have: {_fmt_keys(record)})")
            if record[name] is None:
                raise DataError(f"{prefix}field {name!r} is null")
            values[name] = _field_text(record[name], f"{prefix}field {name!r}")
        try:
            source = self.template.format_map(values)
        except (ValueError, TypeError) as e:  # defensive: placeholders are plain names (no format specs)
            raise DataError(f"{prefix}cannot fill --template: {e}") from None
        raw = values[self.target_field].strip()
        if self.verbalizer is not None:
            if raw not in self.verbalizer:
                raise DataError(f"{prefix}field {self.target_field!r} has label {raw!r}, which the "
                                f"verbalizer does not know (known: {', '.join(self.verbalizer)})")
            return Example(source, self.target_prefix + self.verbalizer[raw], raw, origin=where or None)
        if not raw:
            raise DataError(f"{prefix}field {self.target_field!r} is empty (the target must have text)")
        return Example(source, self.target_prefix + raw, None, origin=where or None)

    def validate_records(self, records: Sequence[dict], source_name: str,
                         lines: Sequence[int] | None = None) -> list[Example]:
        """Render every record, reporting all problems at once.

        Args:
            records: the records of one split.
            source_name: file or split name used in messages, e.g. ``"train.jsonl"``.
            lines: 1-based file line of each record (from ``load_records_with_lines``); without it the
                messages count records from 1.

        Returns:
            The rendered examples, in record order.

        Raises:
            DataError: listing up to 20 problems and the total count.
        """
        examples: list[Example] = []
        problems: list[str] = []
        n_bad = 0
        for i, record in enumerate(records):
            where = f"{source_name} line {lines[i]}" if lines is not None else f"{source_name} record {i + 1}"
            try:
                examples.append(self.render(record, where))
            except DataError as e:
                n_bad += 1
                if len(problems) < MAX_LISTED_PROBLEMS:
                    problems.append(str(e))
        if n_bad:
            more = f"\n  ... and {n_bad - len(problems)} more" if n_bad > len(problems) else ""
            raise DataError(f"{source_name}: {n_bad} of {len(records)} records are invalid:\n  "
                            + "\n  ".join(problems) + more)
        # an empty field is no error (a context may be optional), but a CSV's missing text renders a prompt
        # with nothing in it ("Review: \nSentiment:") where JSONL's null is refused: say how many
        for name in self.fields:
            empty = sum(not _field_text(r[name], name).strip() for r in records)
            if empty:
                log.warning("%s: %d of the %d records have an empty %r field: their prompts have nothing there",
                            source_name, empty, len(records), name)
        return examples


def _verbalizer_problems(verbalizer: dict[str, str]) -> list[str]:
    if not isinstance(verbalizer, dict) or not verbalizer:
        return ["--verbalizer must map at least one label to a text"]
    problems = []
    for label, text in verbalizer.items():
        if not isinstance(label, str) or not label.strip():
            problems.append(f"--verbalizer has an empty label (text {text!r})")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"--verbalizer text for label {label!r} is empty")
    texts = [t for t in verbalizer.values() if isinstance(t, str)]
    dupes = sorted({t for t in texts if texts.count(t) > 1})
    if dupes:
        # two labels with one text could never be told apart by ranking the texts
        problems.append(f"--verbalizer maps several labels to the same text: {', '.join(map(repr, dupes))}")
    return problems
