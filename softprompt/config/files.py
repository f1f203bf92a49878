"""YAML config files and layered arguments: defaults < ``--config`` file < flags given on the command line."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from softprompt.config.checks import ConfigError, flag, raise_problems
from softprompt.config.sections import SECTIONS
from softprompt.config.typed import typed_fields


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last one silently: a
    second ``train:`` section would drop the first's settings)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged (and overridable) by PyYAML
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list as a key: SafeLoader's own error names it
                continue
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}); "
                                    "YAML would keep only the last one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, extra: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Read a YAML config file into ``{section: {field: value}}``, rejecting unknown sections/keys.

    ``extra``: sections a command adds to the shared ones (``distill``), returned as they are (mappings): the
    command checks their fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        raw = {} if raw is None else raw  # an empty file; `[]` or `0` are refused below, not read as empty
    except _DuplicateKey as e:
        raise ConfigError(f"--config {path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it as UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits, deep nesting
        from softprompt.data.formats import json_value_problem  # the same two failures as JSON's

        raise ConfigError(f"--config {path}: unreadable YAML ({json_value_problem(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: top level must be a mapping of sections {sorted(SECTIONS)}")
    problems = []
    out: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS and section not in extra:
            problems.append(f"{path}: unknown section {section!r} (known: {', '.join([*SECTIONS, *extra])})")
            continue
        if not isinstance(values, dict):
            problems.append(f"{path}: section {section!r} must be a mapping")
            continue
        if section in extra:
            out[section] = values
            continue
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key in values:
            if key not in names:
                problems.append(f"{path}: {section}.{key} is not a known field (known: {', '.join(sorted(names))})")
        out[section] = {k: v for k, v in values.items() if k in names}
        if section == "data" and isinstance(out[section].get("template"), str):  # read as --template reads it
            out[section]["template"] = template_flag(out[section]["template"])
    raise_problems(problems)
    return out


def build_args(cls: type, *layers: dict[str, Any], origins: Sequence[str | None] = ()) -> Any:
    """Instantiate ``cls`` from layered dicts (later wins), type-checking scalar values.

    Args:
        cls: a section dataclass.
        layers: field values, lowest precedence first; ``None`` values are ignored.
        origins: per layer, how its values are named in messages: a prefix such as ``"run.yaml: train."``
            (giving ``run.yaml: train.lr``), or ``None`` (or no entry) for the flag (``--lr``).

    Raises:
        ConfigError: every value of the wrong type, then every problem ``cls`` finds, each named after
            where the value came from.
    """
    merged: dict[str, Any] = {}
    source: dict[str, str | None] = {}
    for i, layer in enumerate(layers):
        for k, v in layer.items():
            if v is not None:
                merged[k], source[k] = v, origins[i] if i < len(origins) else None

    def name(field_name: str) -> str:
        prefix = source.get(field_name)
        return flag(field_name) if prefix is None else prefix + field_name

    merged, problems = typed_fields(cls, merged, name)
    typed = {k: v for k, v in merged.items() if not any(p.startswith(f"{name(k)}: expected") for p in problems)}
    try:  # the other values are still checked (ill-typed ones at their defaults), to report every problem
        args = cls(**typed)
    except ConfigError as e:
        lines = str(e).removeprefix("invalid arguments:\n  ").split("\n  ")
        problems += [_renamed(line, source) for line in lines]
    raise_problems(problems)
    return args


def _renamed(problem: str, source: dict[str, str | None]) -> str:
    """``problem`` (which starts with the flag it is about) naming the config key where that value came from."""
    m = re.match(r"--([a-z0-9-]+)(?![\w-])", problem)
    prefix = source.get(m.group(1).replace("-", "_")) if m else None
    return problem if prefix is None else prefix + m.group(1).replace("-", "_") + problem[m.end():]


def template_flag(text: str) -> str:
    """``--template``'s value with ``\\n``, ``\\t`` and ``\\\\`` read as a newline, a tab and a backslash: a shell
    passes ``"Review: {text}\\nSentiment:"`` with a backslash and an n, and the prompt read as one line with them.
    A config file's ``data.template`` is read alike (a single-quoted YAML ``'...\\n...'`` keeps the backslash), so
    the same text gives the same prompt as a flag and as a config value. ``generate --stop`` reads its value alike
    (``--stop "\\n"`` is a newline)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def given(ns: Any, section: str, name: str) -> bool:
    """Whether field ``name`` was set by a flag or by the ``--config`` file, rather than left at its default."""
    if getattr(ns, name, None) is not None:
        return True
    config = getattr(ns, "config", None)  # a key left empty (null) keeps the default, as build_args reads it
    return bool(config) and load_yaml(config, getattr(ns, "config_extra", ())).get(section, {}).get(name) is not None


def to_yaml(args: dict[str, Any]) -> str:
    """Write ``{section: dataclass instance}`` as a YAML config file text (read back by :func:`load_yaml`, which reads
    the template as :func:`template_flag` does: its backslashes are written doubled)."""
    out = {k: dataclasses.asdict(v) for k, v in args.items()}
    if isinstance(out.get("data", {}).get("template"), str):
        out["data"]["template"] = out["data"]["template"].replace("\\", "\\\\")
    return yaml.safe_dump(out, sort_keys=False)
