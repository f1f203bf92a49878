"""Task-name sanitising (names become folder names in a prompt store)."""

from __future__ import annotations

import pytest

from softprompt.store import StoreError, safe_task_name


@pytest.mark.parametrize("name", ["sentiment", "rt-sentiment_v2.1", "a", "0", "_x", "x" * 64, "A.b-C_d"])
def test_accepts(name):
    assert safe_task_name(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", ".hidden", "-rf", "", ".", "..", "x" * 65,
                                  "a b", "caf\u00e9", "name\n", "a\x00b", None, 3])
def test_refuses(name):
    with pytest.raises(StoreError, match=r"invalid task name .*1-64 characters from A-Z a-z 0-9 \. _ -, "
                                         r"not starting with '\.' or '-'"):
        safe_task_name(name)
