"""Classification on an encoder sequence classifier: one frozen encoder, a prompt and a head per task.

An encoder attends in both directions, so a prompt has no keys/values to cache and the engine's mixed
prefix batches do not apply. Rows are instead grouped by prompt (each brings its own head, with its own
number of classes) and run in right-padded batches of similar length through :func:`inject.class_logits`;
a request gets the same scores whatever else is in its batch.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from softprompt import inject
from softprompt.engine.batching import Row


@torch.no_grad()
def classify_encoder(engine, rows: list[Row]) -> list[torch.Tensor]:
    """Class log-probabilities ``(C,)`` of every row (its prompt's head decides ``C``)."""
    by_member: dict[object, list[int]] = defaultdict(list)
    for k, row in enumerate(rows):
        by_member[row.prompt].append(k)
    scores: list[torch.Tensor | None] = [None] * len(rows)
    for member, ks in by_member.items():
        prompt = engine._encoder_prompt(member)
        ks = sorted(ks, key=lambda k: len(rows[k].ids))  # similar lengths share a batch: less padding
        for a in range(0, len(ks), engine.max_batch_size):
            chunk = ks[a:a + engine.max_batch_size]
            width = max(len(rows[k].ids) for k in chunk)
            ids = torch.full((len(chunk), width), engine.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, k in enumerate(chunk):  # right padding: an encoder's positions count from the first token
                ids[r, :len(rows[k].ids)] = torch.tensor(rows[k].ids)
                mask[r, :len(rows[k].ids)] = 1
            logits = inject.class_logits(engine.model, ids.to(engine.model.device), mask.to(engine.model.device),
                                         prompt)
            for r, k in enumerate(chunk):
                scores[k] = torch.log_softmax(logits[r], -1).cpu()  # (C,)
    return scores
