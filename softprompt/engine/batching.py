"""Mixed-task batches: an explicit structure with one prompt key per row, built length-sorted."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One sequence to run: the prompt it uses, its token ids, and where its scored part starts.

    Attributes:
        prompt: key of the row's prompt in the engine's :class:`PromptTable` (``None``: no prompt).
        ids: token ids (source, then the scored continuation if any).
        target_start: index of the first scored token; ``len(ids)`` when only the next token matters.
        candidates: token ids scored at the position after the source (single-token labels), or None.
    """

    prompt: object
    ids: list[int]
    target_start: int
    candidates: list[int] | None = None


@dataclass
class MixedBatch:
    """Padded rows of possibly different tasks.

    Attributes:
        input_ids: ``(B, T)`` padded token ids.
        attention_mask: ``(B, T)`` 1 at real tokens.
        prompts: prompt key of each row (the task index per row).
        index: position of each row in the caller's row list.
        lengths: real tokens per row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list
    index: list[int]
    lengths: list[int]
    padding_side: str

    def to(self, device) -> MixedBatch:
        return MixedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.prompts, self.index,
                          self.lengths, self.padding_side)


def mixed_batches(rows: list[Row], pad_id: int, padding_side: str, max_rows: int,
                  max_batch_tokens: int, same_length: bool = False, apart: list[int] | None = None) -> list[MixedBatch]:
    """Group rows of any tasks into padded batches, sorted by length so little padding is wasted.

    A batch holds at most ``max_rows`` rows and ``max_batch_tokens`` padded tokens (at least one row); with
    ``same_length``, only rows of one length (no padding: a sliding window counts padding columns, so padding
    would shift a row's window over its prompt); with ``apart`` (a number per row), only rows of one number.
    """
    apart = apart or [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: (apart[i], len(rows[i].ids)))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(rows[i].ids)  # sorted ascending: this row is the widest so far
        if current and (len(current) >= max_rows or (len(current) + 1) * width > max_batch_tokens
                        or (same_length and len(rows[current[0]].ids) != width) or apart[current[0]] != apart[i]):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    out = []
    for group in groups:
        width = max(len(rows[i].ids) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):
            n = len(rows[i].ids)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[r, cols] = torch.tensor(rows[i].ids)
            mask[r, cols] = 1
        out.append(MixedBatch(ids, mask, [rows[i].prompt for i in group], group,
                              [len(rows[i].ids) for i in group], padding_side))
    return out
