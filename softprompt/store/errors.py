"""The one exception type of :mod:`softprompt.store`."""

from __future__ import annotations


class StoreError(ValueError):
    """A stored prompt could not be written, read or validated; the message names the folder/file."""
