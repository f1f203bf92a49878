"""The type check every argument section gets, built from flags and a config file or in Python.

:func:`~softprompt.config.files.build_args` runs it on the values it layers (naming each after where it came from),
and each section's ``__post_init__`` runs it on its own fields (:func:`check_field_types`), so a section built in
Python (``TrainArgs(batch_size=4.0)``) is refused naming the flag, not with a bare TypeError deep in training.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from softprompt.config.checks import flag, raise_problems


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _union(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The scalar type behind a field annotation (``int | None`` -> ``int``, ``list[str]`` -> ``list``): the flag's
    type, the first of a union's."""
    return field_types(cls, f)[0]


def field_types(cls: type, f: dataclasses.Field) -> tuple[type, ...]:
    """The types a field's value may have besides None (``str | dict | None`` -> ``(str, dict)``: a config file
    may give a mapping where the flag gives text)."""
    return tuple(typing.get_origin(a) or a for a in _union(_hints(cls)[f.name]) if a is not type(None))


def typed_fields(cls: type, values: dict[str, Any],
                 name: Callable[[str], str] = flag) -> tuple[dict[str, Any], list[str]]:
    """``values`` of fields of ``cls`` checked against the fields' types.

    Returns:
        The values, converted where the type is clear: a float field's int (or text, as YAML reads ``3e-1``) as a
        float, a list field's comma-separated text as a list, a path given for a text field as text; and every
        problem, each starting ``"<name(field)>: expected"`` (``None`` is one only for a field that cannot be None).
    """
    out, problems = dict(values), []
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        want, value = field_type(cls, f), out[f.name]
        if value is None:
            if type(None) not in _union(_hints(cls)[f.name]):
                problems.append(f"{name(f.name)}: expected {want.__name__}, got None")
            continue
        if want is not typing.Any and isinstance(value, field_types(cls, f)[1:]):  # another type the field takes
            continue
        if want is float and isinstance(value, int | str) and not isinstance(value, bool):
            try:  # YAML reads 3e-1 (no dot) as a string
                out[f.name] = float(value)
            except ValueError:
                problems.append(f"{name(f.name)}: expected float, got {value!r}")
            except OverflowError:  # an integer of hundreds of digits
                problems.append(f"{name(f.name)}: expected float, got an integer of {len(str(value))} digits "
                                f"(out of the float range)")
        elif want is str and isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            out[f.name] = os.fspath(value)  # a pathlib.Path given in Python
        elif want is list and isinstance(value, str):
            out[f.name] = [v.strip() for v in value.split(",") if v.strip()]
            if not out[f.name]:  # "--tasks ," would otherwise mean "not given": every task
                problems.append(f"{name(f.name)}: {value!r} names nothing; give comma-separated values")
        elif want is list and isinstance(value, list | tuple) and not all(isinstance(v, str) for v in value):
            problems.append(f"{name(f.name)}: expected a list of strings, got {value!r}")
        elif want is list and isinstance(value, tuple):
            out[f.name] = list(value)
        elif want is not typing.Any and not isinstance(value, want) or (want is int and isinstance(value, bool)):
            problems.append(f"{name(f.name)}: expected {want.__name__}, got {value!r}")
    return out, problems


def check_field_types(args: Any) -> None:
    """Check a section's own fields (see :func:`typed_fields`) before its value checks compare them.

    Raises:
        ConfigError: naming the flag of every field of the wrong type. Otherwise the converted values (``lr=1`` ->
            ``1.0``, a path -> text) replace the given ones.
    """
    values, problems = typed_fields(type(args), {f.name: getattr(args, f.name) for f in dataclasses.fields(args)})
    raise_problems(problems)
    for key, value in values.items():
        if value is not getattr(args, key):
            setattr(args, key, value)
