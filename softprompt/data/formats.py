"""Read task records from JSON-lines and CSV/TSV files.

A record is a flat ``dict`` mapping field names to values. Every problem with the input is reported as
a :class:`DataError` whose message names the file, the 1-based line and the field involved, so a user
can jump straight to the offending spot.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path

JSON_SUFFIXES = (".jsonl", ".json")
DELIMITED_SUFFIXES = {".csv": ",", ".tsv": "\t"}
SUPPORTED_SUFFIXES = (*JSON_SUFFIXES, *DELIMITED_SUFFIXES)

log = logging.getLogger("softprompt")

# the csv module refuses a field over 131,072 characters by default (a long document was "malformed"); the whole
# file is in memory already, so no cap protects anything. 2**31 - 1: the largest a C long takes everywhere
csv.field_size_limit(2**31 - 1)


class DataError(ValueError):
    """Invalid or unreadable task data (file, record, template, verbalizer or tokenisation)."""


def load_records(path: str | Path) -> list[dict]:
    """Load the records of a data file.

    Supported formats, picked by extension:

    * ``.jsonl`` / ``.json``: one JSON object per line, blank lines skipped. A ``.json`` file may also hold
      one JSON array of objects, or one object whose only key holds that array (``{"data": [...]}``).
    * ``.csv`` / ``.tsv``: a header row naming the fields, then one record per row. A ``.csv`` field may be
      quoted (``"a, b"``, a quote inside written twice); a ``.tsv`` file has no quoting (a quote is a
      character, a field ends at a tab or line end), as GLUE's files and the IANA TSV format have it.

    Args:
        path: the data file.

    Returns:
        The records in file order.

    Raises:
        DataError: missing file, unsupported extension, malformed JSON, a line that is not an object,
            a ragged CSV row, or a file without records.
    """
    records, _ = load_records_with_lines(path)
    return records


def load_records_with_lines(path: str | Path) -> tuple[list[dict], list[int]]:
    """Like :func:`load_records`, also returning the 1-based line each record starts on (in a ``.json`` array too).

    The line numbers let later validation point at the right spot even when blank lines were skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                        f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if suffix == ".json":
        records, lines = _parse_json_file(text, path.name)
    elif suffix in JSON_SUFFIXES:
        records, lines = _parse_json_lines(text, path.name)
    else:
        records, lines = _parse_delimited(text, path.name, DELIMITED_SUFFIXES[suffix])
    if not records:
        raise DataError(f"{path.name}: contains no records")
    return records, lines


def json_value_problem(e: Exception) -> str:
    """What is wrong with JSON (or YAML) that parses but cannot become a value: ``json.loads`` and PyYAML raise
    a plain ``ValueError`` for an integer of more than 4300 digits and ``RecursionError`` for deep nesting."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


class JsonNumber(float):
    """A JSON number with a fraction or exponent, as a float that remembers how the file wrote it: a template
    field or target gets ``19.90`` and ``0.00001`` as written (Python's ``str`` gave ``19.9`` and ``1e-05``, so
    the same data as JSONL and as CSV trained on different text)."""

    text: str

    def __new__(cls, text: str) -> JsonNumber:
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (``json`` keeps the last value in silence)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} appears twice in one object (JSON would keep only the last value)")
        self.key = key


def unique_object(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` for ``json.loads`` that refuses a key given twice (:class:`DuplicateKeyError`)."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(key)
        obj[key] = value
    return obj


def _parse_json_lines(text: str, name: str) -> tuple[list[dict], list[int]]:
    records: list[dict] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_float=JsonNumber, object_pairs_hook=unique_object)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except DuplicateKeyError as e:
            raise DataError(f"{name} line {lineno}: {e}") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{name} line {lineno}: unreadable JSON ({json_value_problem(e)})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
        lines.append(lineno)
    return records, lines


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# `{"data": [` up to the array's bracket: a file whose one object holds the records under one key
_WRAPPER = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"(?:[^"\\]|\\.)*"[ \t\n\r]*:[ \t\n\r]*\[')


def _parse_json_file(text: str, name: str) -> tuple[list[dict], list[int]]:
    """A ``.json`` file: an array of records, JSON Lines, or one object holding the array under its only key
    (``{"data": [...]}``). Any other single object is refused, saying so (a pretty-printed one read as JSON Lines
    was "invalid JSON" on line 1; pandas' ``to_json()`` columns became one record of dicts)."""
    if text.lstrip().startswith("["):
        return _parse_json_array(text, name, text.index("["))
    try:
        whole = json.loads(text, object_pairs_hook=unique_object)  # JSON Lines fail fast here: "Extra data"
    except (ValueError, RecursionError):
        whole = None
    if not isinstance(whole, dict):
        return _parse_json_lines(text, name)
    (key, value), *others = list(whole.items()) or [(None, None)]
    # a chat record's one key is "messages", a list of objects too: that file is one conversation
    if not others and key != "messages" and isinstance(value, list) and _WRAPPER.match(text):
        return _parse_json_array(text, name, _WRAPPER.match(text).end() - 1, close="}")
    keys = ", ".join(map(str, whole)) or "none"
    if whole and all(isinstance(v, dict) for v in whole.values()):
        raise DataError(f"{name}: one object of columns ({keys}), each mapping row ids to values, as pandas' "
                        "to_json() writes by default: a .json file must be an array of records or JSON Lines; "
                        "write it with to_json(orient='records') or orient='records', lines=True")
    if "\n" in text.strip():
        raise DataError(f"{name}: one JSON object over several lines (keys: {keys}); a .json file must be an array "
                        "of records, JSON Lines (one object per line), or one object holding the array of records "
                        "under its only key")
    return _parse_json_lines(text, name)  # one record on one line: JSON Lines


def _parse_json_array(text: str, name: str, at: int, close: str = "") -> tuple[list[dict], list[int]]:
    """The objects of the JSON array whose ``[`` is at ``text[at]``, item by item, each with the line it starts on
    (a record of a pretty-printed file is reported at its own line, not as "line N" for item N); after the array,
    only ``close`` (the ``}`` of an object holding it) and white space may follow."""
    decoder = json.JSONDecoder(parse_float=JsonNumber, object_pairs_hook=unique_object)
    items: list[dict] = []
    lines: list[int] = []
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, pos), pos
        return line

    def fail(pos: int, what: str) -> DataError:
        col = pos - text.rfind("\n", 0, pos)
        return DataError(f"{name} line {line_at(pos)}: invalid JSON ({what} at column {col})")

    pos = _JSON_SPACE.match(text, at + 1).end()
    if text.startswith("]", pos):  # an empty array
        pos += 1
    else:
        while True:
            where = f"{name} line {line_at(pos)} (item {len(items) + 1})"
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{name} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except DuplicateKeyError as e:
                raise DataError(f"{where}: {e}") from None
            except (ValueError, RecursionError) as e:
                raise DataError(f"{name}: unreadable JSON ({json_value_problem(e)})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            items.append(obj)
            lines.append(line)
            pos = _JSON_SPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise fail(pos, "Expecting ',' delimiter")
    for char in close:
        pos = _JSON_SPACE.match(text, pos).end()
        if not text.startswith(char, pos):
            raise fail(pos, f"Expecting {char!r}")
        pos += 1
    if _JSON_SPACE.match(text, pos).end() != len(text):
        raise fail(_JSON_SPACE.match(text, pos).end(), "Extra data")
    return items, lines


def _looks_csv_quoted(field: str) -> bool:
    """A field as a CSV writer quotes it: wrapped in double quotes, with every quote inside doubled."""
    inner = field[1:-1]
    return len(field) > 2 and field[0] == field[-1] == '"' and '""' in inner and '"' not in inner.replace('""', "")


def _parse_delimited(text: str, name: str, delimiter: str) -> tuple[list[dict], list[int]]:
    tsv = delimiter == "\t"
    if tsv:  # TSV (IANA text/tab-separated-values, GLUE's files) has no quoting: a quote is a character
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    else:
        # strict: a quote that is never closed, or text after a closing quote, is an error; the default read the
        # rest of the file into one field (one stray quote silently merged every later record into one)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)  # lines end at \n only
    start = 1
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{name} line 1: missing header row (the first row must name the fields)")
        header = [h.strip() for h in header]
        problems = []
        if any(not h for h in header):
            problems.append(f"empty column name at position {header.index('') + 1}")
        dupes = sorted({h for h in header if h and header.count(h) > 1})
        if dupes:
            problems.append(f"duplicate column name(s) {', '.join(dupes)}")
        if problems:
            raise DataError(f"{name} line 1: bad header: {'; '.join(problems)}")
        records: list[dict] = []
        lines: list[int] = []
        quoted_warned = False
        start = reader.line_num + 1
        for row in reader:
            # line_num is the line where the row ends; a quoted field may span several lines
            lineno, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # blank line
            if len(row) != len(header):
                hint = (" (a .tsv file has no quoting: a tab or line break cannot be inside a field)"
                        if tsv and any('"' in f for f in row) else "")
                raise DataError(f"{name} line {lineno}: expected {len(header)} fields "
                                f"({', '.join(header)}), got {len(row)}{hint}")
            if [f.strip() for f in row] == header:  # files joined with `cat a.csv b.csv`: it was a record
                raise DataError(f"{name} line {lineno}: the header row again ({', '.join(header)}), not a record; "
                                "files joined with their headers? keep only the first one")
            if tsv and not quoted_warned and any(map(_looks_csv_quoted, row)):
                quoted_warned = True
                log.warning("%s line %d: a field is wrapped in double quotes with doubled quotes inside, as a CSV "
                            "writer quotes it; a .tsv file is read without quoting, so its quotes stay in the text "
                            "(write the file with quoting off, e.g. pandas to_csv(sep='\\t', quoting=csv.QUOTE_NONE), "
                            "or as .csv)", name, lineno)
            records.append(dict(zip(header, row, strict=True)))
            lines.append(lineno)
    except csv.Error as e:
        hint = "" if tsv else ("; a field that starts with a double quote is quoted: it must end with one, and a "
                               "quote inside it is written twice (\"\")")
        raise DataError(f"{name} line {start}: malformed row ({e}){hint}") from None
    return records, lines
