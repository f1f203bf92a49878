"""How the engine holds and runs the prompts of one model family: the interface of its serving backends.

:func:`backend_for` picks the backend from the capabilities of the model's family
(:func:`softprompt.forward.family_of`), so the :class:`~softprompt.engine.Engine` calls one object whatever
the model is: :class:`~softprompt.engine.prefix_backend.PrefixBackend` for a causal LM (cached prompt
keys/values, mixed-task prefix batches), :class:`~softprompt.engine.head_backend.HeadBackend` for an encoder
classifier (prompt embeddings and a head per task, rows grouped by prompt).

A backend keeps its own prompts by key; the engine keeps tasks, formats and versions, and swaps prompts
in only between batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from softprompt.data import TaskFormat
from softprompt.engine.batching import Row
from softprompt.engine.requests import RequestError
from softprompt.forward import InjectionError
from softprompt.store.errors import StoreError


class Backend:
    """Prompts by key and the batched forward passes of one family; see the module docstring.

    Args:
        engine: the engine it serves (its model, tokenizer and batch limits are read from it).
    """

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.RLock()  # prepare() reads prompt lengths from other threads than the loads

    # ------------------------------------------------------------------------------ prompts by key
    def __contains__(self, key) -> bool:
        raise NotImplementedError

    def keys(self) -> list:
        """Keys of the prompts held."""
        raise NotImplementedError

    def length(self, key) -> int:
        """Prompt length of ``key`` in tokens; :class:`UnknownTaskError` when it is not held (any more)."""
        raise NotImplementedError

    def nonfinite(self, prompt) -> str | None:
        """Which part of a prepared prompt holds NaN/Inf (``keys/values of layer 3``), or None."""
        raise NotImplementedError

    def fits(self, key, prompt) -> None:
        """Raise :class:`InjectionError` unless the prompt fits the others held (changes nothing)."""

    def check(self, key, prompt, where: str) -> None:
        """Refuse a prepared prompt that is not finite or does not fit; changes nothing.

        Raises:
            StoreError: naming ``where`` (the prompt's folder or key) and the problem.
        """
        bad = self.nonfinite(prompt)
        if bad:
            raise StoreError(f"{where}: the prompt's {bad} are not finite in {self.engine.model.dtype} on this model "
                             "(values too large for the dtype?); refusing to serve it")
        with self._lock:
            try:
                self.fits(key, prompt)
            except InjectionError as e:
                raise StoreError(f"{where}: {e}") from e

    def format_problem(self, fmt: TaskFormat | None) -> str | None:
        """Why a task of format ``fmt`` cannot be served by this backend, or None."""
        return None

    def check_formats(self, formats: list, task: str) -> None:
        """Refuse task ``task`` when one of its formats cannot be served (:meth:`format_problem`); changes nothing.

        Raises:
            RequestError: naming the task and the problem.
        """
        for fmt in formats:
            problem = self.format_problem(fmt)
            if problem:
                raise RequestError(f"task {task!r}: {problem}")

    def add(self, key, prompt) -> None:
        """Hold a checked prompt under ``key`` (replacing one held before)."""
        raise NotImplementedError

    def remove(self, key) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ requests
    def require_language_model(self, what: str) -> None:
        """Raise :class:`RequestError` when ``what`` (scoring, generating, ...) needs an LM head this lacks."""

    def classify_rows(self, member, fmt: TaskFormat, source: str, task) -> list[Row]:
        """The rows that classify the rendered ``source`` with prompt ``member`` (see :meth:`member_scores`)."""
        raise NotImplementedError

    def classify(self, rows: list[Row]) -> list[torch.Tensor]:
        """Run classify rows in batches: per row, its scores."""
        raise NotImplementedError

    def member_scores(self, task, labels: list[str], scores: list[torch.Tensor]) -> torch.Tensor:
        """One member's score per label ``(L,)`` (``labels`` in its order) from the scores of its rows."""
        raise NotImplementedError

    def score(self, rows: list[Row]) -> list[torch.Tensor]:
        """Per row: log-probs of each of its target tokens."""
        raise NotImplementedError

    def continuous_problem(self) -> str | None:
        """Why this backend cannot run generations in a :class:`~softprompt.engine.running.RunningBatch`."""
        return "this model family does not generate"

    def prompt(self, key):
        """The prepared prompt held under ``key`` (None: no prompt); :class:`UnknownTaskError` when gone."""
        raise NotImplementedError

    def generate(self, items: list, on_token: Callable[[int, list[int], list | None], None] | None,
                 cancelled: Callable[[int], bool] | None) -> list:
        """Generate for prepared requests: a :class:`GenerateResult` per item, or the exception that failed that
        item alone (the others ran to their end)."""
        raise NotImplementedError


def backend_for(engine) -> Backend:
    """The backend serving ``engine.family``: cached prompt keys/values in mixed prefix batches where the
    family caches them, else prompts with their own heads grouped by prompt.

    Raises:
        NotImplementedError: the family has neither (the engine refuses such a model before asking).
    """
    from softprompt.engine.head_backend import HeadBackend  # both build on this module
    from softprompt.engine.prefix_backend import PrefixBackend

    if engine.family.caches_prompt:
        return PrefixBackend(engine)
    if engine.family.has_head:
        return HeadBackend(engine)
    raise NotImplementedError(f"the engine does not serve {engine.family.description}")
