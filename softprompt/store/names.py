"""Task names: they become folder names inside a prompt store, so they are checked strictly."""

from __future__ import annotations

import re

from softprompt.store.errors import StoreError

MAX_TASK_NAME = 64
_TASK_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_TASK_NAME - 1}}}")
TASK_NAME_RULE = (f"1-{MAX_TASK_NAME} characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-' "
                  "(so no '.', '..', hidden names or path separators)")


def safe_task_name(name: str) -> str:
    """Return ``name`` if it is a safe task name, else raise.

    A task name becomes a folder name in a prompt store, so it may not traverse paths (``../x``, ``a/b``),
    hide (``.x``), look like an option (``-x``) or be empty/too long.

    Raises:
        StoreError: explaining the rule and showing the rejected name.
    """
    if not isinstance(name, str) or _TASK_NAME.fullmatch(name) is None:
        raise StoreError(f"invalid task name {name!r}: use {TASK_NAME_RULE}")
    return name
