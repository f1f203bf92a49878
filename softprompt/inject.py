"""Temporary: cli.py's three family checks move to the interface in the merge.

Only ``softprompt/cli.py`` may import this module (it is being moved into a workflows module in parallel);
everything else uses :mod:`softprompt.forward`. Delete this file once cli.py asks ``family_of(model)``.
"""

from __future__ import annotations

from softprompt.forward import compute_prompt_kv, family_of

__all__ = ["compute_prompt_kv", "is_seq2seq", "is_sequence_classifier"]


def is_sequence_classifier(model) -> bool:
    """Temporary for cli.py: ``family_of(model).has_head``."""
    return family_of(model).has_head


def is_seq2seq(model) -> bool:
    """Temporary for cli.py (it asks whether the engine serves the model): ``not family_of(model).served``."""
    return not family_of(model).served
