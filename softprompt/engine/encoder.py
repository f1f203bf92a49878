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
from softprompt.engine.ensemble import combine
from softprompt.engine.requests import ClassifyRequest, ClassifyResult, RequestError, TooLongError


@torch.no_grad()
def classify_encoder(engine, requests: list[ClassifyRequest], tasks: list) -> list[ClassifyResult]:
    """Class log-probabilities of every request (an ensemble: combined over its members)."""
    where = []  # one (request, member, format) per member of each request's task
    sources = []
    for i, (req, task) in enumerate(zip(requests, tasks, strict=True)):
        if task.labels is None:
            raise RequestError(f"task {task.name!r} is not a classification task (no labels)")
        for member, fmt in zip(task.members, task.formats, strict=True):
            where.append((i, member, fmt))
            sources.append(engine._source(task, fmt, req))
    by_member: dict[str, list[int]] = defaultdict(list)
    encoded = []
    for k, (text, (i, member, _)) in enumerate(zip(sources, where, strict=True)):
        limit = min(engine.context - engine._length(member), engine.max_input_tokens)
        ids = list(engine.tok(text)["input_ids"])  # with the encoder's special tokens ([CLS] ... [SEP])
        if len(ids) > limit:
            if not engine.truncate:
                raise TooLongError(f"classify input for task {tasks[i].name!r} has {len(ids)} tokens; at most "
                                   f"{limit} fit (max_input_tokens {engine.max_input_tokens}, context "
                                   f"{engine.context})")
            ids = list(engine.tok(text, truncation=True, max_length=limit)["input_ids"])
        encoded.append(ids)
        by_member[member].append(k)
    scores: list[torch.Tensor | None] = [None] * len(where)
    for member, ks in by_member.items():
        prompt = engine._encoder_prompt(member)
        ks = sorted(ks, key=lambda k: len(encoded[k]))  # similar lengths share a batch: less padding
        for a in range(0, len(ks), engine.max_batch_size):
            chunk = ks[a:a + engine.max_batch_size]
            width = max(len(encoded[k]) for k in chunk)
            ids = torch.full((len(chunk), width), engine.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, k in enumerate(chunk):  # right padding: an encoder's positions count from the first token
                ids[r, :len(encoded[k])] = torch.tensor(encoded[k])
                mask[r, :len(encoded[k])] = 1
            logits = inject.class_logits(engine.model, ids.to(engine.model.device), mask.to(engine.model.device),
                                         prompt)
            for r, k in enumerate(chunk):
                scores[k] = torch.log_softmax(logits[r], -1).cpu()  # (C,)
    per_request: list[list[torch.Tensor]] = [[] for _ in requests]
    for k, (i, _, fmt) in enumerate(where):
        if scores[k].shape[0] != len(fmt.labels):
            raise RequestError(f"task {tasks[i].name!r}: its head has {scores[k].shape[0]} classes but "
                               f"{len(fmt.labels)} labels are recorded")
        by_label = dict(zip(fmt.labels, scores[k].tolist(), strict=True))
        per_request[i].append(torch.tensor([by_label[lab] for lab in tasks[i].labels], dtype=torch.float64))
    return [combine(task.name, task.labels, torch.stack(per), task.combine, task.kind == "ensemble")
            for task, per in zip(tasks, per_request, strict=True)]
