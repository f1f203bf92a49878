"""Checks every command's arguments share: each returns (or raises) problems that name their flag."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1  # what every seeded generator (torch, random, numpy) accepts
MIN_MAX_LENGTH = 8  # the smallest --max-length: room for a short source and its target


class ConfigError(ValueError):
    """Invalid arguments; the message names every offending flag or config key."""


def flag(name: str) -> str:
    """The command-line flag of a field: ``num_virtual_tokens`` -> ``--num-virtual-tokens``."""
    return "--" + name.replace("_", "-")


def raise_problems(problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every problem, if there are any."""
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))


def check_real(name: str, value: float, ok: Callable[[float], bool], rule: str) -> str | None:
    """The problem with a float flag ``name`` (``--lr``), if any: it must be finite and satisfy ``ok``.

    NaN and infinities pass most comparisons the wrong way (``inf > 0``, ``not nan < 0``), so they are
    refused before the range is checked.
    """
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value}"
    return None if ok(value) else f"{name} must be {rule}, got {value}"


def check_seed(name: str, value: int) -> str | None:
    """The problem with a seed flag, if any: it must be in ``0..MAX_SEED``."""
    return None if 0 <= value <= MAX_SEED else f"{name} must be in 0..{MAX_SEED}, got {value}"


def check_folder_to_create(name: str, path: str | os.PathLike) -> str | None:
    """The problem with a flag naming a folder to create (or reuse), if any.

    Refused: the path exists and is not a folder; the nearest existing ancestor is a file; that
    ancestor (or the folder itself) is not writable.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return f"{name} {path}: exists and is not a folder"
        return None if os.access(p, os.W_OK | os.X_OK) else f"{name} {path}: the folder is not writable"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{name} {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{name} {path}: cannot create it in {parent} (not writable)"
    return None


def check_file_to_write(name: str, path: str | os.PathLike) -> str | None:
    """The problem with a flag naming a file to write (its folder is created if missing), if any."""
    p = Path(path)
    if p.is_dir():
        return f"{name} {path}: is a folder"
    if p.exists():
        return None if os.access(p, os.W_OK) else f"{name} {path}: the file is not writable"
    return check_folder_to_create(name, p)  # the same checks of the folders above it


def store_task_problems(store: str | None, task: str | None, labelled: bool = True) -> list[str]:
    """The problems with a ``--store DIR --task NAME`` pair: both or neither, a folder that can be created,
    a task name that is safe as a folder name, an entry the prompt can replace (``labelled`` false: a prompt
    without labels, which no ensemble member can be; see :func:`~softprompt.store.prompt_entry_problem`)."""
    problems = []
    if bool(store) != bool(task):
        problems.append("--store and --task go together: --store DIR --task NAME")
    if store:
        keep_problems(problems, check_folder_to_create("--store", store))
    if task:
        from softprompt.store import StoreError, prompt_entry_problem, safe_task_name

        try:
            safe_task_name(task)
        except StoreError as e:
            problems.append(str(e))
        if store and not problems:  # what would make storing the prompt fail once the run is over
            keep_problems(problems, prompt_entry_problem(store, task, labelled))
    return problems


def admin_token_problem(token: str, where: str) -> str | None:
    """Why ``token`` (named ``where``) could never authenticate an admin request, if so: empty, whitespace at
    its ends (HTTP servers drop it from the header), or not printable ASCII (a header is read as Latin-1)."""
    if not token:
        return f"{where} is empty"
    if token != token.strip():
        return f"{where} starts or ends with whitespace, which HTTP drops from the header: no client could send it"
    if not (token.isascii() and token.isprintable()):
        return f"{where} must be printable ASCII: other characters do not reach the server unchanged in a header"
    return None


def keep_problems(problems: list[str], *found: str | None) -> None:
    """Append the problems that checks found (their ``None`` results mean "fine") to ``problems``."""
    problems.extend(p for p in found if p)


def generate_flag_problems(max_new_tokens: int | None, temperature: float, top_k: int, top_p: float,
                           seed: int | None) -> list[str]:
    """Every problem with the sampling flags of ``generate``, each naming its flag (``max_new_tokens`` None: not
    given, the task decides).

    ``seed`` is ``None`` when not given. A sampling flag (``--top-k``, ``--top-p`` below 1, ``--seed``) at
    ``--temperature 0`` is refused: decoding is greedy there and the flag would change nothing, in silence.
    """
    problems = [] if max_new_tokens is None or max_new_tokens >= 1 else [
        f"--max-new-tokens must be >= 1, got {max_new_tokens}"]
    if top_k < 0:
        problems.append(f"--top-k must be >= 0 (0: off), got {top_k}")
    keep_problems(problems, check_real("--temperature", temperature, lambda v: v >= 0, ">= 0 (0: greedy)"),
                  check_real("--top-p", top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
                  None if seed is None else check_seed("--seed", seed))
    sampling = [f for f, on in (("--top-k", top_k > 0), ("--top-p", top_p != 1), ("--seed", seed is not None)) if on]
    if temperature == 0 and sampling:
        problems.append(f"{', '.join(sampling)} only apply when sampling: --temperature is 0 (greedy, the "
                        f"default); give --temperature > 0 to sample, or drop {'them' if len(sampling) > 1 else 'it'}")
    return problems


def fit_max_length(context: tuple[int, str] | None, model: str, num_virtual_tokens: int, max_length: int,
                   given: bool) -> int:
    """The ``--max-length`` to train with, so that the prompt and every example fit the model's context.

    Args:
        context: the model's context length and the config key it comes from (see
            :func:`softprompt.model.context_length`), or ``None`` for a model without a hard limit.
        model: how to name the model in messages (``--model NAME``).
        num_virtual_tokens: the prompt length ``P``.
        max_length: the ``--max-length`` asked for or defaulted.
        given: whether the user set ``--max-length`` (then it is refused if it does not fit; a default is
            lowered to what fits instead).

    Raises:
        ConfigError: the prompt leaves fewer than ``MIN_MAX_LENGTH`` positions for text, or a given
            ``--max-length`` does not fit beside it.
    """
    if context is None:
        return max_length
    limit, key = context
    room = limit - num_virtual_tokens
    if room < MIN_MAX_LENGTH:
        left = f"only {room} are left" if room > 0 else "nothing is left"
        raise_problems([f"--num-virtual-tokens {num_virtual_tokens} does not fit {model}: its context is {limit} "
                        f"positions ({key}) and {left} for text; --num-virtual-tokens must be at most "
                        f"{limit - MIN_MAX_LENGTH} (the text needs --max-length >= {MIN_MAX_LENGTH})"])
    if max_length <= room:
        return max_length
    if given:
        raise_problems([f"--num-virtual-tokens {num_virtual_tokens} + --max-length {max_length} = "
                        f"{num_virtual_tokens + max_length} tokens do not fit {model}'s context of {limit} positions "
                        f"({key}): {room} are left for text; lower --max-length to {room} or --num-virtual-tokens to "
                        f"{limit - max_length}"])
    log.info("--max-length %d (default) lowered to --max-length %d: %s has %d positions (%s) and the prompt "
             "takes %d", max_length, room, model, limit, key, num_virtual_tokens)
    return room
