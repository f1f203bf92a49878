"""Serving an encoder sequence classifier: one frozen encoder, a prompt and a head per task.

An encoder attends in both directions, so a prompt has no keys/values to cache and the mixed prefix
batches of the causal backend do not apply. Each prompt is kept as its embeddings and head; rows are
grouped by prompt (each brings its own head, with its own number of classes) and run in right-padded
batches of similar length; a request gets the same scores whatever else is in its batch. The encoder
classifies only: scoring, generation, a base-model task and precomputed keys/values need a language model.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from softprompt.engine.backend import Backend
from softprompt.engine.batching import Row
from softprompt.engine.requests import RequestError, TooLongError, UnknownTaskError
from softprompt.forward.classifier import class_logits
from softprompt.forward.prompt import PromptOutput


class HeadBackend(Backend):
    """An encoder classifier's prompts (embeddings and head) by key, run grouped by prompt."""

    def __init__(self, engine):
        super().__init__(engine)
        self.prompts: dict[object, PromptOutput] = {}

    # ------------------------------------------------------------------------------ prompts by key
    def __contains__(self, key) -> bool:
        return key in self.prompts

    def keys(self) -> list:
        return list(self.prompts)

    def get(self, key) -> PromptOutput:
        with self._lock:
            if key not in self.prompts:
                raise UnknownTaskError(f"a task was unloaded while its request waited: no prompt {key!r}")
            return self.prompts[key]

    def length(self, key) -> int:
        embeds = self.get(key).embeds
        return 0 if embeds is None else int(embeds.shape[0])

    def nonfinite(self, prompt: PromptOutput) -> str | None:
        parts = {"embeddings": (prompt.embeds,) if prompt.embeds is not None else (),
                 "head tensors": tuple(prompt.head.parameters()) if prompt.head is not None else ()}
        for what, tensors in parts.items():
            if any(not bool(torch.isfinite(t).all()) for t in tensors):
                return what
        return None

    def add(self, key, prompt: PromptOutput) -> None:
        with self._lock:
            self.prompts[key] = prompt

    def remove(self, key) -> None:
        with self._lock:
            del self.prompts[key]

    # ------------------------------------------------------------------------------ requests
    def require_language_model(self, what: str) -> None:
        raise RequestError(f"{type(self.engine.model).__name__} is an encoder sequence classifier: it classifies "
                           f"with a prompt and its head; {what} needs a language model")

    def classify_rows(self, member, fmt, source, task) -> list[Row]:
        """One row: the text with the encoder's own special tokens (``[CLS] ... [SEP]``); its head reads them."""
        engine = self.engine
        limit = min(engine.context - self.length(member), engine.max_input_tokens)
        try:
            ids = list(engine.tok(source)["input_ids"])
            if len(ids) > limit and engine.truncate:
                ids = list(engine.tok(source, truncation=True, max_length=limit)["input_ids"])
        except (TypeError, ValueError, UnicodeError) as e:
            raise RequestError(f"the text cannot be tokenised ({type(e).__name__}: {e})") from e
        if len(ids) > limit:
            raise TooLongError(f"classify input for task {task.name!r} has {len(ids)} tokens; at most {limit} fit "
                               f"(max_input_tokens {engine.max_input_tokens}, context {engine.context})")
        return [Row(member, ids, 0)]

    @torch.no_grad()
    def classify(self, rows: list[Row]) -> list[torch.Tensor]:
        """Class log-probabilities ``(C,)`` of every row (its prompt's head decides ``C``)."""
        engine = self.engine
        by_member: dict[object, list[int]] = defaultdict(list)
        for k, row in enumerate(rows):
            by_member[row.prompt].append(k)
        scores: list[torch.Tensor | None] = [None] * len(rows)
        for member, ks in by_member.items():
            prompt = self.get(member)
            ks = sorted(ks, key=lambda k: len(rows[k].ids))  # similar lengths share a batch: less padding
            for a in range(0, len(ks), engine.max_batch_rows):
                chunk = ks[a:a + engine.max_batch_rows]
                width = max(len(rows[k].ids) for k in chunk)
                ids = torch.full((len(chunk), width), engine.tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, k in enumerate(chunk):  # right padding: an encoder's positions count from the first token
                    ids[r, :len(rows[k].ids)] = torch.tensor(rows[k].ids)
                    mask[r, :len(rows[k].ids)] = 1
                logits = class_logits(engine.model, ids.to(engine.model.device), mask.to(engine.model.device), prompt)
                for r, k in enumerate(chunk):
                    scores[k] = torch.log_softmax(logits[r], -1).cpu()  # (C,)
        return scores

    def member_scores(self, task, labels, scores) -> torch.Tensor:
        s = scores[0]
        if s.shape[0] != len(labels):
            raise RequestError(f"task {task.name!r}: its head has {s.shape[0]} classes but "
                               f"{len(labels)} labels are recorded")
        return s

    def score(self, rows):
        self.require_language_model("scoring a continuation")

    def generate(self, items, on_token, cancelled):
        self.require_language_model("generating text")
